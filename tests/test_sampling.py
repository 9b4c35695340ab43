"""Rollout sampling filters: transformers' order (temperature, top-k, top-p, min-p), checked against
transformers 4.51.3's own warpers in the reference virtualenv."""
import json
import os
import subprocess

import numpy as np
import paddle
import pytest

from ppiad.models.generation import _pick, sampling_probs, sampling_scores
from tests.conftest import require_ref_python

HERE = os.path.dirname(os.path.abspath(__file__))
ISSUE_P = [0.5, 0.2, 0.2, 0.1]


def probs(logits, **kw) -> np.ndarray:
    return sampling_probs(sampling_scores(paddle.to_tensor(np.asarray(logits, dtype=np.float32)), **kw)).numpy()


def test_top_p_runs_before_min_p():
    # top-p 0.75 keeps 0.5 + 0.2 + 0.2 (0.7 < 0.75 needs the third token); min-p 0.25 then drops nothing more
    # (0.2 >= 0.25 * 0.5). The other order (min-p first) would renormalise to [0.56 .. 0.11] and top-p would
    # cut the third token: [0.71, 0.29, 0, 0].
    got = probs(np.log([ISSUE_P]), top_p=0.75, min_p=0.25)
    np.testing.assert_allclose(got, [[0.5 / 0.9, 0.2 / 0.9, 0.2 / 0.9, 0.0]], rtol=1e-6, atol=0)
    assert got[0, 3] == 0.0   # exactly zero: a removed token can never be drawn


def test_every_filter_keeps_the_top_token():
    logits = np.log([[0.97, 0.01, 0.01, 0.01]])
    for kw in ({"top_p": 0.01}, {"min_p": 0.999}, {"top_k": 1}, {"top_k": 1, "top_p": 0.01, "min_p": 0.99}):
        np.testing.assert_allclose(probs(logits, **kw), [[1, 0, 0, 0]], err_msg=str(kw))


def test_pick_draws_only_kept_tokens():
    paddle.seed(0)
    logits = paddle.to_tensor(np.log(np.array([ISSUE_P] * 2000, dtype=np.float32)))
    drawn = _pick(logits, True, 1.0, 0.75, 0, 0.25).numpy()
    assert set(drawn.tolist()) == {0, 1, 2}
    assert abs(np.mean(drawn == 0) - 0.5 / 0.9) < 0.04


SETTINGS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.0, 0, 0.75, 0.0), (1.0, 0, 1.0, 0.1),
    (0.7, 10, 0.9, 0.05), (1.3, 0, 0.75, 0.25), (1.0, 3, 0.5, 0.3), (0.5, 0, 0.95, 0.02), (2.0, 20, 0.8, 0.0),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref_python = require_ref_python()
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 50)) * 2.5).astype(np.float32)   # no ties in practice
    cases = [{"logits": logits.tolist(), "temperature": t, "top_k": k, "top_p": p, "min_p": m}
             for t, k, p, m in SETTINGS]
    cases.append({"logits": np.log([ISSUE_P]).astype(np.float32).tolist(), "temperature": 1.0, "top_k": 0,
                  "top_p": 0.75, "min_p": 0.25})
    work = tmp_path_factory.mktemp("sampling_ref")
    (work / "spec.json").write_text(json.dumps({"cases": cases}))
    subprocess.run([ref_python, os.path.join(HERE, "ref", "sampling_reference.py"), str(work / "spec.json"),
                    str(work / "out.json")], check=True, capture_output=True, timeout=600)
    return cases, json.loads((work / "out.json").read_text())["cases"]


def test_filters_match_transformers(reference):
    cases, outs = reference
    for case, out in zip(cases, outs):
        want = np.array(out["probs"], dtype=np.float64)
        got = probs(case["logits"], temperature=case["temperature"], top_k=case["top_k"], top_p=case["top_p"],
                    min_p=case["min_p"])
        label = f"{case['temperature'], case['top_k'], case['top_p'], case['min_p']} ({out['warpers']})"
        np.testing.assert_array_equal(got == 0, want == 0, err_msg=f"kept tokens differ for {label}")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=label)
    # the reference really applied top-p before min-p
    assert outs[-1]["warpers"] == ["TopPLogitsWarper", "MinPLogitsWarper"]
    np.testing.assert_allclose(outs[-1]["probs"], [[0.5 / 0.9, 0.2 / 0.9, 0.2 / 0.9, 0.0]], rtol=1e-6)
