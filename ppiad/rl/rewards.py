"""Rewards for GRPO: small pure functions in a registry, and `compute_rewards` that combines them.

Every reward has the signature `fn(completions: list[str], samples: list[Sample], **ctx) -> list[float]`,
one value per completion. Rows are prompt-major: rows k*G .. k*G+G-1 are the G completions of prompt k, and
`samples[i]` is the sample that completion i answers.

Rewards (see docs/method.md for the formulas and the focal analysis):
- `format`:   1 if the completion is strictly `<think>...</think> <answer>X</answer>` (ppiad.prompt decides).
- `accuracy`: 1 if the strict answer is the sample's correct option (A defect, B normal). A completion that
  is not strictly formatted is never correct: lenient parsing is for reports only.
- `focal`:    alpha * (1 - p)^gamma * f[class] for a correct answer, else 0, with p the probability of the
  correct answer (`p_source` group or token) and f the per-class factor (`class_factors`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ppiad.data.sample import DEFECT, NORMAL
from ppiad.prompt import parse_completion

LABELS = (DEFECT, NORMAL)

REWARDS: dict[str, Callable[..., list[float]]] = {}


def register(name: str):
    def deco(fn):
        REWARDS[name] = fn
        return fn
    return deco


def _parsed(completions: Sequence[str], ctx: dict) -> list:
    # compute_rewards parses once and passes the results on; a direct call parses here.
    parsed = ctx.get("parsed")
    return parsed if parsed is not None else [parse_completion(t) for t in completions]


def correct_mask(completions: Sequence[str], samples: Sequence, **ctx) -> np.ndarray:
    """bool [N]: the completion's strict answer is the sample's correct option."""
    parsed = _parsed(completions, ctx)
    return np.array([p.answer is not None and p.answer == s.answer for p, s in zip(parsed, samples)], dtype=bool)


@register("format")
def format_reward(completions: Sequence[str], samples: Sequence, **ctx) -> list[float]:
    return [1.0 if p.strict else 0.0 for p in _parsed(completions, ctx)]


@register("accuracy")
def accuracy_reward(completions: Sequence[str], samples: Sequence, **ctx) -> list[float]:
    return correct_mask(completions, samples, **ctx).astype(float).tolist()


def group_share_correct(correct: np.ndarray, group_size: int) -> np.ndarray:
    """[N]: for every row, the share of its group's G completions that are correct."""
    share = correct.reshape(-1, group_size).mean(axis=1)
    return np.repeat(share, group_size)


def probability_correct(correct: np.ndarray, samples: Sequence, group_size: int, p_source: str = "group",
                        token_p: Sequence | np.ndarray | None = None) -> np.ndarray:
    """p [N], the probability the policy puts on the correct answer, for every row.

    group: share of the row's group that is correct (the same value for all G rows of a prompt).
    token: the policy's probability of the correct option at the row's answer position, from `token_p` =
      P(A) / (P(A) + P(B)) per row (the rollout's answer_scores): P(A) for defects, 1 - P(A) for normals.
      A row whose score is None/NaN (no answer position) falls back to its group share, so it still gets
      a probability estimate instead of silently counting as certain or as hopeless.
    """
    p_group = group_share_correct(correct, group_size)
    if p_source == "group":
        return p_group
    if p_source != "token":
        raise ValueError(f"rewards.focal.p_source must be 'group' or 'token', got {p_source!r}")
    if token_p is None:
        raise ValueError("rewards.focal.p_source = token needs token_p (the rollout's answer_scores, P(A) per "
                         "completion); pass it or set rewards.focal.p_source=group")
    p_a = np.array([np.nan if v is None else float(v) for v in token_p], dtype=np.float64)
    if p_a.shape != correct.shape:
        raise ValueError(f"token_p has {p_a.size} values for {correct.size} completions")
    is_defect = np.array([s.label == DEFECT for s in samples])
    p = np.where(is_defect, p_a, 1.0 - p_a)
    p = np.where(np.isnan(p), p_group, p)
    return np.clip(p, 0.0, 1.0)


DATA_DERIVED_FACTORS = ("auto", "sqrt_inverse")  # class-factor modes computed from the training partition


def class_factors(samples_or_counts, mode: str = "auto", manual: tuple[float, float] = (1.0, 1.0)) -> dict:
    """Per-class factor f -> {"defect": f_d, "normal": f_n}.

    samples_or_counts: the training partition (Samples, or label strings) or a mapping label -> count.
    auto:    inverse frequency, f_c = N / (K * n_c) with K the number of classes present. The mean of f over
             the training samples is then exactly 1 (sum_c n_c * N / (K n_c) / N = 1), so the overall reward
             scale is unchanged and only the balance between classes moves. VisA All (11.1% defects):
             f_defect = 4.51, f_normal = 0.56. A class absent from training gets 1.0 (it is never used).
    sqrt_inverse: f_c proportional to sqrt(N / n_c), normalised the same way to mean 1. Milder: at 11%
             defects 2.36 and 0.83 instead of 4.55 and 0.56. Under `auto` the expected push on an image the
             policy cannot yet tell apart is the same from both classes, so its P(A) hovers at 1/2 and greedy
             verdicts on it are coin flips; the milder factor lets such images settle on the majority answer
             "normal" (docs/results.md).
    uniform: 1 for both. manual: `manual` = (f_defect, f_normal).
    """
    if mode == "uniform":
        return {DEFECT: 1.0, NORMAL: 1.0}
    if mode == "manual":
        fd, fn = (float(v) for v in manual)
        if fd < 0 or fn < 0:
            raise ValueError(f"rewards.focal.factor_defect/factor_normal must be >= 0, got {fd}, {fn}")
        return {DEFECT: fd, NORMAL: fn}
    if mode not in DATA_DERIVED_FACTORS:
        raise ValueError(f"rewards.focal.class_factors must be auto, sqrt_inverse, uniform or manual, got {mode!r}")
    if isinstance(samples_or_counts, Mapping):
        counts = {str(k): int(v) for k, v in samples_or_counts.items()}
    else:
        counts = {}
        for s in samples_or_counts:
            label = s if isinstance(s, str) else s.label
            counts[label] = counts.get(label, 0) + 1
    unknown = set(counts) - set(LABELS)
    if unknown:
        raise ValueError(f"class_factors: unknown labels {sorted(unknown)}; expected {LABELS}")
    total = sum(counts.values())
    present = [c for c in LABELS if counts.get(c, 0) > 0]
    if total == 0:
        raise ValueError(f"class_factors(mode={mode!r}) needs a non-empty training partition")
    if mode == "auto":
        return {c: (total / (len(present) * counts[c]) if c in present else 1.0) for c in LABELS}
    raw = {c: np.sqrt(total / counts[c]) for c in present}
    mean = sum(counts[c] * raw[c] for c in present) / total
    return {c: (float(raw[c] / mean) if c in present else 1.0) for c in LABELS}


def focal_modulation(correct: np.ndarray, samples: Sequence, group_size: int, *, alpha: float, gamma: float,
                     p_source: str, factors: Mapping, token_p=None) -> np.ndarray:
    """alpha * (1 - p)^gamma * f[class] for every row (correct or not)."""
    p = probability_correct(correct, samples, group_size, p_source, token_p)
    f = np.array([float(factors[s.label]) for s in samples])
    return alpha * (1.0 - p) ** gamma * f


@register("focal")
def focal_reward(completions: Sequence[str], samples: Sequence, *, group_size: int, alpha: float = 1.0,
                 gamma: float = 2.0, p_source: str = "group", factors: Mapping | None = None, token_p=None,
                 **ctx) -> list[float]:
    correct = correct_mask(completions, samples, **ctx)
    factors = factors if factors is not None else class_factors(None, mode="uniform")
    mod = focal_modulation(correct, samples, group_size, alpha=alpha, gamma=gamma, p_source=p_source,
                           factors=factors, token_p=token_p)
    return (mod * correct).tolist()


class RewardScores(NamedTuple):
    """What `compute_rewards` returns, all float64 [N]: feed it to `ppiad.rl.grpo.weighted_advantages(
    total, advantage_weights, G, norm, eps, weighted_part=weighted_part)`."""

    total: np.ndarray               # the reward r_i the group statistics are taken over
    per_reward: dict                # name -> unweighted values of every reward (format, accuracy, focal)
    advantage_weights: np.ndarray   # u_i, the focal modulation (1 unless focal.mode = advantage_weight)
    weighted_part: np.ndarray       # the share of `total` that u_i scales: w_focal * correct_i (or zeros)


def compute_rewards(rewards_cfg: Mapping, completions: Sequence[str], samples: Sequence, group_size: int,
                    token_p=None, class_factors: Mapping | None = None) -> RewardScores:
    """Score N = B*G completions -> RewardScores(total, per_reward, advantage_weights, weighted_part).

    samples: one per completion (N), or one per prompt (N / G, repeated here for its G rows).
    per_reward holds the unweighted values of every reward (accuracy and focal always, for logging).
    focal.mode = reward:
        total = w_format*format + w_acc*accuracy + w_focal*focal;  advantage_weights = 1, weighted_part = 0.
    focal.mode = advantage_weight: the focal reward is split into its two parts. Its "was it correct" part
        stays in the reward, its modulation becomes a per-row weight on that part's advantage only:
        total = w_format*format + w_acc*accuracy + w_focal*correct,  weighted_part = w_focal*correct
        advantage_weights = alpha * f[class] * (2 * (1 - p))^gamma
        The format and accuracy rewards' share of the advantage is never scaled, so a group without a
        correct answer gets plain GRPO advantages (its weighted part is constant: zero advantage).
        The modulation is pivoted at p = 1/2: a prompt the policy gets right half of the time keeps
        weight alpha * f for every gamma (so a gamma ablation does not turn into a step-size ablation);
        harder rows weigh up to 2^gamma times more, easier ones less. Not renormalised over the batch: a
        batch of one prompt (the paper's layout) would cancel the weight again. See docs/method.md.
    class_factors: {"defect": f_d, "normal": f_n}; required for focal.class_factors = auto or sqrt_inverse
        (compute it once from the training partition with `factors_from_config(focal_cfg, train_samples)`),
        else derived from the config.
    """
    focal_cfg = rewards_cfg["focal"]
    n = len(completions)
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} completions do not split into groups of grpo.num_generations={group_size}")
    samples = list(samples)
    if len(samples) * group_size == n and group_size > 1:
        samples = [s for s in samples for _ in range(group_size)]
    if len(samples) != n:
        raise ValueError(f"{len(samples)} samples for {n} completions (need one per completion or per prompt)")
    factors = class_factors if class_factors is not None else factors_from_config(focal_cfg)

    parsed = [parse_completion(t) for t in completions]
    ctx = dict(parsed=parsed, group_size=group_size, token_p=token_p)
    correct = correct_mask(completions, samples, **ctx)
    fmt = np.asarray(format_reward(completions, samples, **ctx), dtype=np.float64)
    acc = correct.astype(np.float64)
    mod = focal_modulation(correct, samples, group_size, alpha=focal_cfg["alpha"], gamma=focal_cfg["gamma"],
                           p_source=focal_cfg["p_source"], factors=factors, token_p=token_p)
    focal = mod * correct
    per_reward = {"format": fmt, "accuracy": acc, "focal": focal}

    total = rewards_cfg["format_weight"] * fmt + rewards_cfg["accuracy_weight"] * acc
    mode = focal_cfg["mode"]
    if mode not in ("reward", "advantage_weight"):
        raise ValueError(f"rewards.focal.mode must be reward or advantage_weight, got {mode!r}")
    weights, weighted = np.ones(n), np.zeros(n)
    if mode == "reward":
        total = total + rewards_cfg["focal_weight"] * focal
    elif rewards_cfg["focal_weight"] != 0:  # advantage_weight; with the focal reward off, nothing to weigh
        weighted = rewards_cfg["focal_weight"] * acc
        total = total + weighted
        weights = mod * 2.0 ** focal_cfg["gamma"]  # (1 - p)^gamma -> (2 (1 - p))^gamma: the p = 1/2 pivot
    return RewardScores(total, per_reward, weights, weighted)


def factors_from_config(focal_cfg: Mapping, samples=None) -> dict:
    """The class factors `rewards.focal` asks for: from the training partition `samples` for the data-derived
    modes (auto, sqrt_inverse), from the config alone for uniform and manual. The one place that maps the
    config to `class_factors`, for the trainer and for the bench scripts that score rollouts like it."""
    mode = focal_cfg["class_factors"]
    if mode in DATA_DERIVED_FACTORS and samples is None:
        raise ValueError(f"rewards.focal.class_factors = {mode} needs the training partition's factors: pass "
                         "class_factors=ppiad.rl.rewards.factors_from_config(focal_cfg, train_samples) to "
                         "compute_rewards")
    return class_factors(samples, mode=mode, manual=(focal_cfg["factor_defect"], focal_cfg["factor_normal"]))
