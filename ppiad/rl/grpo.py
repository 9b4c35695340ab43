"""The GRPO objective: group-relative advantages and the clipped surrogate with a k3 KL penalty.

Formulas (docs/method.md has the derivation and the choices):
    A_i      = (r_i - mean_g(r)) / (s + eps)      s = std_g(r)  scale "group" (std unbiased, as TRL's torch.std)
                                                  s = std(r) over the optimizer step's whole batch, "batch"
    A_i      =  r_i - mean_g(r)                   scale "none" (Dr. GRPO)
    ratio_t  = exp(clip(logp_t - old_logp_t, -L, L))
    surr_t   = -min(ratio_t * A_i, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A_i)   (DAPO's clip-higher)
    kl_t     = exp(d_t) - d_t - 1,  d_t = clip(ref_t - logp_t, -L, L)   (k3 estimator of KL(policy || ref), >= 0)
    loss_t   = surr_t + beta * kl_t
L = LOG_RATIO_LIMIT = 20: both log-ratios are clamped before exp, as verl does for its KL (`kl_penalty`,
clamp to [-20, 20]), so that a large gap gives at most exp(20) = 4.9e8 (finite in float32 and bfloat16)
instead of inf; beyond the limit the term has no gradient. Far outside anything a healthy run sees (the
clipped surrogate ignores ratios beyond 1 +- epsilon anyway).
Reduction over completion tokens, `loss_type` (TRL's names):
    "grpo"    = mean over each completion's tokens, then mean over completions (Shao et al. 2024)
    "bnpo"    = sum over all tokens of the batch / number of tokens (DAPO, Yu et al. 2025)
    "dr_grpo" = sum over all tokens / (completions x max_new_tokens), a constant (Dr. GRPO, Liu et al. 2025)
"""
from __future__ import annotations

import numpy as np
import paddle

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
# the names of grpo.advantage_norm (until issue 16), still accepted by the functions of this module
_SCALE_ALIASES = {"std": "group", "mean_only": "none"}
LOG_RATIO_LIMIT = 20.0   # |log ratio| clamp before exp (see the module docstring)


def _scale_name(norm: str) -> str:
    name = _SCALE_ALIASES.get(norm, norm)
    if name not in SCALE_REWARDS:
        raise ValueError(f"grpo.scale_rewards must be one of {SCALE_REWARDS}, got {norm!r}")
    return name


def _as_array(rewards) -> np.ndarray:
    return np.asarray(rewards.numpy() if isinstance(rewards, paddle.Tensor) else rewards, dtype=np.float64)


def batch_std(rewards) -> float:
    """Unbiased std (ddof 1) of a flat reward vector: the divisor of scale_rewards='batch'. 0 for < 2 values."""
    r = _as_array(rewards).reshape(-1)
    return float(r.std(ddof=1)) if r.size > 1 else 0.0


def _divisor(g: np.ndarray, norm: str, eps: float, std_of_batch) -> np.ndarray:
    """[n_groups, 1] divisor of the centred rewards g [n_groups, G]."""
    name = _scale_name(norm)
    if name == "none":
        return np.ones_like(g[:, :1])
    if name == "batch":
        s = batch_std(g) if std_of_batch is None else float(std_of_batch)
        return np.full_like(g[:, :1], s + eps)
    std = g.std(axis=1, ddof=1, keepdims=True) if g.shape[1] > 1 else np.zeros_like(g[:, :1])
    return std + eps


def group_advantages(rewards, group_size: int, norm: str = "group", eps: float = 1e-4,
                     std_of_batch: float | None = None) -> np.ndarray:
    """Group-relative advantages, float32 [N], for prompt-major rewards [N] (N = B * G).

    norm (grpo.scale_rewards): "group" divides by the group's std (unbiased, ddof=1, as TRL computes it with
    torch.std), "batch" by `std_of_batch` (the std of every reward of the optimizer step, all processes; None =
    the std of `rewards`), "none" not at all; "std" / "mean_only" are the old names of "group" / "none".
    A group of one has no spread and gets advantage 0. ValueError for a ragged batch or an unknown norm.
    """
    r = _as_array(rewards)
    if r.ndim != 1 or group_size < 1 or r.size % group_size:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of grpo.num_generations={group_size}")
    g = r.reshape(-1, group_size)
    adv = (g - g.mean(axis=1, keepdims=True)) / _divisor(g, norm, eps, std_of_batch)
    return adv.reshape(-1).astype(np.float32)


def weighted_advantages(rewards, advantage_weights, group_size: int, norm: str = "group", eps: float = 1e-4,
                        weighted_part=None, std_of_batch: float | None = None) -> np.ndarray:
    """Group advantages with a per-row weight on one part of the reward, float32 [N].

    rewards r [N] = weighted_part w [N] + the rest. The group statistics (mean, std) are those of r, and the
    advantage splits linearly: A_i = (r_i - mean r) / s = (w_i - mean w) / s + (rest_i - mean rest) / s,
    with s the divisor of `group_advantages` (norm, std_of_batch). Only the first term is scaled:
        Â_i = A_i + (u_i - 1) * (w_i - mean_g w) / s.
    weighted_part None = all of r (Â = u * A). The weight acts after normalisation (a weight applied before
    it is cancelled by the std when it is constant within a group). A group whose rewards are all equal gets
    0, as in `group_advantages`. ValueError if the shapes differ.
    """
    adv = group_advantages(rewards, group_size, norm, eps, std_of_batch).astype(np.float64)
    u = np.asarray(advantage_weights, dtype=np.float64).reshape(-1)
    if u.shape != adv.shape:
        raise ValueError(f"{u.size} advantage weights for {adv.size} completions")
    if weighted_part is None:
        return (adv * u).astype(np.float32)
    w = np.asarray(weighted_part, dtype=np.float64).reshape(-1)
    if w.shape != adv.shape:
        raise ValueError(f"{w.size} weighted-part rewards for {adv.size} completions")
    r, w2 = _as_array(rewards).reshape(-1, group_size), w.reshape(-1, group_size)
    flat = np.ptp(r, axis=1, keepdims=True) == 0   # identical rewards: no signal, whatever the parts do
    scale = _divisor(r, norm, eps, std_of_batch)
    part = np.where(flat, 0.0, (w2 - w2.mean(axis=1, keepdims=True)) / scale).reshape(-1)
    return (adv + (u - 1.0) * part).astype(np.float32)


def zero_spread_groups(rewards, group_size: int) -> np.ndarray:
    """bool [n_groups]: True where every reward of the group is the same (all advantages 0, no signal)."""
    g = _as_array(rewards).reshape(-1, group_size)
    return np.ptp(g, axis=1) == 0


def truncated_rows(sequences, mask, max_new_tokens: int, eos_token_ids) -> np.ndarray:
    """bool [N]: completions that used all max_new_tokens tokens without ending in a stop token.

    sequences int [N, T] and mask [N, T] as in GenerationResult (the mask covers the stop token)."""
    seq = np.asarray(sequences.numpy() if isinstance(sequences, paddle.Tensor) else sequences)
    m = np.asarray(mask.numpy() if isinstance(mask, paddle.Tensor) else mask)
    lengths = m.sum(axis=1).astype(np.int64)
    last = seq[np.arange(seq.shape[0]), np.clip(lengths - 1, 0, None)] if seq.size else np.zeros(0, np.int64)
    return (lengths >= max_new_tokens) & ~np.isin(last, list(eos_token_ids))


def loss_normalizer_units(mask, loss_type: str, max_new_tokens: int | None = None) -> float:
    """What one micro-batch adds to the loss's divisor, float: completion tokens ("bnpo"), completions with at
    least one token ("grpo") or completions x max_new_tokens ("dr_grpo"). Summed over the micro-batches of an
    optimizer step (and the processes, trainer.token_normalizer) it is `grpo_loss`'s `normalizer`."""
    m = mask.numpy() if isinstance(mask, paddle.Tensor) else np.asarray(mask)
    if loss_type == "bnpo":
        return float(m.sum())
    if loss_type == "grpo":
        return float((m.sum(axis=1) > 0).sum())
    if loss_type == "dr_grpo":
        if not max_new_tokens:
            raise ValueError("loss_type 'dr_grpo' needs max_new_tokens (grpo.max_new_tokens)")
        return float(m.shape[0] * max_new_tokens)
    raise ValueError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _as_tensor(x, like: paddle.Tensor) -> paddle.Tensor:
    if isinstance(x, paddle.Tensor):
        return x.astype(like.dtype)
    return paddle.to_tensor(np.asarray(x), dtype=like.dtype)


def grpo_loss(logp: paddle.Tensor, old_logp, ref_logp, advantages, mask, epsilon: float = 0.2,
              beta: float = 0.04, loss_type: str = "bnpo", normalizer: float | None = None,
              epsilon_high: float | None = None, max_new_tokens: int | None = None):
    """GRPO loss -> (scalar loss with gradient through logp, stats dict of python floats).

    logp [B, T]: per-token log-probs of the sampled tokens under the current policy (with gradient).
    old_logp [B, T] or None: the rollout policy's log-probs (None = logp detached, i.e. one update per
        rollout: the ratio is 1 but its gradient is still the policy gradient).
    ref_logp [B, T] or None: the reference policy's log-probs (adapters disabled); None only with beta = 0.
    advantages [B]; mask [B, T]: 1 on completion tokens (0 on a row = the row adds no loss).
    epsilon / epsilon_high: the ratio is clipped to [1 - epsilon, 1 + epsilon_high] (None = epsilon).
    loss_type: "grpo", "bnpo" or "dr_grpo" (module docstring). normalizer: the divisor, in the units of
        `loss_normalizer_units`, for the whole optimizer step (gradient accumulation, several processes);
        None = this call's own (dr_grpo then needs max_new_tokens).
    stats: loss, kl (mean per token), clip_fraction (share of tokens where the clipped term is the active
        one), clip_ratio/low_mean (tokens with ratio < 1 - epsilon and A < 0), clip_ratio/high_mean (ratio >
        1 + epsilon_high and A > 0), ratio (mean per token), max_abs_log_ratio (largest |logp - old_logp|
        over completion tokens; exactly 0 at the first update of a rollout batch), surrogate (mean per token).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if len(logp.shape) != 2:
        raise ValueError(f"logp must be [B, T], got shape {list(logp.shape)}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = _as_tensor(mask, logp)
    old = logp.detach() if old_logp is None else _as_tensor(old_logp, logp).detach()
    adv = _as_tensor(advantages, logp).reshape([-1, 1]).detach()
    if adv.shape[0] != logp.shape[0]:
        raise ValueError(f"{adv.shape[0]} advantages for {logp.shape[0]} completions")

    ratio = paddle.exp(paddle.clip(logp - old, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = ratio * adv
    clipped = paddle.clip(ratio, 1.0 - epsilon, 1.0 + eps_high) * adv
    surrogate = -paddle.minimum(unclipped, clipped)
    per_token = surrogate
    kl = None
    if ref_logp is not None:  # also computed with beta = 0, so the drift from the reference is logged
        delta = paddle.clip(_as_tensor(ref_logp, logp).detach() - logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        kl = paddle.exp(delta) - delta - 1.0
    if beta != 0.0:
        if kl is None:
            raise ValueError("grpo.beta != 0 needs the reference log-probs (ref_logp)")
        per_token = per_token + beta * kl

    n_tokens = mask.sum()
    if normalizer is None:
        normalizer = loss_normalizer_units(mask, loss_type, max_new_tokens)
    denom = paddle.to_tensor(max(float(normalizer), 1e-8), dtype=logp.dtype)
    if loss_type == "grpo":
        seq_sum = (per_token * mask).sum(axis=1)
        loss = (seq_sum / paddle.clip(mask.sum(axis=1), min=1.0)).sum() / denom   # an empty row adds 0
    else:
        loss = (per_token * mask).sum() / denom

    with paddle.no_grad():
        tok = float(paddle.clip(n_tokens, min=1.0))
        is_clipped = (clipped < unclipped).astype(logp.dtype)  # min() picked the clipped term
        low = ((ratio < 1.0 - epsilon) & (adv < 0)).astype(logp.dtype)
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(logp.dtype)
        stats = {
            "loss": float(loss),
            "kl": float((kl * mask).sum()) / tok if kl is not None else 0.0,
            "clip_fraction": float((is_clipped * mask).sum()) / tok,
            "clip_ratio/low_mean": float((low * mask).sum()) / tok,
            "clip_ratio/high_mean": float((high * mask).sum()) / tok,
            "ratio": float((ratio * mask).sum()) / tok,
            "max_abs_log_ratio": float(((logp - old).abs() * mask).max()) if logp.size else 0.0,
            "surrogate": float((surrogate * mask).sum()) / tok,
        }
    return loss, stats
