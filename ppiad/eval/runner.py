"""Evaluate a Predictor on a dataset: resumable per-image predictions, then one report.

Files in `out_dir`:
- `predictions.jsonl`: one line per image (path, category, label, defect_type, object_name, completion,
  think, answer, valid_format, score, seconds, error), appended and flushed as each batch finishes, so a
  killed run loses at most one batch. A re-run skips every path already predicted (resume); images that
  failed to load are retried, since the file may have been fixed in between. At the end the file is
  rewritten once, deduplicated, in dataset order.
- Under `python -m paddle.distributed.launch`, rank r predicts samples[r::world] into
  `predictions.rank{r}.jsonl`; after a barrier rank 0 merges them into `predictions.jsonl` and writes the
  report, so the report is the same as a single-process run's.
- `metrics.json`, `report.md`, `overall.csv`, `per_category.csv`, `report.png` (ppiad.eval.report).

Unreadable images (ImageLoadError: missing, empty, truncated, not an image) are recorded with their error and
EXCLUDED from the accuracy/F1 figures: they say nothing about the model, and counting them as wrong would
blame it for a broken file. Their number is reported (`metrics["unreadable"]`, report meta) so a run with
missing files cannot pass unnoticed. Unparseable model answers, by contrast, are the model's fault: they
stay in the metrics and count as wrong (ppiad.eval.metrics).

Calibration: the plain figures use the model's A/B answer. With `calibrate=True`, the verdict is instead
"defect" when P(A) >= t, with t the threshold whose false-alarm rate on the normal images is at most
`target_fpr` (ppiad.eval.metrics.threshold_at_fpr); those figures go under `metrics["calibrated"]`. The
threshold is fitted on the evaluated images themselves, so it is an optimistic, best-case figure for that
false-alarm budget; to deploy, fit t on held-out normal images of the product.
"""
from __future__ import annotations

import glob
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ppiad.data.images import ImageLoadError, load_image
from ppiad.data.sample import DEFECT, Sample
from ppiad.eval.metrics import false_alarm_rate
from ppiad.eval.predictor import Predictor
from ppiad.utils.distributed import launched_world as dist_info  # (rank, world) from the launcher
from ppiad.utils.io import append_jsonl, atomic_write_text, read_jsonl

PREDICTIONS = "predictions.jsonl"


def select_subset(samples: Sequence[Sample], max_images: int) -> list[Sample]:
    """At most `max_images` samples, evenly spaced over the (sorted) dataset so every category appears."""
    samples = list(samples)
    if max_images is None or max_images < 0 or max_images >= len(samples):
        return samples
    if max_images == 0:
        return []
    idx = np.unique(np.linspace(0, len(samples) - 1, max_images).round().astype(int))
    return [samples[i] for i in idx]


def _barrier() -> None:
    import paddle.distributed as dist

    if not dist.is_initialized():
        dist.init_parallel_env()
    dist.barrier()


def _record(sample: Sample, prediction=None, seconds: float = 0.0, error: str | None = None,
            references: Sequence[str] = ()) -> dict:
    rec = {"path": sample.path, "category": sample.category, "label": sample.label,
           "defect_type": sample.defect_type, "object_name": sample.object_name,
           "completion": None, "think": None, "answer": None, "valid_format": False, "score": None,
           "seconds": round(seconds, 4), "error": error}
    if references:
        rec["references"] = list(references)
    if prediction is not None:
        rec.update(completion=prediction.completion, think=prediction.think, answer=prediction.answer,
                   valid_format=bool(prediction.valid_format), score=prediction.score)
    return rec


def try_load(path: str, bit_depth: str = "auto"):
    """(image, None) or (None, reason): a bad file is a result to record, not a reason to stop.
    `bit_depth`: ppiad.data.images.load_image's, for 16-bit files without sBIT (cfg.data.<partition>.bit_depth)."""
    from PIL import Image

    try:
        return load_image(path, bit_depth), None
    except ImageLoadError as exc:
        return None, str(exc)
    except Image.DecompressionBombError as exc:  # PIL refuses images above 2 x Image.MAX_IMAGE_PIXELS
        return None, f"cannot load image '{path}': too large to decode safely ({exc})"


def _existing(out_dir: str) -> dict[str, dict]:
    """Every finished record in out_dir (merged file first, then rank files), the last one per path winning."""
    by_path: dict[str, dict] = {}
    files = [os.path.join(out_dir, PREDICTIONS)] + sorted(glob.glob(os.path.join(out_dir, "predictions.rank*.jsonl")))
    for f in files:
        for rec in read_jsonl(f):
            if "path" in rec:
                by_path[rec["path"]] = rec
    return by_path


def drop_torn_tail(path: str) -> None:
    """Cut a partial last line (a write interrupted by a kill) so appended records start on a fresh line;
    otherwise the torn line would end up in the middle of the file and make it unreadable."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _load_with_references(path: str, refs: Sequence[str], bit_depth: str, cache: dict):
    """((query image, [reference images]), None) or (None, reason); references are loaded once per batch."""
    img, err = try_load(path, bit_depth)
    if img is None:
        return None, err
    loaded = []
    for r in refs:
        if r not in cache:
            cache[r] = try_load(r, bit_depth)
        ref_img, ref_err = cache[r]
        if ref_img is None:
            return None, f"reference image: {ref_err}"
        loaded.append(ref_img)
    return (img, loaded), None


def predict_samples(samples: Sequence[Sample], predictor: Predictor, out_path: str, batch_size: int = 8,
                    done: set[str] = frozenset(), progress: bool = True, num_workers: int = 0,
                    bit_depth: str = "auto", references=None) -> int:
    """Predict every sample whose path is not in `done`, appending records to `out_path`. Returns the count.

    `references` (a ppiad.data.references.ReferencePool, or None for 0-shot) draws each sample's k normal
    reference images; their paths go into the record, and an unreadable reference makes the sample's record
    an error naming it."""
    todo = [s for s in samples if s.path not in done]
    if not todo:
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    drop_torn_tail(out_path)
    bar = _progress(len(todo), progress)
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        for start in range(0, len(todo), max(1, batch_size)):
            batch = todo[start:start + max(1, batch_size)]
            refs = [references.draw(s) if references is not None else [] for s in batch]
            cache: dict = {}
            jobs = list(zip([s.path for s in batch], refs))
            load = lambda job: _load_with_references(job[0], job[1], bit_depth, cache)  # noqa: E731
            loaded = list(pool.map(load, jobs)) if pool else [load(j) for j in jobs]
            ok = [i for i, (img, _) in enumerate(loaded) if img is not None]
            t0 = time.perf_counter()
            kwargs = {"references": [loaded[i][0][1] for i in ok]} if references is not None else {}
            preds = (predictor.predict([loaded[i][0][0] for i in ok], [batch[i].object_name for i in ok], **kwargs)
                     if ok else [])
            if len(preds) != len(ok):
                raise RuntimeError(f"predictor returned {len(preds)} predictions for {len(ok)} images")
            per_image = (time.perf_counter() - t0) / max(1, len(ok))
            by_index = dict(zip(ok, preds))
            for i, sample in enumerate(batch):
                if i in by_index:
                    append_jsonl(out_path, _record(sample, by_index[i], per_image, references=refs[i]))
                else:
                    append_jsonl(out_path, _record(sample, error=loaded[i][1], references=refs[i]))
            bar.update(len(batch))
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    return len(todo)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="evaluating", file=sys.stderr, dynamic_ncols=True)


def calibrated_metrics(records: list[dict], target_fpr: float) -> dict:
    """Figures when the verdict is P(A) >= t, t chosen for a false-alarm rate <= target_fpr on normals.

    Records without a score stay in these figures as invalid answers (wrong), as in ppiad.eval.metrics.
    """
    from ppiad.eval.metrics import evaluate, threshold_at_fpr

    labels = [1 if r["label"] == DEFECT else 0 for r in records]
    scores = [r.get("score") for r in records]
    scored = [(y, s) for y, s in zip(labels, scores) if s is not None and math.isfinite(s)]
    if not any(y == 0 for y, _ in scored):
        # Normal images alone are enough (the usual case on a line: few or no defect samples yet).
        return {"threshold": None, "target_fpr": target_fpr, "n_scored": len(scored),
                "note": "needs P(A) scores on normal images"}
    threshold = threshold_at_fpr(labels, scores, target_fpr)
    normal_scores = [s for y, s in scored if y == 0]
    fpr = sum(s >= threshold for s in normal_scores) / len(normal_scores)
    cal = evaluate(records, threshold=threshold)["calibrated"]
    return {"threshold": float(threshold), "target_fpr": float(target_fpr), "fpr": float(fpr),
            "n_scored": len(scored), "overall": cal["overall"], "per_category": cal["per_category"]}


def fixed_threshold_metrics(records: list[dict], threshold: float) -> dict:
    """Figures with the verdict P(A) >= a threshold chosen elsewhere (cfg.eval.threshold)."""
    from ppiad.eval.metrics import evaluate

    if not any(r.get("score") is not None for r in records):
        return {"threshold": None, "note": "no P(A) scores in the predictions"}
    cal = evaluate(records, threshold=threshold)["calibrated"]
    (tn, fp), _ = cal["overall"]["confusion"]
    return {"threshold": float(threshold), "fixed": True, "fpr": fp / (tn + fp) if tn + fp else None,
            "n_scored": cal["overall"]["n_scored"], "overall": cal["overall"], "per_category": cal["per_category"]}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def calibrated_markdown(cal: dict) -> str:
    """The report.md section for the calibrated threshold, beside the plain A/B table."""
    lines = ["", "## False alarms vs. missed defects: A/B answer and threshold on P(A)", ""]
    if cal.get("threshold") is None:
        return "\n".join(lines + [f"Not computed: {cal.get('note', 'no scores')}.", ""])
    o = cal["overall"]
    recall = (o.get("recall") or {}).get("defect")
    if cal.get("fixed"):
        how = (f"Verdict = defect when P(A) >= {cal['threshold']:.4f}, a threshold fixed beforehand "
               f"(eval.threshold); measured false-alarm rate here: {_pct(cal['fpr'])}%.")
    else:
        how = (f"Verdict = defect when P(A) >= {cal['threshold']:.4f}, the threshold whose false-alarm rate on "
               f"the normal images is at most {100 * cal['target_fpr']:.1f}% (measured: {100 * cal['fpr']:.2f}%). "
               "The threshold is fitted on these same images: a best case for this false-alarm budget.")
    lines += [how + " An invalid A/B answer counts as wrong, so on a normal image it is a false alarm.", "",
              "| decision | accuracy | F1-macro | balanced acc. | defect recall | false-alarm rate |",
              "| --- | --- | --- | --- | --- | --- |"]
    plain = cal.get("_plain")
    if plain:
        lines.append(f"| A/B answer | {_pct(plain.get('accuracy'))} | {_pct(plain.get('f1_macro'))} | "
                     f"{_pct(plain.get('balanced_accuracy'))} | {_pct((plain.get('recall') or {}).get('defect'))} "
                     f"| {_pct(false_alarm_rate(plain))} |")
    lines.append(f"| P(A) >= {cal['threshold']:.4f} | {_pct(o.get('accuracy'))} | {_pct(o.get('f1_macro'))} | "
                 f"{_pct(o.get('balanced_accuracy'))} | {_pct(recall)} | {_pct(cal['fpr'])} |")
    return "\n".join(lines + [""])


def run_evaluation(samples: Sequence[Sample], predictor: Predictor, out_dir: str, batch_size: int = 8,
                   meta: dict | None = None, max_images: int = -1, *, calibrate: bool = False,
                   target_fpr: float = 0.05, threshold: float | None = None, title: str = "ppiad evaluation",
                   progress: bool = True, num_workers: int = 0, bit_depth: str = "auto",
                   references=None) -> dict | None:
    """Predict (resuming), then write the report. Returns the metrics dict (None on ranks other than 0).

    `references`: a ppiad.data.references.ReferencePool for k-shot prompts (None = 0-shot); metrics.json and
    the report state k and the pool (`reference_images`, `reference_pool`).

    `calibrate` fits a P(A) threshold for `target_fpr` on these images; `threshold` instead applies a fixed
    one (e.g. fitted on held-out normals). Either result goes under metrics["calibrated"]."""
    if calibrate and threshold is not None:
        raise ValueError("give either calibrate (fit a threshold here) or a fixed threshold, not both")
    from ppiad.eval.metrics import evaluate
    from ppiad.eval.report import write_report

    dataset = list(samples)
    samples = select_subset(dataset, max_images)
    if not samples:
        raise ValueError("no images to evaluate (empty dataset or max_images=0)")
    paths = [s.path for s in samples]
    if len(set(paths)) != len(paths):
        raise ValueError("the dataset lists the same image path twice; predictions are keyed by path")
    os.makedirs(out_dir, exist_ok=True)
    rank, world = dist_info()

    # Failed loads are retried on a re-run; real predictions are kept.
    done = {p for p, r in _existing(out_dir).items() if not r.get("error")}
    if world > 1:
        mine = samples[rank::world]
        predict_samples(mine, predictor, os.path.join(out_dir, f"predictions.rank{rank}.jsonl"), batch_size,
                        done, progress and rank == 0, num_workers, bit_depth, references)
        _barrier()
        if rank != 0:
            _barrier()  # wait until rank 0 has merged, so no rank exits while files are being rewritten
            return None
    else:
        predict_samples(samples, predictor, os.path.join(out_dir, PREDICTIONS), batch_size, done, progress,
                        num_workers, bit_depth, references)

    meta = dict(meta or {})
    meta["reference images (k-shot)"] = 0 if references is None else references.k
    if references is not None:
        meta["reference pool"] = references.describe()
    metrics = _finish(samples, out_dir, meta, calibrate, target_fpr, threshold, title, evaluate, write_report,
                      references, dataset)
    if world > 1:
        _barrier()
    return metrics


def _finish(samples, out_dir, meta, calibrate, target_fpr, threshold, title, evaluate, write_report,
            references=None, dataset=None) -> dict:
    """Merge the prediction files and write the report over EVERY recorded prediction of the dataset's images
    (`dataset`, default `samples`): a re-run on a subset (eval.max_images) never shrinks the report of a folder
    that already holds more predictions, so metrics.json always describes all of them."""
    by_path = _existing(out_dir)
    missing = [s.path for s in samples if s.path not in by_path]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no prediction after the run, e.g. {missing[0]}")
    dataset = samples if dataset is None else dataset
    order = {s.path: i for i, s in enumerate(dataset)}
    # Every recorded image of the dataset in dataset order (this run's subset and any earlier run's), then any
    # older records of images outside the dataset (kept in the file, not in the report).
    records = [by_path[s.path] for s in dataset if s.path in by_path]
    others = [r for p, r in by_path.items() if p not in order]
    atomic_write_text(os.path.join(out_dir, PREDICTIONS),
                      "".join(_json_line(r) for r in records + others))
    for f in glob.glob(os.path.join(out_dir, "predictions.rank*.jsonl")):
        os.remove(f)

    readable = [r for r in records if not r.get("error")]
    unreadable = [r for r in records if r.get("error")]
    if not readable:
        raise RuntimeError(f"none of the {len(records)} images could be read, e.g. {unreadable[0]['error']}")
    metrics = evaluate(readable)
    metrics["unreadable"] = {"n": len(unreadable), "paths": [r["path"] for r in unreadable][:100]}
    metrics["n_images"] = len(records)
    metrics["reference_images"] = 0 if references is None else references.k
    metrics["reference_pool"] = None if references is None else dict(references.source,
                                                                      description=references.describe())
    secs = [r["seconds"] for r in readable if r.get("seconds")]
    metrics["seconds_per_image"] = float(np.mean(secs)) if secs else None
    meta = dict(meta or {})
    meta["images"] = len(records)
    if len(records) > len(samples):
        meta["images"] = (f"{len(records)} (all recorded predictions of the dataset: {len(samples)} asked for by "
                          f"this run, the others from earlier runs into this folder)")
    meta["unreadable images (excluded)"] = len(unreadable)
    if calibrate or threshold is not None:
        cal = calibrated_metrics(readable, target_fpr) if calibrate else fixed_threshold_metrics(readable, threshold)
        if cal.get("threshold") is None:
            meta["calibration"] = f"not possible: {cal['note']}"
        else:
            metrics["calibrated"] = cal
            meta["calibration"] = (f"fixed threshold P(A) >= {cal['threshold']:.4f}" if cal.get("fixed") else
                                   f"P(A) >= {cal['threshold']:.4f} for <= {100 * target_fpr:.1f}% false alarms "
                                   "(fitted on these images)")
    write_report(metrics, out_dir, title, meta)  # also writes metrics.json, with title and meta
    if metrics.get("calibrated"):
        report = os.path.join(out_dir, "report.md")
        with open(report, encoding="utf-8") as f:
            text = f.read()
        atomic_write_text(report, text.rstrip("\n") + "\n" + calibrated_markdown(
            dict(metrics["calibrated"], _plain=metrics["overall"])))
    return metrics


def _json_line(rec: dict) -> str:
    import json

    return json.dumps(rec, ensure_ascii=False) + "\n"
