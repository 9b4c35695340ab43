"""Rewards, class factors, and what the focal reward really changes in the advantages.

`python tests/test_rewards.py` prints the focal analysis table that docs/method.md holds (a test keeps the
two identical).
"""
import itertools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `python tests/...`

import numpy as np
import pytest

from ppiad.config import defaults
from ppiad.data.sample import Sample
from ppiad.rl.grpo import group_advantages, weighted_advantages
from ppiad.rl.rewards import REWARDS, class_factors, compute_rewards, factors_from_config, probability_correct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"A": "<think>a scratch on the cap</think> <answer>A</answer>",
        "B": "<think>nothing unusual</think>\n<answer>B</answer>"}
MALFORMED = "The object looks normal. Answer: B"
VISA_COUNTS = {"defect": 1200, "normal": 9621}


def sample(label):
    return Sample("/img.png", "cap", "cap", label, "good" if label == "normal" else "crack", "train")


def rewards_cfg(**focal):
    cfg = defaults().rewards
    cfg["focal"].update(focal)
    return cfg


# ---------------------------------------------------------------- single rewards
def test_registry_has_the_three_rewards():
    assert set(REWARDS) >= {"format", "accuracy", "focal"}


def test_format_and_accuracy():
    d, n = sample("defect"), sample("normal")
    comps = [GOOD["A"], GOOD["B"], GOOD["A"], "<answer>A</answer>", "<think>x</think> <answer>a</answer>"]
    samples = [d, d, n, d, d]
    assert REWARDS["format"](comps, samples) == [1.0, 1.0, 1.0, 0.0, 0.0]
    # a right letter without the strict format is not correct: lenient parsing never feeds rewards
    assert REWARDS["accuracy"](comps, samples) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_focal_reward_group_source():
    d = sample("defect")
    comps = [GOOD["A"], GOOD["A"], GOOD["B"], MALFORMED]
    got = REWARDS["focal"](comps, [d] * 4, group_size=4, alpha=2.0, gamma=2.0, p_source="group",
                           factors={"defect": 4.5, "normal": 0.5})
    # p = 2/4 correct; 2 * (1 - 0.5)^2 * 4.5 = 2.25 for the correct rows, 0 for the others
    assert got == pytest.approx([2.25, 2.25, 0.0, 0.0])


def test_probability_correct_token_source_and_nan_fallback():
    d, n = sample("defect"), sample("normal")
    correct = np.array([True, False, True, True])
    samples = [d, d, n, n]
    p = probability_correct(correct, samples, 2, "token", token_p=[0.8, float("nan"), 0.3, None])
    # defect: P(A) = 0.8; NaN -> the group share 1/2; normal: 1 - P(A) = 0.7; None -> group share 2/2
    np.testing.assert_allclose(p, [0.8, 0.5, 0.7, 1.0])
    with pytest.raises(ValueError, match="p_source = token needs token_p"):
        probability_correct(correct, samples, 2, "token", token_p=None)
    with pytest.raises(ValueError, match="4 completions"):
        probability_correct(correct, samples, 2, "token", token_p=[0.5])


# ---------------------------------------------------------------- class factors
def test_class_factors_auto_is_inverse_frequency_with_mean_one():
    f = class_factors(VISA_COUNTS)
    n = sum(VISA_COUNTS.values())
    assert f["defect"] == pytest.approx(n / (2 * 1200)) == pytest.approx(4.50875)
    assert f["normal"] == pytest.approx(n / (2 * 9621)) == pytest.approx(0.56237, rel=1e-4)
    mean = (1200 * f["defect"] + 9621 * f["normal"]) / n
    assert mean == pytest.approx(1.0)
    # MVTec-AD All: 1,258 defect, 4,096 normal
    f = class_factors(["defect"] * 1258 + ["normal"] * 4096)
    assert (1258 * f["defect"] + 4096 * f["normal"]) / 5354 == pytest.approx(1.0)
    assert f["defect"] == pytest.approx(2.128, rel=1e-3)


def test_class_factors_sqrt_inverse_is_milder_with_mean_one():
    f = class_factors(VISA_COUNTS, mode="sqrt_inverse")
    n = sum(VISA_COUNTS.values())
    assert (1200 * f["defect"] + 9621 * f["normal"]) / n == pytest.approx(1.0)
    # the ratio is the square root of auto's (9621 / 1200 = 8.02 -> 2.83)
    assert f["defect"] / f["normal"] == pytest.approx((9621 / 1200) ** 0.5)
    auto = class_factors(VISA_COUNTS)
    assert 1.0 < f["defect"] < auto["defect"] and auto["normal"] < f["normal"] < 1.0
    # 11% defects (the demo): 2.36 and 0.83
    f = class_factors(["defect"] * 11 + ["normal"] * 89, mode="sqrt_inverse")
    assert f["defect"] == pytest.approx(2.365, abs=1e-3) and f["normal"] == pytest.approx(0.831, abs=1e-3)
    assert class_factors([sample("normal")] * 3, mode="sqrt_inverse") == {"defect": 1.0, "normal": 1.0}


def test_class_factors_modes_and_errors():
    assert class_factors([sample("normal")] * 3) == {"defect": 1.0, "normal": 1.0}  # absent class -> 1
    assert class_factors(None, mode="uniform") == {"defect": 1.0, "normal": 1.0}
    assert class_factors(None, mode="manual", manual=(3, 0.5)) == {"defect": 3.0, "normal": 0.5}
    with pytest.raises(ValueError, match="unknown labels"):
        class_factors(["defect", "good"])
    with pytest.raises(ValueError, match="non-empty"):
        class_factors([])
    with pytest.raises(ValueError, match="factor_defect"):
        class_factors(None, mode="manual", manual=(-1, 1))



def test_factors_from_config_follows_the_configured_mode():
    focal = defaults().rewards["focal"]
    train = [sample("defect")] * 11 + [sample("normal")] * 89
    for mode in ("auto", "sqrt_inverse"):
        focal["class_factors"] = mode
        assert factors_from_config(focal, train) == class_factors(train, mode=mode)
        with pytest.raises(ValueError, match=f"class_factors = {mode} needs the training partition"):
            factors_from_config(focal)
    focal.update(class_factors="manual", factor_defect=3.0, factor_normal=0.5)
    assert factors_from_config(focal) == factors_from_config(focal, train) == {"defect": 3.0, "normal": 0.5}


# ---------------------------------------------------------------- compute_rewards
def test_compute_rewards_reward_mode_totals():
    cfg = rewards_cfg(mode="reward", class_factors="manual", factor_defect=2.0, factor_normal=1.0)
    comps = [GOOD["A"], GOOD["B"], MALFORMED, GOOD["A"]]
    total, per, w, part = compute_rewards(cfg, comps, [sample("defect")], 4)  # one sample per prompt is expanded
    # format [1,1,0,1]; correct [1,0,0,1]; p = 1/2; focal = 1 * 0.25 * 2 = 0.5 on the correct rows
    np.testing.assert_allclose(per["format"], [1, 1, 0, 1])
    np.testing.assert_allclose(per["accuracy"], [1, 0, 0, 1])
    np.testing.assert_allclose(per["focal"], [0.5, 0, 0, 0.5])
    np.testing.assert_allclose(total, [1.5, 1.0, 0.0, 1.5])
    np.testing.assert_allclose(w, 1.0)
    np.testing.assert_allclose(part, 0.0)


def test_compute_rewards_advantage_weight_mode():
    cfg = rewards_cfg(mode="advantage_weight", gamma=2.0, alpha=1.0)
    comps = [GOOD["A"], GOOD["B"], GOOD["B"], GOOD["B"], GOOD["B"], GOOD["B"], GOOD["B"], GOOD["A"]]
    samples = [sample("defect")] * 4 + [sample("normal")] * 4
    f = class_factors(VISA_COUNTS)
    total, per, w, part = compute_rewards(cfg, comps, samples, 4, class_factors=f)
    # correctness stays in the reward (format 1 + focal_weight * correct); focal modulation is the weight
    np.testing.assert_allclose(total, [2, 1, 1, 1, 2, 2, 2, 1])
    np.testing.assert_allclose(part, [1, 0, 0, 0, 1, 1, 1, 0])   # the weight acts on w_focal * correct only
    # defect group p = 1/4: 4.50875 * (2 * 0.75)^2; normal group p = 3/4: 0.56237 * (2 * 0.25)^2
    np.testing.assert_allclose(w[:4], f["defect"] * 2.25)
    np.testing.assert_allclose(w[4:], f["normal"] * 0.25)
    np.testing.assert_allclose(per["focal"], [f["defect"] * 0.5625, 0, 0, 0, *[f["normal"] * 0.0625] * 3, 0])


def test_compute_rewards_errors_name_the_key():
    comps = [GOOD["A"]] * 4
    with pytest.raises(ValueError, match="class_factors = auto"):
        compute_rewards(rewards_cfg(class_factors="auto"), comps, [sample("defect")] * 4, 4)
    with pytest.raises(ValueError, match="num_generations"):
        compute_rewards(rewards_cfg(class_factors="uniform"), comps, [sample("defect")] * 4, 3)
    with pytest.raises(ValueError, match="token_p"):
        compute_rewards(rewards_cfg(class_factors="uniform", p_source="token"), comps, [sample("defect")] * 4, 4)
    with pytest.raises(ValueError, match="samples"):
        compute_rewards(rewards_cfg(class_factors="uniform"), comps, [sample("defect")] * 3, 4)


# ---------------------------------------------------------------- what the focal reward changes
# One prompt of each class, G = 4. "ccww": two correct and two wrong completions, all well-formed.
# "ccwm": the last wrong one is malformed. Token probabilities of the correct option per row are given
# (None = no answer position). Factors from VisA All's class frequencies; alpha 1, gamma 2, format weight 1.
SCENARIOS = {
    "well_formed": ("ccww", [0.9, 0.6, 0.3, 0.2]),
    "one_malformed": ("ccwm", [0.9, 0.6, 0.3, None]),
    "hard": ("cwww", [0.6, 0.3, 0.2, 0.1]),     # 1 of 4 correct
    "easy": ("cccw", [0.9, 0.8, 0.7, 0.3]),     # 3 of 4 correct
}
SETTINGS = list(itertools.product(("group", "token"), ("auto", "uniform"), ("reward", "advantage_weight"),
                                  ("std", "mean_only")))


def scenario_advantages(setting, label, scenario):
    p_source, factors, mode, norm = setting
    pattern, p_correct = SCENARIOS[scenario]
    right = "A" if label == "defect" else "B"
    wrong = "B" if right == "A" else "A"
    comps = [GOOD[right] if c == "c" else GOOD[wrong] if c == "w" else MALFORMED for c in pattern]
    p_a = [None if q is None else (q if label == "defect" else 1 - q) for q in p_correct]
    cfg = defaults()
    cfg.rewards["focal"].update(p_source=p_source, class_factors=factors, mode=mode, alpha=1.0, gamma=2.0)
    f = class_factors(VISA_COUNTS, mode=factors)
    total, _, w, part = compute_rewards(cfg.rewards, comps, [sample(label)] * 4, 4, token_p=p_a, class_factors=f)
    return weighted_advantages(total, w, 4, norm, cfg.grpo.std_eps, weighted_part=part)


def size_ratio(a, b):
    return float(np.abs(a).sum() / np.abs(b).sum())


def focal_effects(setting):
    adv = {(lab, sc): scenario_advantages(setting, lab, sc)
           for lab in ("defect", "normal") for sc in ("well_formed", "one_malformed")}
    return {
        "defect": adv["defect", "well_formed"],
        "normal": adv["normal", "well_formed"],
        "class_ratio": size_ratio(adv["defect", "well_formed"], adv["normal", "well_formed"]),
        "class_ratio_malformed": size_ratio(adv["defect", "one_malformed"], adv["normal", "one_malformed"]),
        "hard_easy": size_ratio(scenario_advantages(setting, "defect", "hard"),
                                scenario_advantages(setting, "defect", "easy")),
    }


def focal_table() -> str:
    def vec(a):
        return " ".join(f"{x:+.2f}" for x in a)
    rows = ["| p_source | f | mode | norm | A, defect prompt (c c w w) | A, normal prompt (c c w w) | "
            "defect : normal | same, 1 malformed | hard : easy |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        e = focal_effects(s)
        rows.append(f"| {' | '.join(s)} | {vec(e['defect'])} | {vec(e['normal'])} | {e['class_ratio']:.2f} | "
                    f"{e['class_ratio_malformed']:.2f} | {e['hard_easy']:.2f} |")
    return "\n".join(rows)


F = class_factors(VISA_COUNTS)


@pytest.mark.parametrize("p_source", ["group", "token"])
def test_reward_mode_with_std_cancels_the_class_factor(p_source):
    # The known trap: f is constant within a group, and when the focal term is the only reward that varies
    # (all completions well-formed), the std division removes it: auto and uniform factors give the same A.
    auto = scenario_advantages((p_source, "auto", "reward", "std"), "defect", "well_formed")
    uniform = scenario_advantages((p_source, "uniform", "reward", "std"), "defect", "well_formed")
    np.testing.assert_allclose(auto, uniform, atol=2e-3)
    e = focal_effects((p_source, "auto", "reward", "std"))
    assert e["class_ratio"] == pytest.approx(1.0, abs=0.01)
    # with the format reward varying as well, it does not cancel completely (but stays far from f_d / f_n)
    assert 1.02 < abs(e["class_ratio_malformed"] - 1) + 1 < 2


def test_reward_mode_with_std_and_group_source_cancels_gamma_too():
    # hard (1/4 correct) and easy (3/4 correct) prompts get updates of the same size: focal = accuracy reward
    assert focal_effects(("group", "auto", "reward", "std"))["hard_easy"] == pytest.approx(1.0, abs=1e-3)


def test_mean_only_keeps_the_class_factor_in_reward_mode():
    e = focal_effects(("group", "auto", "reward", "mean_only"))
    assert e["class_ratio"] == pytest.approx(F["defect"] / F["normal"], rel=1e-6)   # 8.02
    assert e["hard_easy"] == pytest.approx((0.75 / 0.25) ** 2, rel=1e-6)            # 9
    # ... but the format reward then dominates the small normal-class focal values
    assert e["class_ratio_malformed"] < 0.3 * e["class_ratio"]


@pytest.mark.parametrize("norm", ["std", "mean_only"])
@pytest.mark.parametrize("p_source", ["group", "token"])
def test_advantage_weight_mode_gives_rare_and_hard_prompts_larger_updates(p_source, norm):
    e = focal_effects((p_source, "auto", "advantage_weight", norm))
    # the class factor survives exactly on the correctness signal; a malformed answer's format penalty is
    # the same for both classes (not scaled by f), so the ratio drops below f_d / f_n but stays well above 1
    assert e["class_ratio"] == pytest.approx(F["defect"] / F["normal"], rel=1e-3)
    assert 2.0 < e["class_ratio_malformed"] < F["defect"] / F["normal"] - 1
    assert e["hard_easy"] > 1.4
    if p_source == "group":
        assert e["hard_easy"] == pytest.approx(9.0, rel=1e-3)
    # uniform factors: no class difference
    assert focal_effects((p_source, "uniform", "advantage_weight", norm))["class_ratio"] == pytest.approx(1.0)


def test_advantage_weight_never_reverses_a_sign_but_token_rewards_can():
    for s in SETTINGS:
        if s[2] != "advantage_weight":
            continue
        a = scenario_advantages(s, "defect", "well_formed")
        plain = group_advantages([2, 2, 1, 1], 4, s[3])
        assert np.all(np.sign(a) == np.sign(plain)), s
    # token source in reward mode: the confident correct row (p = 0.9) earns less than the hesitant correct
    # row (p = 0.6) and ends up with a negative advantage, i.e. it is discouraged
    a = scenario_advantages(("token", "auto", "reward", "std"), "defect", "well_formed")
    assert a[0] < 0 < a[1]


def test_advantage_weight_pivot_keeps_step_size_across_gamma():
    # a half-right prompt keeps weight alpha * f for every gamma
    comps = [GOOD["A"], GOOD["A"], GOOD["B"], GOOD["B"]]
    for gamma in (0.0, 1.0, 2.0, 5.0):
        _, _, w, _ = compute_rewards(rewards_cfg(mode="advantage_weight", gamma=gamma), comps, [sample("defect")], 4,
                                  class_factors=F)
        np.testing.assert_allclose(w, F["defect"], rtol=1e-9)


def test_doc_table_is_current():
    doc = open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8").read()
    assert focal_table() in doc, "docs/method.md focal table is stale: regenerate with `python tests/test_rewards.py`"


if __name__ == "__main__":
    print(focal_table())
    print("VisA factors:", {k: round(v, 4) for k, v in F.items()}, "ratio", round(F["defect"] / F["normal"], 3),
          "gamma-2 hard:easy", math.pow(3, 2))


def test_focal_weight_zero_switches_the_advantage_weights_off_too():
    # format + accuracy only: the focal modulation must not scale the advantages behind the user's back
    cfg = rewards_cfg(mode="advantage_weight", gamma=2.0, alpha=1.0)
    cfg["focal_weight"], cfg["accuracy_weight"] = 0.0, 1.0
    comps = [GOOD["A"], GOOD["B"], GOOD["B"], GOOD["B"]]
    total, _, w, part = compute_rewards(cfg, comps, [sample("defect")], 4, class_factors=class_factors(VISA_COUNTS))
    np.testing.assert_allclose(w, 1.0)
    np.testing.assert_allclose(part, 0.0)
    np.testing.assert_allclose(total, [2, 1, 1, 1])
