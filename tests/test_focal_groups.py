"""The focal advantage weight on single groups: hand-computed values, one test per row of the table in
docs/method.md ("The focal weight, group by group").

Setting of every row: G = 4, format weight 1, focal weight 1, accuracy weight 0, focal.mode advantage_weight,
p from the group, alpha 1, gamma 2, VisA All class factors (f_defect = 10821 / 2400 = 4.50875,
f_normal = 10821 / 19242 = 0.56236), advantage_norm std (ddof 1), std_eps 1e-4. The letters are the four
completions: A / B = a well-formed answer with that letter, m = a malformed completion.

Hand computation, e.g. the "A A B m" defect row: format [1 1 1 0], correct [1 1 0 0], r [2 2 1 0], mean 1.25,
std 0.9574, u = 4.50875 * (2 * (1 - 1/2))^2 = 4.50875. The advantage splits into the format share
(format - 0.75) / 0.9575 = [+0.26 +0.26 +0.26 -0.78] and the correctness share (correct - 0.5) / 0.9575 =
[+0.52 +0.52 -0.52 -0.52]; only the latter is multiplied by u: [+2.62 +2.62 -2.09 -3.14]. The old rule
multiplied the whole advantage [+0.78 +0.78 -0.26 -1.31] by u: [+3.53 +3.53 -1.18 -5.89].
"""
import os

import numpy as np
import pytest

from ppiad.config import defaults
from ppiad.data.sample import Sample
from ppiad.rl.grpo import group_advantages, weighted_advantages
from ppiad.rl.rewards import class_factors, compute_rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VISA_COUNTS = {"defect": 1200, "normal": 9621}
TEXT = {"A": "<think>a scratch on the cap</think> <answer>A</answer>",
        "B": "<think>nothing unusual</think> <answer>B</answer>",
        "m": "The object looks normal. Answer: B"}

# image, completions, plain GRPO advantages, the old rule (u x whole advantage), the rule now (hand-computed)
ROWS = [
    ("defect", "B B B m", "+0.50 +0.50 +0.50 -1.50", "+9.02 +9.02 +9.02 -27.05", "+0.50 +0.50 +0.50 -1.50"),
    ("normal", "A A A m", "+0.50 +0.50 +0.50 -1.50", "+1.12 +1.12 +1.12 -3.37", "+0.50 +0.50 +0.50 -1.50"),
    ("defect", "A A B B", "+0.87 +0.87 -0.87 -0.87", "+3.90 +3.90 -3.90 -3.90", "+3.90 +3.90 -3.90 -3.90"),
    ("normal", "B B A A", "+0.87 +0.87 -0.87 -0.87", "+0.49 +0.49 -0.49 -0.49", "+0.49 +0.49 -0.49 -0.49"),
    ("defect", "A B B B", "+1.50 -0.50 -0.50 -0.50", "+15.21 -5.07 -5.07 -5.07", "+15.21 -5.07 -5.07 -5.07"),
    ("defect", "A A B m", "+0.78 +0.78 -0.26 -1.31", "+3.53 +3.53 -1.18 -5.89", "+2.62 +2.62 -2.09 -3.14"),
    ("defect", "A m m m", "+1.50 -0.50 -0.50 -0.50", "+15.21 -5.07 -5.07 -5.07", "+8.36 -2.79 -2.79 -2.79"),
    ("defect", "A A A A", "+0.00 +0.00 +0.00 +0.00", "+0.00 +0.00 +0.00 +0.00", "+0.00 +0.00 +0.00 +0.00"),
    ("defect", "m m m m", "+0.00 +0.00 +0.00 +0.00", "+0.00 +0.00 +0.00 +0.00", "+0.00 +0.00 +0.00 +0.00"),
]


def doc_row(row) -> str:
    return "| " + " | ".join(row) + " |"


def vec(text: str) -> np.ndarray:
    return np.array([float(x) for x in text.split()])


def group_scores(label: str, letters: str):
    cfg = defaults()
    cfg.rewards["focal"].update(mode="advantage_weight", p_source="group", class_factors="auto", alpha=1.0,
                                gamma=2.0)
    sample = Sample("/img.png", "cap", "cap", label, "good" if label == "normal" else "crack", "train")
    comps = [TEXT[c] for c in letters.split()]
    scores = compute_rewards(cfg.rewards, comps, [sample], 4, class_factors=class_factors(VISA_COUNTS))
    return scores, cfg.grpo


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0]}:{r[1]}" for r in ROWS])
def test_group_row(row):
    label, letters, plain, old, new = row
    scores, g = group_scores(label, letters)
    np.testing.assert_allclose(group_advantages(scores.total, 4, "std", g.std_eps), vec(plain), atol=0.006)
    np.testing.assert_allclose(weighted_advantages(scores.total, scores.advantage_weights, 4, "std", g.std_eps),
                               vec(old), atol=0.006)
    got = weighted_advantages(scores.total, scores.advantage_weights, 4, "std", g.std_eps,
                              weighted_part=scores.weighted_part)
    np.testing.assert_allclose(got, vec(new), atol=0.006)
    assert doc_row(row) in open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8").read(), \
        f"docs/method.md lacks the row {doc_row(row)}"


def test_a_group_without_a_correct_answer_gets_plain_grpo_for_any_weight():
    # whatever p, f, alpha and gamma make of u, a group in which nobody is right only sees the format signal
    for letters in ("B B B m", "B m m m", "B B m m"):
        for alpha, gamma, f in ((1.0, 2.0, "auto"), (3.0, 5.0, "auto"), (0.5, 0.0, "uniform")):
            cfg = defaults()
            cfg.rewards["focal"].update(mode="advantage_weight", alpha=alpha, gamma=gamma, class_factors=f)
            s = Sample("/img.png", "cap", "cap", "defect", "crack", "train")
            sc = compute_rewards(cfg.rewards, [TEXT[c] for c in letters.split()], [s], 4,
                                 class_factors=class_factors(VISA_COUNTS, mode=f))
            got = weighted_advantages(sc.total, sc.advantage_weights, 4, "std", 1e-4,
                                      weighted_part=sc.weighted_part)
            np.testing.assert_allclose(got, group_advantages(sc.total, 4, "std", 1e-4), rtol=1e-6)


def test_weighted_part_with_token_p_scales_each_row_by_its_own_weight():
    # rewards r = format + correct; part = correct; weights differ per row
    r, part, u = [2, 1, 1, 0], [1, 0, 0, 0], [2.0, 3.0, 4.0, 5.0]
    s = np.std(r, ddof=1) + 1e-4                    # 0.8166
    a = (np.array(r) - 1.0) / s                     # [+1.22 0 0 -1.22]
    p = (np.array(part) - 0.25) / s                 # [+0.92 -0.31 -0.31 -0.31]
    want = a + (np.array(u) - 1) * p
    np.testing.assert_allclose(weighted_advantages(r, u, 4, weighted_part=part), want, rtol=1e-6)
    np.testing.assert_allclose(want, [2.14, -0.61, -0.92, -2.45], atol=0.01)
    # mean_only: no division
    np.testing.assert_allclose(weighted_advantages(r, u, 4, "mean_only", weighted_part=part),
                               [1 + 0.75 * 1, -0.25 * 2, -0.25 * 3, -1 - 0.25 * 4], rtol=1e-6)
    with pytest.raises(ValueError, match="weighted-part"):
        weighted_advantages(r, u, 4, weighted_part=[1, 0])


def test_correct_answers_never_get_a_negative_advantage():
    # every group of 4 over {A, B, m}, both classes, both p sources: a correct row's two shares are >= 0
    import itertools

    f = class_factors(VISA_COUNTS)
    for label in ("defect", "normal"):
        right = "A" if label == "defect" else "B"
        sample = Sample("/img.png", "cap", "cap", label, "good" if label == "normal" else "crack", "train")
        for letters in itertools.product("ABm", repeat=4):
            for p_source in ("group", "token"):
                cfg = defaults()
                cfg.rewards["focal"].update(mode="advantage_weight", p_source=p_source)
                token_p = [0.9, 0.2, 0.6, 0.05]
                sc = compute_rewards(cfg.rewards, [TEXT[c] for c in letters], [sample], 4, token_p=token_p,
                                     class_factors=f)
                adv = weighted_advantages(sc.total, sc.advantage_weights, 4, "std", 1e-4,
                                          weighted_part=sc.weighted_part)
                correct = np.array([c == right for c in letters])
                assert (adv[correct] >= 0).all(), (label, letters, p_source, adv)
