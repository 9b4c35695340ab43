import json
import math

import numpy as np
import pytest
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, f1_score, precision_score,
                             recall_score, roc_auc_score)

from ppiad.eval.metrics import (SCHEMA_KEYS, compute_metrics, evaluate, metrics_at_threshold,
                                threshold_at_fpr)


def _check_fractions(m):
    for key in ("accuracy", "f1_macro", "balanced_accuracy", "invalid_rate"):
        assert 0.0 <= m[key] <= 1.0, key
    for key in ("auroc", "ap"):
        assert m[key] is None or 0.0 <= m[key] <= 1.0, key


def _random_cases():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 40))
        y = rng.integers(0, 2, n)
        p = rng.integers(0, 2, n)
        if trial % 6 == 1:
            y[:] = 0                         # all normal
        if trial % 6 == 2:
            p[:] = 0                         # no defect predicted
        if trial % 6 == 3:
            y[:] = 1
            p[:] = 1                         # all one class, all right
        if trial % 6 == 4:
            p = 1 - y                        # all wrong
        yield y, p


@pytest.mark.parametrize("case", list(_random_cases()), ids=lambda c: f"n{len(c[0])}")
def test_matches_sklearn_on_valid_predictions(case):
    y, p = case
    m = compute_metrics(y.tolist(), p.tolist())
    kw = dict(labels=[0, 1], zero_division=0)
    assert m["f1_macro"] == pytest.approx(f1_score(y, p, average="macro", **kw), abs=1e-12)
    assert m["f1"]["defect"] == pytest.approx(f1_score(y, p, pos_label=1, average="binary", zero_division=0))
    assert m["precision"]["normal"] == pytest.approx(precision_score(y, p, pos_label=0, zero_division=0))
    assert m["recall"]["defect"] == pytest.approx(recall_score(y, p, pos_label=1, zero_division=0))
    assert m["accuracy"] == pytest.approx(np.mean(y == p))
    if len(set(y.tolist()) | set(p.tolist())) == 2:
        # with both classes present anywhere, sklearn's default label set agrees too
        assert m["f1_macro"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(_sk_balanced(y, p))
    assert m["invalid_rate"] == 0.0 and m["n_invalid"] == 0
    assert sum(map(sum, m["confusion"])) == len(y)
    _check_fractions(m)


def _sk_balanced(y, p):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return balanced_accuracy_score(y, p)


def test_degenerate_values():
    # always "normal" on a 3:1 set: the DESIGN.md baseline shape (accuracy high, F1-macro below 0.5)
    m = compute_metrics([0, 0, 0, 1], [0, 0, 0, 0])
    assert m["accuracy"] == 0.75
    assert m["f1"]["defect"] == 0.0 and m["precision"]["defect"] == 0.0
    assert m["f1_macro"] == pytest.approx((6 / 7) / 2)
    assert m["balanced_accuracy"] == 0.5
    # one class only, all right: defect F1 is 0 by the two-class convention
    m = compute_metrics([0, 0], [0, 0])
    assert m["accuracy"] == 1.0 and m["f1_macro"] == 0.5 and m["balanced_accuracy"] == 1.0


def test_invalid_predictions_count_as_wrong():
    y = [1, 1, 0, 0]
    m = compute_metrics(y, [1, None, 0, None])
    assert m["n_invalid"] == 2 and m["invalid_rate"] == 0.5
    assert m["invalid"] == {"normal": 1, "defect": 1}
    assert m["accuracy"] == 0.5
    # same as if each invalid answer were the opposite class
    flipped = [1, 0, 0, 1]
    assert m["f1_macro"] == pytest.approx(f1_score(y, flipped, average="macro", zero_division=0))
    assert m["confusion"] == [[1, 1], [1, 1]]
    # invalid answers never help: all invalid scores 0
    m = compute_metrics(y, [None] * 4)
    assert m["accuracy"] == 0.0 and m["f1_macro"] == 0.0 and m["invalid_rate"] == 1.0


def test_confusion_layout():
    m = compute_metrics([0, 0, 0, 1, 1], [0, 1, 1, 1, 0])
    # rows: true normal, true defect; cols: predicted normal, predicted defect
    assert m["confusion"] == [[1, 2], [1, 1]]


@pytest.mark.parametrize("seed", range(12))
def test_auroc_ap_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    # coarse scores make many ties
    s = np.round(rng.random(n), 1) if seed % 2 else rng.random(n)
    m = compute_metrics(y.tolist(), y.tolist(), s.tolist())
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["n_scored"] == n


def test_scores_missing_or_one_class():
    assert compute_metrics([0, 1], [0, 1])["auroc"] is None
    m = compute_metrics([0, 0, 1], [0, 0, 1], [0.1, 0.2, None])   # scored subset has one class
    assert m["auroc"] is None and m["ap"] is None and m["n_scored"] == 2
    m = compute_metrics([0, 1, 1, 0], [0, 1, None, 0], [0.1, 0.9, float("nan"), 0.3])
    assert m["n_scored"] == 3 and m["auroc"] == 1.0 and m["ap"] == 1.0
    # an invalid answer with a score is still ranked
    m = compute_metrics([0, 1], [0, None], [0.4, 0.6])
    assert m["auroc"] == 1.0 and m["n_scored"] == 2


def test_bad_input_errors():
    with pytest.raises(ValueError, match="no samples"):
        compute_metrics([], [])
    with pytest.raises(ValueError, match="labels"):
        compute_metrics([0, 2], [0, 1])
    with pytest.raises(ValueError, match="predictions"):
        compute_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="predictions"):
        compute_metrics([0, 1], [0, "A"])
    with pytest.raises(ValueError, match="scores"):
        compute_metrics([0, 1], [0, 1], [0.5])


def test_threshold_at_fpr():
    y = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    s = [.01, .02, .03, .04, .05, .06, .07, .08, .09, .5, .3, .6, .7, .05]
    t = threshold_at_fpr(y, s, 0.1)     # one false alarm of ten allowed: the normal at .5
    assert t == 0.3
    pred = np.array(s) >= t
    assert np.sum(pred & (np.array(y) == 0)) / 10 <= 0.1
    assert threshold_at_fpr(y, s, 0.0) == 0.6
    assert threshold_at_fpr(y, s, 1.0) == 0.01
    # the highest score is a normal one and no false alarm is allowed: flag nothing
    t = threshold_at_fpr([0, 1], [0.9, 0.2], 0.0)
    assert t > 0.9 and not (np.array([0.9, 0.2]) >= t).any()
    with pytest.raises(ValueError, match="normal"):
        threshold_at_fpr([1, 1], [0.1, 0.2], 0.1)
    with pytest.raises(ValueError, match="target_fpr"):
        threshold_at_fpr([0, 1], [0.1, 0.2], 1.5)


def test_threshold_is_optimal_on_random_data():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1), 2)
    for target in (0.0, 0.05, 0.2):
        t = threshold_at_fpr(y.tolist(), s.tolist(), target)
        fpr = np.mean(s[y == 0] >= t)
        recall = np.mean(s[y == 1] >= t)
        assert fpr <= target
        # no other threshold meeting the target has a higher recall
        for u in np.unique(s):
            if np.mean(s[y == 0] >= u) <= target:
                assert np.mean(s[y == 1] >= u) <= recall


def test_metrics_at_threshold():
    m = metrics_at_threshold([0, 1, 1, 0], [0.2, 0.8, None, 0.6], 0.5)
    assert m["threshold"] == 0.5 and m["n_invalid"] == 1
    assert m["confusion"] == [[1, 1], [1, 1]]


def _records():
    return [
        {"category": "pill", "label": "defect", "answer": "A", "score": 0.9},
        {"category": "pill", "label": "normal", "answer": "B", "score": 0.2},
        {"category": "pill", "label": "normal", "answer": None, "score": 0.6},
        {"category": "bottle", "label": "defect", "answer": "B", "score": 0.4},
        {"category": "bottle", "label": "normal", "answer": "B", "score": None},
    ]


def test_evaluate_schema_and_json():
    res = evaluate(_records())
    assert set(res) == {"overall", "per_category"}
    assert list(res["per_category"]) == ["bottle", "pill"]
    for m in [res["overall"], *res["per_category"].values()]:
        assert set(SCHEMA_KEYS) <= set(m)
        _check_fractions(m)
    assert res["overall"]["n"] == 5 and res["overall"]["n_invalid"] == 1
    assert res["overall"]["accuracy"] == pytest.approx(3 / 5)  # pill: right, right, invalid; bottle: wrong, right
    assert res["per_category"]["pill"]["accuracy"] == pytest.approx(2 / 3)
    assert res["per_category"]["bottle"]["auroc"] is None       # one scored sample, one class
    assert res["overall"]["n_scored"] == 4
    assert json.loads(json.dumps(res)) == res                    # plain JSON types only


def test_evaluate_without_scores_and_calibrated():
    recs = [{k: v for k, v in r.items() if k != "score"} for r in _records()]
    res = evaluate(recs)
    assert res["overall"]["auroc"] is None and res["overall"]["ap"] is None
    with pytest.raises(ValueError, match="score"):
        evaluate(recs, threshold=0.5)
    res = evaluate(_records(), threshold=0.5)
    cal = res["calibrated"]
    assert cal["threshold"] == 0.5
    # verdicts from scores: pill 0.9->A right, 0.2->B right, 0.6->A wrong; bottle 0.4->B wrong, None invalid
    assert cal["overall"]["accuracy"] == pytest.approx(2 / 5)
    assert cal["per_category"]["pill"]["accuracy"] == pytest.approx(2 / 3)
    assert cal["overall"]["n_invalid"] == 1
    assert not math.isnan(cal["overall"]["f1_macro"])


def test_evaluate_bad_records():
    with pytest.raises(ValueError, match="record 0: missing key 'label'"):
        evaluate([{"category": "x", "answer": "A"}])
    with pytest.raises(ValueError, match="record 0: 'label'"):
        evaluate([{"category": "x", "label": "good", "answer": "A"}])
    with pytest.raises(ValueError, match="record 1: 'answer'"):
        evaluate([{"category": "x", "label": "normal", "answer": "B"},
                  {"category": "x", "label": "normal", "answer": "C"}])
    with pytest.raises(ValueError, match="no records"):
        evaluate([])
