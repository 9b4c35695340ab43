import csv
import json
import os

import pytest
from PIL import Image

from ppiad.eval.metrics import SCHEMA_KEYS, evaluate
from ppiad.eval.report import acc_f1_cell, load_metrics, pct, write_comparison, write_report


def _records(flip_every=0):
    recs = []
    for cat, n in (("bottle", 8), ("pill", 6), ("pcb1", 5)):
        for i in range(n):
            label = "defect" if i % 3 == 0 else "normal"
            answer = "A" if label == "defect" else "B"
            if flip_every and i % flip_every == 1:
                answer = None if cat == "pill" else ("B" if answer == "A" else "A")
            recs.append({"category": cat, "label": label, "answer": answer,
                         "score": (0.8 if label == "defect" else 0.3) - 0.01 * i})
    return recs


def test_formatting_helpers():
    assert pct(0.8435) == "84.35" and pct(None) == "-" and pct(1.0) == "100.00"
    assert acc_f1_cell({"accuracy": 0.8435, "f1_macro": 0.71544}) == "84.35\\71.54"


def test_write_report_files(tmp_path):
    metrics = evaluate(_records(flip_every=4), threshold=0.5)
    out = tmp_path / "run"
    paths = write_report(metrics, str(out), "LR-IAD on toy", {"model": "tiny", "adapter": "a|b",
                                                               "dataset": "toy"})
    for name in ("metrics.json", "report.md", "overall.csv", "per_category.csv", "report.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert paths["png"] == str(out / "report.png")
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]   # no temp files left behind

    # metrics.json round-trips and follows the schema
    data = json.loads((out / "metrics.json").read_text())
    assert data["overall"] == metrics["overall"] and data["per_category"] == metrics["per_category"]
    assert data["calibrated"] == metrics["calibrated"]
    assert data["meta"]["model"] == "tiny" and "date" in data["meta"]
    for m in [data["overall"], *data["per_category"].values()]:
        assert set(SCHEMA_KEYS) <= set(m)
        for k in ("accuracy", "f1_macro", "balanced_accuracy", "invalid_rate", "auroc", "ap"):
            assert 0.0 <= m[k] <= 1.0
    assert load_metrics(str(out))["overall"] == metrics["overall"]

    md = (out / "report.md").read_text()
    assert md.startswith("# LR-IAD on toy\n")
    for cat, m in metrics["per_category"].items():
        cell = f"{100 * m['accuracy']:.2f}\\{100 * m['f1_macro']:.2f}"
        assert cell in md and cat in md
    assert acc_f1_cell(metrics["overall"]) in md
    assert "a\\|b" in md                                  # a pipe in meta cannot break the table
    (tn, fp), (fn, tp) = metrics["overall"]["confusion"]
    assert f"| normal | {tn} | {fp} |" in md and f"| defect | {fn} | {tp} |" in md
    assert "Calibrated" in md

    with open(out / "per_category.csv") as f:
        rows = list(csv.DictReader(f))
    by_cat = {r["category"]: r for r in rows}
    assert set(metrics["per_category"]) <= set(by_cat)
    assert float(by_cat["pill"]["accuracy"]) == pytest.approx(metrics["per_category"]["pill"]["accuracy"])
    assert "pill (calibrated)" in by_cat
    with open(out / "overall.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["scope"] for r in rows] == ["overall", "calibrated"]
    assert int(rows[0]["n"]) == 19

    with Image.open(out / "report.png") as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200


def test_report_without_scores(tmp_path):
    recs = [{k: v for k, v in r.items() if k != "score"} for r in _records()]
    write_report(evaluate(recs), str(tmp_path), "no scores", {})
    md = (tmp_path / "report.md").read_text()
    assert "100.00\\100.00" in md                          # perfect toy answers
    assert json.loads((tmp_path / "metrics.json").read_text())["overall"]["auroc"] is None
    with open(tmp_path / "overall.csv") as f:
        assert next(csv.DictReader(f))["auroc"] == ""


def test_write_report_rejects_bad_metrics(tmp_path):
    with pytest.raises(ValueError, match="per_category"):
        write_report({"overall": {}}, str(tmp_path), "x", {})


def test_write_comparison(tmp_path):
    base = evaluate(_records(flip_every=2))
    tuned = evaluate(_records(flip_every=4))
    write_report(tuned, str(tmp_path / "tuned"), "tuned", {})
    out = tmp_path / "cmp.md"
    text = write_comparison([("Qwen2-VL base", base), ("LR-IAD", str(tmp_path / "tuned"))], str(out))
    assert out.read_text() == text
    assert "| Qwen2-VL base | " + f"{100 * base['overall']['accuracy']:.2f}" in text
    assert "| LR-IAD | " + f"{100 * tuned['overall']['accuracy']:.2f}" in text
    assert "| Method | bottle | pcb1 | pill | All |" in text
    assert acc_f1_cell(base["per_category"]["pill"]) in text
    with pytest.raises(ValueError):
        write_comparison([], str(out))
