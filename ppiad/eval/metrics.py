"""Classification metrics for anomaly verdicts (numpy only): the paper's accuracy and F1-macro, plus ours.

Conventions (class 1 = defect = option A, class 0 = normal = option B):

* **Invalid answers** (pred None: the completion did not follow the format) count as wrong: for accuracy,
  F1 and the confusion matrix an invalid prediction on a defect image is taken as "normal" and on a normal
  image as "defect". They are also counted in `n_invalid` / `invalid_rate` (and per true class in
  `invalid`), so a model cannot gain by refusing to answer.
* **F1-macro** is the mean of the F1 of both classes, always over the two classes {normal, defect}
  (= sklearn `f1_score(labels=[0, 1], average="macro", zero_division=0)`); a class with no predicted or no
  true samples has precision/recall/F1 0, not undefined. On a one-class subset this differs from sklearn's
  default, which would average over the classes present only.
* **Balanced accuracy** is the mean recall over the classes present in the labels (= sklearn's).
* **AUROC / AP** rank by score = P(A) = P(defect). They use the samples that have a finite score
  (`n_scored`; an invalid answer may still have a score) and are None when no scores were given or the
  scored samples hold only one class. AP follows sklearn's `average_precision_score`
  (sum over distinct thresholds of recall increase x precision; tied scores form one threshold), AUROC the
  Mann-Whitney statistic with ties counted half (= sklearn's `roc_auc_score`).
* Everything returned is plain Python (int, float, None, list, dict): JSON-serialisable as is.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np

from ppiad.prompt import OPTIONS

CLASS_NAMES = ("normal", "defect")  # index = class id
_LETTER_TO_CLASS = {letter: CLASS_NAMES.index(name) for letter, name in OPTIONS.items()}  # A->1, B->0
SCHEMA_KEYS = ("n", "accuracy", "f1_macro", "balanced_accuracy", "invalid_rate", "auroc", "ap")


def _labels_array(labels: Sequence) -> np.ndarray:
    y = np.asarray(list(labels))
    if y.size == 0:
        raise ValueError("no samples to evaluate")
    if not np.isin(y, (0, 1)).all() or y.dtype.kind not in "iub":
        raise ValueError(f"labels must be 0 (normal) or 1 (defect), got values {sorted(set(y.tolist()))[:5]}")
    return y.astype(np.int64)


def _scores_array(scores: Sequence, n: int) -> np.ndarray:
    """Scores as float64 with NaN where a score is missing (None or NaN)."""
    s = np.array([np.nan if v is None else float(v) for v in scores], dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"got {s.size} scores for {n} labels")
    if np.isinf(s).any():
        raise ValueError("scores must be finite probabilities (inf found)")
    return s


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else 0.0


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (ties count half); None with a single class."""
    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return None
    # Average ranks handle ties exactly like the Mann-Whitney U statistic.
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start:start + count]] = start + (count + 1) / 2.0
    u = ranks[labels == 1].sum() - pos * (pos + 1) / 2.0
    return float(u / (pos * neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """sklearn's average precision: sum_k (R_k - R_{k-1}) P_k over distinct score thresholds, high to low."""
    pos = int(labels.sum())
    if pos == 0 or pos == len(labels):
        return None
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # end index of each distinct threshold
    tp = np.cumsum(y)[last_of_tie]
    predicted = last_of_tie + 1
    precision = tp / predicted
    recall = tp / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def compute_metrics(labels: Sequence[int], preds: Sequence[Optional[int]],
                    scores: Optional[Sequence[Optional[float]]] = None) -> dict:
    """Metrics of one set of verdicts. labels: 0/1; preds: 0/1/None (None = invalid); scores: P(defect)."""
    y = _labels_array(labels)
    preds = list(preds)
    if len(preds) != len(y):
        raise ValueError(f"got {len(preds)} predictions for {len(y)} labels")
    bad = [p for p in preds if p is not None and p not in (0, 1)]
    if bad:
        raise ValueError(f"predictions must be 0, 1 or None (invalid), got {bad[0]!r}")
    invalid = np.array([p is None for p in preds])
    # An invalid answer is wrong whatever the truth: take the opposite class.
    p = np.array([1 - t if p is None else p for p, t in zip(preds, y)], dtype=np.int64)

    n = len(y)
    confusion = [[int(np.sum((y == t) & (p == q))) for q in (0, 1)] for t in (0, 1)]
    per_class = {}
    for c, name in enumerate(CLASS_NAMES):
        tp = confusion[c][c]
        prec = _safe_div(tp, confusion[0][c] + confusion[1][c])
        rec = _safe_div(tp, confusion[c][0] + confusion[c][1])
        per_class[name] = (prec, rec, _safe_div(2 * prec * rec, prec + rec))
    present = [c for c in (0, 1) if np.any(y == c)]

    out = {
        "n": n,
        "accuracy": _safe_div(confusion[0][0] + confusion[1][1], n),
        "f1_macro": float(np.mean([per_class[name][2] for name in CLASS_NAMES])),
        "balanced_accuracy": float(np.mean([per_class[CLASS_NAMES[c]][1] for c in present])),
        "invalid_rate": _safe_div(invalid.sum(), n),
        "auroc": None,
        "ap": None,
        "n_invalid": int(invalid.sum()),
        "n_defect": int(y.sum()),
        "n_normal": int(n - y.sum()),
        "precision": {name: per_class[name][0] for name in CLASS_NAMES[::-1]},
        "recall": {name: per_class[name][1] for name in CLASS_NAMES[::-1]},
        "f1": {name: per_class[name][2] for name in CLASS_NAMES[::-1]},
        "confusion": confusion,
        "invalid": {name: int(np.sum(invalid & (y == c))) for c, name in enumerate(CLASS_NAMES)},
        "n_scored": 0,
    }
    if scores is not None:
        s = _scores_array(scores, n)
        has = ~np.isnan(s)
        out["n_scored"] = int(has.sum())
        if has.any():
            out["auroc"] = roc_auc(y[has], s[has])
            out["ap"] = average_precision(y[has], s[has])
    return out


def false_alarm_rate(metrics: dict) -> Optional[float]:
    """Share of normal images flagged as defects, from a metrics dict's confusion matrix (None without normals)."""
    conf = metrics.get("confusion")
    if not conf:
        return None
    tn, fp = conf[0]
    return fp / (tn + fp) if tn + fp else None


def threshold_at_fpr(labels: Sequence[int], scores: Sequence[float], target_fpr: float) -> float:
    """The P(A) threshold t (predict defect when score >= t) with the highest defect recall whose false-alarm
    rate on normal samples is <= target_fpr. It is one of the scores, or just above the highest score when
    no score meets the target (then nothing is flagged). Samples without a finite score are ignored."""
    if not 0.0 <= float(target_fpr) <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    y = _labels_array(labels)
    s = _scores_array(scores, len(y))
    has = ~np.isnan(s)
    y, s = y[has], s[has]
    n_normal = int(np.sum(y == 0))
    if n_normal == 0:
        raise ValueError("threshold_at_fpr needs scored normal samples to measure false alarms")
    candidates = np.unique(s)  # ascending: the first that meets the target flags the most defects
    normal_sorted = np.sort(s[y == 0])
    false_alarms = n_normal - np.searchsorted(normal_sorted, candidates, side="left")  # normals >= t
    ok = np.nonzero(false_alarms / n_normal <= target_fpr)[0]
    if len(ok):
        return float(candidates[ok[0]])
    return float(np.nextafter(float(s.max()), math.inf))


def metrics_at_threshold(labels: Sequence[int], scores: Sequence[Optional[float]], threshold: float) -> dict:
    """compute_metrics with the verdict score >= threshold; a sample without a score is an invalid answer."""
    s = _scores_array(scores, len(list(labels)))
    preds = [None if math.isnan(v) else int(v >= threshold) for v in s]
    out = compute_metrics(labels, preds, scores)
    out["threshold"] = float(threshold)
    return out


def _read_records(records: Iterable[dict]) -> tuple[list, list, list, list, bool]:
    cats, labels, preds, scores = [], [], [], []
    any_score = False
    for i, r in enumerate(records):
        for key in ("category", "label", "answer"):
            if key not in r:
                raise ValueError(f"record {i}: missing key {key!r}")
        if r["label"] not in CLASS_NAMES:
            raise ValueError(f"record {i}: 'label' must be 'normal' or 'defect', got {r['label']!r}")
        if r["answer"] is not None and r["answer"] not in _LETTER_TO_CLASS:
            raise ValueError(f"record {i}: 'answer' must be 'A', 'B' or None, got {r['answer']!r}")
        cats.append(str(r["category"]))
        labels.append(CLASS_NAMES.index(r["label"]))
        preds.append(None if r["answer"] is None else _LETTER_TO_CLASS[r["answer"]])
        score = r.get("score")
        any_score |= score is not None
        scores.append(score)
    if not labels:
        raise ValueError("no records to evaluate")
    return cats, labels, preds, scores, any_score


def _grouped(cats, labels, preds, scores, metric_fn) -> dict:
    result = {"overall": metric_fn(labels, preds, scores), "per_category": {}}
    for cat in sorted(set(cats)):
        idx = [i for i, c in enumerate(cats) if c == cat]
        result["per_category"][cat] = metric_fn([labels[i] for i in idx], [preds[i] for i in idx],
                                                None if scores is None else [scores[i] for i in idx])
    return result


def evaluate(records: Iterable[dict], threshold: Optional[float] = None) -> dict:
    """{"overall": metrics, "per_category": {category: metrics}} from prediction records.

    A record holds "category", "label" ("normal"/"defect"), "answer" ("A"/"B"/None) and optionally "score"
    (P(A)). With `threshold`, the result also holds "calibrated": the same structure with the verdict
    score >= threshold instead of the generated answer.
    """
    cats, labels, preds, scores, any_score = _read_records(records)
    result = _grouped(cats, labels, preds, scores if any_score else None, compute_metrics)
    if threshold is not None:
        if not any_score:
            raise ValueError("a calibrated threshold needs records with a 'score'")
        calibrated = _grouped(cats, labels, [None] * len(labels), scores,
                              lambda y, _p, s: metrics_at_threshold(y, s, threshold))
        result["calibrated"] = {"threshold": float(threshold), **calibrated}
    return result
