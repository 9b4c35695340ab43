"""The evaluation runner against a stand-in predictor: records, resume, unreadable images, calibration,
subsets and the multi-process merge."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from ppiad.data.sample import DEFECT, NORMAL, Sample
from ppiad.eval.predictor import Prediction
from ppiad.eval.runner import calibrated_metrics, run_evaluation, select_subset
from ppiad.utils.io import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CountingPredictor:
    """Dark image -> defect. P(A) = darkness. Counts calls and images; can fail after `fail_after` calls."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.images = 0
        self.fail_after = fail_after

    def predict(self, images, object_names):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.images += len(images)
        out = []
        for im in images:
            darkness = 1.0 - float(np.asarray(im).mean()) / 255.0
            answer = "A" if darkness > 0.5 else "B"
            out.append(Prediction(f"<think>x</think> <answer>{answer}</answer>", "x", answer, True, darkness))
        return out


def make_dataset(root, n_per_cat=5, defects_per_cat=2, broken=(), write=True):
    """Two categories; defect images are dark. Brightness varies so scores differ. write=False only lists the
    samples of a tree written before (processes that share one must not rewrite it under each other)."""
    samples = []
    for cat in ("bottle", "cable"):
        os.makedirs(os.path.join(root, cat), exist_ok=True)
        for i in range(n_per_cat):
            defect = i < defects_per_cat
            value = 40 + 10 * i if defect else 150 + 15 * i
            path = os.path.join(root, cat, f"{i:03d}.png")
            if write and path.endswith(tuple(broken)):
                open(path, "wb").close()
            elif write:
                Image.new("RGB", (16, 16), (value,) * 3).save(path)
            samples.append(Sample(path, cat, cat, DEFECT if defect else NORMAL, "crack" if defect else "good", "test"))
    return samples


def test_records_metrics_and_report_files(tmp_path):
    samples = make_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    pred = CountingPredictor()
    metrics = run_evaluation(samples, pred, out, batch_size=3, meta={"model": "fake"}, progress=False)
    recs = read_jsonl(os.path.join(out, "predictions.jsonl"))
    assert [r["path"] for r in recs] == [s.path for s in samples]
    keys = {"path", "category", "label", "completion", "think", "answer", "valid_format", "score", "seconds", "error"}
    assert keys <= set(recs[0])
    assert metrics["overall"]["accuracy"] == 1.0 and metrics["overall"]["n"] == 10
    assert pred.calls == 4 and pred.images == 10  # ceil(10 / 3) batches
    for name in ("metrics.json", "report.md", "overall.csv", "per_category.csv", "report.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["meta"]["model"] == "fake" and saved["overall"]["n"] == 10


def test_resume_does_not_recompute(tmp_path):
    samples = make_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    first = run_evaluation(samples, CountingPredictor(), out, batch_size=4, progress=False)
    again = CountingPredictor()
    second = run_evaluation(samples, again, out, batch_size=4, progress=False)
    assert again.calls == 0
    assert second["overall"] == first["overall"]
    assert len(read_jsonl(os.path.join(out, "predictions.jsonl"))) == 10


def test_resume_after_kill_with_torn_last_line(tmp_path):
    samples = make_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(samples, CountingPredictor(fail_after=2), out, batch_size=3, progress=False)
    path = os.path.join(out, "predictions.jsonl")
    assert len(read_jsonl(path)) == 6  # two finished batches survived the kill
    with open(path, "a") as f:
        f.write('{"path": "/half/written')  # a write cut by the kill
    rest = CountingPredictor()
    metrics = run_evaluation(samples, rest, out, batch_size=3, progress=False)
    assert rest.images == 4 and metrics["overall"]["n"] == 10
    assert [r["path"] for r in read_jsonl(path)] == [s.path for s in samples]


def test_unreadable_images_are_recorded_excluded_and_retried(tmp_path):
    data = str(tmp_path / "data")
    samples = make_dataset(data, broken=("cable/003.png",))
    out = str(tmp_path / "out")
    pred = CountingPredictor()
    metrics = run_evaluation(samples, pred, out, batch_size=4, progress=False)
    assert pred.images == 9
    assert metrics["overall"]["n"] == 9 and metrics["unreadable"]["n"] == 1
    bad = [r for r in read_jsonl(os.path.join(out, "predictions.jsonl")) if r["error"]]
    assert len(bad) == 1 and "empty (0 bytes)" in bad[0]["error"] and bad[0]["answer"] is None
    assert "unreadable images (excluded) | 1" in open(os.path.join(out, "report.md")).read()
    # Fix the file: a re-run predicts only that image.
    Image.new("RGB", (16, 16), (200,) * 3).save(os.path.join(data, "cable", "003.png"))
    again = CountingPredictor()
    metrics = run_evaluation(samples, again, out, batch_size=4, progress=False)
    assert again.images == 1 and metrics["overall"]["n"] == 10 and metrics["unreadable"]["n"] == 0
    assert len(read_jsonl(os.path.join(out, "predictions.jsonl"))) == 10  # deduplicated


def test_all_unreadable_is_an_error(tmp_path):
    samples = make_dataset(str(tmp_path / "data"), n_per_cat=1, defects_per_cat=0, broken=(".png",))
    with pytest.raises(RuntimeError, match="none of the 2 images could be read"):
        run_evaluation(samples, CountingPredictor(), str(tmp_path / "out"), progress=False)


def test_calibration_meets_target_fpr(tmp_path):
    samples = make_dataset(str(tmp_path / "data"), n_per_cat=10, defects_per_cat=3)
    out = str(tmp_path / "out")

    class Overlapping(CountingPredictor):
        # Always answers "normal", but its scores still rank defects higher: the calibrated threshold
        # recovers what the A/B answer misses.
        def predict(self, images, object_names):
            return [Prediction(p.completion, p.think, "B", True, p.score) for p in super().predict(images, object_names)]

    metrics = run_evaluation(samples, Overlapping(), out, calibrate=True, target_fpr=0.1, progress=False)
    cal = metrics["calibrated"]
    assert cal["fpr"] <= 0.1 and cal["target_fpr"] == 0.1
    assert metrics["overall"]["recall"]["defect"] == 0.0
    assert cal["overall"]["recall"]["defect"] == 1.0 and cal["overall"]["f1_macro"] > metrics["overall"]["f1_macro"]
    report = open(os.path.join(out, "report.md")).read()
    assert "False alarms vs. missed defects" in report and f"P(A) >= {cal['threshold']:.4f}" in report
    assert json.load(open(os.path.join(out, "metrics.json")))["calibrated"]["threshold"] == cal["threshold"]


def test_calibration_on_normal_images_only(tmp_path):
    """A line often has only good parts to calibrate on: the threshold still comes out."""
    samples = make_dataset(str(tmp_path / "data"), n_per_cat=10, defects_per_cat=0)
    metrics = run_evaluation(samples, CountingPredictor(), str(tmp_path / "out"), calibrate=True,
                             target_fpr=0.1, progress=False)
    cal = metrics["calibrated"]
    assert cal["threshold"] is not None and cal["fpr"] <= 0.1 and cal["overall"]["n_defect"] == 0
    assert 2 == sum(r["score"] >= cal["threshold"] for r in
                    read_jsonl(str(tmp_path / "out" / "predictions.jsonl")))  # 10% of 20 normals flagged
    only_defects = [{"label": "defect", "score": 0.7, "category": "a", "answer": "A"}]
    assert calibrated_metrics(only_defects, 0.05)["threshold"] is None


def test_select_subset_spreads_over_categories(tmp_path):
    samples = make_dataset(str(tmp_path / "data"), n_per_cat=10)
    sub = select_subset(samples, 4)
    assert len(sub) == 4 and {s.category for s in sub} == {"bottle", "cable"}
    assert select_subset(samples, -1) == samples and select_subset(samples, 100) == samples
    pred = CountingPredictor()
    metrics = run_evaluation(samples, pred, str(tmp_path / "out"), max_images=4, progress=False)
    assert pred.images == 4 and metrics["overall"]["n"] == 4


def test_duplicate_paths_rejected(tmp_path):
    samples = make_dataset(str(tmp_path / "data"), n_per_cat=2)
    with pytest.raises(ValueError, match="same image path twice"):
        run_evaluation(samples + samples[:1], CountingPredictor(), str(tmp_path / "out"), progress=False)


DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_eval_runner import CountingPredictor, make_dataset
    from ppiad.eval.runner import run_evaluation
    samples = make_dataset({data!r}, n_per_cat=5, write=False)  # the test wrote it: no rank rewrites a file another reads
    pred = CountingPredictor()
    metrics = run_evaluation(samples, pred, {out!r}, batch_size=2, progress=False)
    rank = os.environ.get("PADDLE_TRAINER_ID", "0")
    with open(os.path.join({out!r}, "done_rank" + rank + ".json"), "w") as f:
        json.dump({{"images": pred.images, "has_metrics": metrics is not None}}, f)
""")


def test_two_processes_split_the_work_and_rank0_merges(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_dataset(data, n_per_cat=5)  # written once here; the ranks only list it (write=False)
    script = tmp_path / "dist_eval.py"
    script.write_text(DIST_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), data=data, out=out))
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                           "--log_dir", str(tmp_path / "log"), str(script)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    logs = "".join(open(os.path.join(tmp_path / "log", f)).read() for f in os.listdir(tmp_path / "log"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs[-3000:]
    done = [json.load(open(os.path.join(out, f"done_rank{r}.json"))) for r in (0, 1)]
    assert [d["images"] for d in done] == [5, 5]
    assert [d["has_metrics"] for d in done] == [True, False]
    recs = read_jsonl(os.path.join(out, "predictions.jsonl"))
    assert len(recs) == 10 and len({r["path"] for r in recs}) == 10
    assert not [f for f in os.listdir(out) if f.startswith("predictions.rank")]
    assert json.load(open(os.path.join(out, "metrics.json")))["overall"]["n"] == 10


def test_fixed_threshold_from_elsewhere(tmp_path):
    samples = make_dataset(str(tmp_path / "data"), n_per_cat=10, defects_per_cat=3)
    out = str(tmp_path / "out")
    metrics = run_evaluation(samples, CountingPredictor(), out, threshold=0.99, progress=False)
    cal = metrics["calibrated"]
    assert cal["fixed"] and cal["threshold"] == 0.99
    assert cal["overall"]["recall"]["defect"] == 0.0 and cal["fpr"] == 0.0  # nothing is that dark
    assert "fixed beforehand" in open(os.path.join(out, "report.md")).read()
    with pytest.raises(ValueError, match="not both"):
        run_evaluation(samples, CountingPredictor(), out, calibrate=True, threshold=0.5, progress=False)


def test_eval_tool_compare_mode(tmp_path, capsys, monkeypatch):
    import importlib.util

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    spec = importlib.util.spec_from_file_location("ppiad_tool_eval_cmp", os.path.join(ROOT, "tools", "eval.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    samples = make_dataset(str(tmp_path / "data"))
    run_evaluation(samples, CountingPredictor(), str(tmp_path / "a"), progress=False)
    monkeypatch.chdir(tmp_path)
    assert tool.main(["--compare", f"base={tmp_path / 'a'}", f"tuned={tmp_path / 'a' / 'metrics.json'}",
                      "--output_dir", str(tmp_path / "cmp")]) == 0
    text = open(tmp_path / "cmp" / "comparison.md").read()
    assert "| base |" in text and "| tuned |" in text and "bottle" in text
    for argv, msg in ((["--compare", "nameless", "--output_dir", str(tmp_path)], "NAME=DIR"),
                      (["--compare", f"x={tmp_path / 'nothing'}", "--output_dir", str(tmp_path)], "no metrics.json"),
                      ([], "no model named")):  # no -c, no --model, no demo run in this directory
        with pytest.raises(SystemExit) as exc:
            tool.main(argv)
        assert exc.value.code == 2 and msg in capsys.readouterr().err
