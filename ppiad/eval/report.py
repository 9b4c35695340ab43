"""Evaluation reports: metrics.json, a Markdown report laid out like the paper's tables, CSVs and a figure.

`metrics` is the output of `ppiad.eval.metrics.evaluate` ({"overall", "per_category"[, "calibrated"]}).
Markdown and figure show percentages with two decimals; the CSVs and metrics.json keep raw fractions.
Every file is written atomically, so a report is either complete or absent.
"""
from __future__ import annotations

import csv
import io
import json
import os
from datetime import datetime
from typing import Optional, Sequence, Union

from ppiad.utils.io import atomic_path, atomic_write_json, atomic_write_text

CSV_COLUMNS = ("n", "n_defect", "n_normal", "accuracy", "f1_macro", "balanced_accuracy", "invalid_rate",
               "n_invalid", "auroc", "ap", "n_scored", "precision_defect", "recall_defect", "f1_defect",
               "precision_normal", "recall_normal", "f1_normal", "tn", "fp", "fn", "tp")


def pct(x: Optional[float]) -> str:
    """A fraction as a percentage with two decimals; "-" when undefined."""
    return "-" if x is None else f"{100.0 * x:.2f}"


def acc_f1_cell(m: dict) -> str:
    """The paper's per-category cell: accuracy\\F1-macro in percent."""
    return f"{pct(m['accuracy'])}\\{pct(m['f1_macro'])}"


def _md_escape(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(map(_md_escape, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(_md_escape, row)) + " |" for row in rows]
    return "\n".join(lines)


def _overall_row(name: str, m: dict) -> list:
    return [name, pct(m["accuracy"]), pct(m["f1_macro"]), pct(m["balanced_accuracy"]),
            pct(m["invalid_rate"]), pct(m["auroc"]), pct(m["ap"]), m["n"]]


OVERALL_HEADER = ("Method", "Accuracy", "F1-macro", "Balanced acc.", "Invalid", "AUROC", "AP", "N")


def _wide_per_category(runs: Sequence[tuple[str, dict]]) -> str:
    """Paper Tables V/VI: one row per method, one column per category, cells accuracy\\F1-macro."""
    cats = sorted({c for _, m in runs for c in m["per_category"]})
    rows = [[name] + [acc_f1_cell(m["per_category"][c]) if c in m["per_category"] else "-" for c in cats]
            + [acc_f1_cell(m["overall"])] for name, m in runs]
    return _md_table(["Method", *cats, "All"], rows)


def _confusion_md(m: dict) -> str:
    (tn, fp), (fn, tp) = m["confusion"]
    rows = [["normal", tn, fp, m["invalid"]["normal"]], ["defect", fn, tp, m["invalid"]["defect"]]]
    table = _md_table(["true \\ predicted", "normal (B)", "defect (A)", "of which invalid"], rows)
    per_class = _md_table(["Class", "Precision", "Recall", "F1"],
                          [[c, pct(m["precision"][c]), pct(m["recall"][c]), pct(m["f1"][c])]
                           for c in ("defect", "normal")])
    return table + "\n\n" + per_class


def _per_category_md(metrics: dict) -> str:
    rows = []
    for cat, m in [*metrics["per_category"].items(), ("**All**", metrics["overall"])]:
        rows.append([cat, m["n"], pct(m["n_defect"] / m["n"]), acc_f1_cell(m), pct(m["balanced_accuracy"]),
                     pct(m["invalid_rate"]), pct(m["auroc"]), pct(m["ap"])])
    return _md_table(["Category", "N", "Defect share", "Accuracy\\F1-macro", "Balanced acc.", "Invalid",
                      "AUROC", "AP"], rows)


def _report_md(metrics: dict, title: str, meta: dict) -> str:
    method = str(meta.get("method", title))
    overall_rows = [_overall_row(method, metrics["overall"])]
    cal = metrics.get("calibrated")
    if cal:
        overall_rows.append(_overall_row(f"{method}, P(A) >= {cal['threshold']:.4g}", cal["overall"]))
    parts = [
        f"# {title}",
        _md_table(["Run", "Value"], [[k, v] for k, v in meta.items()]),
        "## Overall (cf. paper Table III)",
        _md_table(OVERALL_HEADER, overall_rows),
        "Percent. An invalid (unparseable) answer counts as wrong and is also counted in *Invalid*. "
        "AUROC/AP rank images by P(A) at the answer position; `-` = not available.",
        "## Per category (cf. paper Tables V/VI: accuracy\\F1-macro)",
        _wide_per_category([(method, metrics)]),
        _per_category_md(metrics),
        "## Confusion matrix (all images)",
        _confusion_md(metrics["overall"]),
    ]
    if cal:
        target = f" (target false-alarm rate {pct(cal['target_fpr'])} %)" if "target_fpr" in cal else ""
        parts += [f"## Calibrated: verdict P(A) >= {cal['threshold']:.6g}{target}",
                  _per_category_md(cal), _confusion_md(cal["overall"])]
    return "\n\n".join(parts) + "\n"


def _csv_row(m: dict) -> list:
    (tn, fp), (fn, tp) = m["confusion"]
    flat = dict(m, tn=tn, fp=fp, fn=fn, tp=tp)
    for kind in ("precision", "recall", "f1"):
        for c in ("defect", "normal"):
            flat[f"{kind}_{c}"] = m[kind][c]
    return ["" if flat.get(k) is None else flat[k] for k in CSV_COLUMNS]


def _write_csv(path: str, first_column: str, rows: list[tuple[str, dict]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([first_column, *CSV_COLUMNS])
    for name, m in rows:
        writer.writerow([name, *_csv_row(m)])
    atomic_write_text(path, buf.getvalue())


def _write_png(path: str, metrics: dict, title: str) -> None:
    # The object-oriented Agg API leaves pyplot's global backend alone (safe inside a training process).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [*metrics["per_category"], "All"]
    groups = [*metrics["per_category"].values(), metrics["overall"]]
    fig = Figure(figsize=(max(8.0, 0.55 * len(names) + 5.0), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    bars, heat = fig.subplots(1, 2, width_ratios=[3, 1])
    x = list(range(len(names)))
    width = 0.4
    bars.bar([i - width / 2 for i in x], [100 * m["accuracy"] for m in groups], width, label="accuracy")
    bars.bar([i + width / 2 for i in x], [100 * m["f1_macro"] for m in groups], width, label="F1-macro")
    bars.set_xticks(x, names, rotation=45, ha="right")
    bars.set_ylim(0, 112)  # headroom for the legend above 100 %
    bars.set_yticks(range(0, 101, 20))
    bars.set_ylabel("%")
    bars.legend(loc="upper right", ncol=2)
    bars.set_title(title)

    conf = metrics["overall"]["confusion"]
    heat.imshow(conf, cmap="Blues")
    top = max(max(row) for row in conf) or 1
    for r in range(2):
        for c in range(2):
            heat.text(c, r, str(conf[r][c]), ha="center", va="center",
                      color="white" if conf[r][c] > top / 2 else "black")
    heat.set_xticks([0, 1], ["normal", "defect"])
    heat.set_yticks([0, 1], ["normal", "defect"])
    heat.set_xlabel("predicted")
    heat.set_ylabel("true")
    heat.set_title("confusion\n(invalid = wrong)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_report(metrics: dict, out_dir: str, title: str, meta: Optional[dict] = None) -> dict:
    """Write metrics.json, report.md, overall.csv, per_category.csv and report.png into out_dir.

    meta: provenance shown in the report and stored in metrics.json (model, adapter, dataset, ...);
    "date" is added when absent. Returns {file kind: path}.
    """
    for key in ("overall", "per_category"):
        if key not in metrics:
            raise ValueError(f"metrics lacks {key!r}: pass the output of ppiad.eval.metrics.evaluate")
    meta = dict(meta or {})
    meta.setdefault("date", datetime.now().isoformat(timespec="seconds"))
    os.makedirs(out_dir, exist_ok=True)
    paths = {kind: os.path.join(out_dir, name) for kind, name in (
        ("json", "metrics.json"), ("md", "report.md"), ("overall_csv", "overall.csv"),
        ("per_category_csv", "per_category.csv"), ("png", "report.png"))}

    atomic_write_json(paths["json"], {"title": title, "meta": meta, **metrics})
    atomic_write_text(paths["md"], _report_md(metrics, title, meta))
    overall_rows = [("overall", metrics["overall"])]
    category_rows = list(metrics["per_category"].items())
    if metrics.get("calibrated"):
        overall_rows.append(("calibrated", metrics["calibrated"]["overall"]))
        category_rows += [(f"{c} (calibrated)", m) for c, m in metrics["calibrated"]["per_category"].items()]
    _write_csv(paths["overall_csv"], "scope", overall_rows)
    _write_csv(paths["per_category_csv"], "category", category_rows)
    _write_png(paths["png"], metrics, title)
    return paths


def load_metrics(path: str) -> dict:
    """Read a metrics.json written by write_report (or a directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    for key in ("overall", "per_category"):
        if key not in metrics:
            raise ValueError(f"{path}: lacks {key!r}; not a ppiad metrics.json")
    return metrics


def image_count(metrics: dict) -> int:
    """Images a metrics dict covers: `n_images` (unreadable ones included) when recorded, else overall n."""
    return int(metrics.get("n_images", metrics["overall"].get("n", 0)))


def image_count_warning(runs: Sequence[tuple[str, dict]]) -> Optional[str]:
    """A one-line warning when (name, metrics) runs cover different image counts, else None."""
    counts = [(name, image_count(m)) for name, m in runs]
    if len({n for _, n in counts}) <= 1:
        return None
    return ("the runs cover different numbers of images (" + ", ".join(f"{name}: {n}" for name, n in counts)
            + "); their figures are not comparable (evaluate each on the same images, e.g. without "
              "eval.max_images)")


def write_comparison(runs: Sequence[tuple[str, Union[dict, str]]], out_path: str,
                     title: str = "Comparison") -> str:
    """A paper-like comparison of several runs (e.g. base model vs LR-IAD) as Markdown at out_path.

    runs: (name, metrics) pairs; metrics may be an evaluate() dict or a path to a metrics.json / report dir.
    Writes Table III (overall) and Tables V/VI (per category, accuracy\\F1-macro) and returns the text.
    If the runs cover different numbers of images, the text starts with a warning naming each run's count
    (see image_count_warning): their figures are not comparable.
    """
    if not runs:
        raise ValueError("write_comparison needs at least one run")
    loaded = [(name, load_metrics(m) if isinstance(m, str) else m) for name, m in runs]
    warning = image_count_warning(loaded)
    text = "\n\n".join([
        f"# {title}",
        *([f"**Warning:** {warning}"] if warning else []),
        "## Overall (cf. paper Table III)",
        _md_table(OVERALL_HEADER, [_overall_row(name, m["overall"]) for name, m in loaded]),
        "## Per category (cf. paper Tables V/VI: accuracy\\F1-macro, percent)",
        _wide_per_category(loaded),
    ]) + "\n"
    atomic_write_text(out_path, text)
    return text
