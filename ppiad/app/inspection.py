"""Inspection as a service: one loaded model, uploads checked before they reach it, verdicts at a threshold.

Shared by the web page and the JSON API (ppiad/app/server.py), independent of both:
- `read_upload` turns uploaded bytes into an 8-bit RGB image through ppiad's one image loader, or raises
  `InputError` with one line (empty, too large, not an image);
- `Inspector` holds the model (any `ppiad.eval.predictor.Predictor`) and a lock, so concurrent requests queue
  instead of running the model twice at once;
- `decide` re-decides a verdict at a threshold without running the model again (the page's live threshold);
- `default_threshold` is the calibrated threshold of an evaluation's metrics.json, else eval.threshold, else 0.5;
- `results_csv` writes the page's download.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from ppiad.eval.predictor import Prediction

DEFAULT_MAX_UPLOAD_MB = 20.0


class InputError(ValueError):
    """An upload or a setting the user can fix; the message is one line fit to show as it is."""


@dataclass
class Inspection:
    """One image's result. p_defect = P(A) at the answer position (None when the model gave no score)."""
    name: str
    object: str
    p_defect: float | None = None
    answer: str | None = None       # the model's own letter: "A" (defect), "B" (normal) or None
    answer_valid: bool = False      # the completion follows <think>...</think> <answer>X</answer>
    reasoning: str = ""             # the <think> text, or the raw completion when the format is broken
    error: str | None = None        # why the image was not inspected (then everything else is empty)

    def verdict(self, threshold: float) -> str:
        return decide(self.p_defect, self.answer, threshold) if self.error is None else "error"

    def to_json(self, threshold: float) -> dict:
        """The API's answer: {verdict, p_defect, reasoning, answer_valid, threshold} and the object, answer."""
        return {"verdict": self.verdict(threshold), "p_defect": self.p_defect, "reasoning": self.reasoning,
                "answer_valid": self.answer_valid, "threshold": threshold, "object": self.object,
                "answer": self.answer}


def decide(p_defect: float | None, answer: str | None, threshold: float) -> str:
    """"defect" when P(defect) >= threshold, else "normal"; without a score, the model's letter decides
    ("unknown" when it gave none). The rule of tools/infer.py with eval.threshold (docs/usage.md)."""
    if p_defect is not None:
        return "defect" if p_defect >= threshold else "normal"
    return {"A": "defect", "B": "normal"}.get(answer or "", "unknown")


def check_threshold(value, source: str = "threshold") -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{source} must be a number in [0, 1], got '{value}'") from None
    if not 0.0 <= t <= 1.0:
        raise InputError(f"{source} must be in [0, 1], got {t:g}")
    return t


def default_threshold(metrics_path: str | None = None, configured: float = -1.0) -> tuple[float, str]:
    """(threshold, where it came from): the calibrated threshold in an evaluation's metrics.json (a file, or
    the evaluation folder), else `configured` (cfg.eval.threshold) when >= 0, else 0.5.

    Raises InputError naming the file when it is missing, unreadable or holds no calibrated threshold."""
    if metrics_path:
        path = os.path.join(metrics_path, "metrics.json") if os.path.isdir(metrics_path) else metrics_path
        try:
            with open(path, encoding="utf-8") as f:
                value = (json.load(f).get("calibrated") or {}).get("threshold")
        except (OSError, ValueError) as exc:
            raise InputError(f"--metrics '{path}': cannot read it ({exc})") from None
        if value is None:
            raise InputError(f"--metrics '{path}' has no calibrated threshold (run tools/eval.py with --calibrate)")
        return check_threshold(value, f"calibrated threshold in '{path}'"), f"calibrated ({path})"
    if configured is not None and configured >= 0:
        return check_threshold(configured, "eval.threshold"), "eval.threshold"
    return 0.5, "default"


def _check_size(shown: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InputError(f"'{shown}' is too large: {size / 1e6:.1f} MB, the limit is {max_bytes / 1e6:.1f} MB")


def read_upload(data: bytes, name: str, max_bytes: int, size: int | None = None) -> Image.Image:
    """Uploaded bytes -> 8-bit RGB image (ppiad.data.images.load_image), or InputError with one line.

    `size`: the upload's full size in bytes when `data` holds only its first max_bytes + 1 (the too-large message
    names the real size); default len(data)."""
    name = os.path.basename(name or "upload") or "upload"
    if not data:
        raise InputError(f"'{name}' is empty (0 bytes)")
    _check_size(name, max(len(data), size or 0), max_bytes)
    with tempfile.TemporaryDirectory(prefix="ppiad_upload_") as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return read_image_file(path, max_bytes, shown_name=name)


def read_image_file(path: str, max_bytes: int, shown_name: str | None = None) -> Image.Image:
    """A file on the server (an upload the web page stored, or a folder's image) -> RGB image, or InputError."""
    from ppiad.data.images import ImageLoadError, load_image

    shown = shown_name or os.path.basename(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"'{shown}': cannot read it ({exc.strerror})") from None
    _check_size(shown, size, max_bytes)
    try:
        return load_image(path)
    except ImageLoadError as exc:
        raise InputError(f"'{shown}': {exc.reason}") from None
    except Image.DecompressionBombError:
        raise InputError(f"'{shown}': too many pixels to decode safely") from None


class Inspector:
    """The model, loaded once, behind a lock: `inspect` is safe to call from concurrent requests (they queue)."""

    def __init__(self, predictor, batch_size: int = 8, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        if batch_size <= 0:
            raise InputError(f"batch size must be positive, got {batch_size}")
        if max_upload_mb <= 0:
            raise InputError(f"max upload size must be positive, got {max_upload_mb} MB")
        self.predictor = predictor
        self.batch_size = batch_size
        self.max_bytes = int(max_upload_mb * 1e6)
        self._lock = threading.Lock()
        self.images_inspected = 0

    def inspect(self, images: Sequence[Image.Image], names: Sequence[str], object_name: str) -> list[Inspection]:
        """Run the model on RGB images (in batches), one Inspection per image, in order."""
        out: list[Inspection] = []
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start:start + self.batch_size])
            with self._lock:
                preds = self.predictor.predict(batch, [object_name] * len(batch))
                self.images_inspected += len(batch)
            out += [_inspection(n, object_name, p) for n, p in zip(names[start:start + len(batch)], preds)]
        return out


def _inspection(name: str, object_name: str, pred: Prediction) -> Inspection:
    reasoning = pred.think if pred.think is not None else (pred.completion or "").strip()
    return Inspection(name=name, object=object_name, p_defect=pred.score, answer=pred.answer,
                      answer_valid=pred.valid_format, reasoning=reasoning)


CSV_COLUMNS = ("file", "object", "verdict", "p_defect", "threshold", "answer", "answer_valid", "reasoning", "error")


def results_csv(results: Sequence[Inspection], threshold: float) -> str:
    """The results as CSV text, one row per image (errors included), verdicts at `threshold`."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for r in results:
        writer.writerow([r.name, r.object, r.verdict(threshold), "" if r.p_defect is None else f"{r.p_defect:.6f}",
                         threshold, r.answer or "", r.answer_valid, r.reasoning, r.error or ""])
    return buf.getvalue()
