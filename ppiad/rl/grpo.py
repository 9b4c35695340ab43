"""The GRPO objective: group-relative advantages and the clipped surrogate with a k3 KL penalty.

Formulas (docs/method.md has the derivation and the choices):
    A_i      = (r_i - mean_g(r)) / (std_g(r) + eps)          norm = "std"   (std unbiased, as TRL's torch.std)
    A_i      =  r_i - mean_g(r)                              norm = "mean_only"
    ratio_t  = exp(clip(logp_t - old_logp_t, -L, L))
    surr_t   = -min(ratio_t * A_i, clip(ratio_t, 1 - epsilon, 1 + epsilon) * A_i)
    kl_t     = exp(d_t) - d_t - 1,  d_t = clip(ref_t - logp_t, -L, L)   (k3 estimator of KL(policy || ref), >= 0)
    loss_t   = surr_t + beta * kl_t
L = LOG_RATIO_LIMIT = 20: both log-ratios are clamped before exp, as verl does for its KL (`kl_penalty`,
clamp to [-20, 20]), so that a large gap gives at most exp(20) = 4.9e8 (finite in float32 and bfloat16)
instead of inf; beyond the limit the term has no gradient. Far outside anything a healthy run sees (the
clipped surrogate ignores ratios beyond 1 +- epsilon anyway).
averaged over completion tokens: "token" = sum over all tokens of the batch / number of tokens (default),
"sequence" = mean over each completion's tokens, then mean over completions.
"""
from __future__ import annotations

import numpy as np
import paddle

AVERAGING = ("token", "sequence")
LOG_RATIO_LIMIT = 20.0   # |log ratio| clamp before exp (see the module docstring)


def group_advantages(rewards, group_size: int, norm: str = "std", eps: float = 1e-4) -> np.ndarray:
    """Group-normalised advantages, float32 [N], for prompt-major rewards [N] (N = B * G).

    The std is the unbiased one (ddof=1), as TRL computes it with torch.std; a group of one has no spread
    and gets advantage 0 (with G=1 there is nothing to compare against).
    """
    r = np.asarray(rewards.numpy() if isinstance(rewards, paddle.Tensor) else rewards, dtype=np.float64)
    if r.ndim != 1 or group_size < 1 or r.size % group_size:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of grpo.num_generations={group_size}")
    g = r.reshape(-1, group_size)
    centred = g - g.mean(axis=1, keepdims=True)
    if norm == "mean_only":
        adv = centred
    elif norm == "std":
        std = g.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(g[:, :1])
        adv = centred / (std + eps)
    else:
        raise ValueError(f"grpo.advantage_norm must be 'std' or 'mean_only', got {norm!r}")
    return adv.reshape(-1).astype(np.float32)


def weighted_advantages(rewards, advantage_weights, group_size: int, norm: str = "std", eps: float = 1e-4,
                        weighted_part=None) -> np.ndarray:
    """Group advantages with a per-row weight on one part of the reward, float32 [N].

    rewards r [N] = weighted_part w [N] + the rest. The group statistics (mean, std) are those of r, and the
    advantage splits linearly: A_i = (r_i - mean r) / s = (w_i - mean w) / s + (rest_i - mean rest) / s,
    with s = std_g(r) + eps (norm std) or 1 (mean_only). Only the first term is scaled:
        Â_i = A_i + (u_i - 1) * (w_i - mean_g w) / s.
    weighted_part None = all of r (Â = u * A). The weight acts after normalisation (a weight applied before
    it is cancelled by the std when it is constant within a group). A group whose rewards are all equal gets
    0, as in `group_advantages`. ValueError if the shapes differ.
    """
    adv = group_advantages(rewards, group_size, norm, eps).astype(np.float64)
    u = np.asarray(advantage_weights, dtype=np.float64).reshape(-1)
    if u.shape != adv.shape:
        raise ValueError(f"{u.size} advantage weights for {adv.size} completions")
    if weighted_part is None:
        return (adv * u).astype(np.float32)
    w = np.asarray(weighted_part, dtype=np.float64).reshape(-1)
    if w.shape != adv.shape:
        raise ValueError(f"{w.size} weighted-part rewards for {adv.size} completions")
    r = np.asarray(rewards.numpy() if isinstance(rewards, paddle.Tensor) else rewards, dtype=np.float64)
    r, w2 = r.reshape(-1, group_size), w.reshape(-1, group_size)
    flat = np.ptp(r, axis=1, keepdims=True) == 0   # identical rewards: no signal, whatever the parts do
    if norm == "std" and group_size > 1:
        scale = r.std(axis=1, ddof=1, keepdims=True) + eps
    else:
        scale = np.ones_like(r[:, :1])
    part = np.where(flat, 0.0, (w2 - w2.mean(axis=1, keepdims=True)) / scale).reshape(-1)
    return (adv + (u - 1.0) * part).astype(np.float32)


def _as_tensor(x, like: paddle.Tensor) -> paddle.Tensor:
    if isinstance(x, paddle.Tensor):
        return x.astype(like.dtype)
    return paddle.to_tensor(np.asarray(x), dtype=like.dtype)


def grpo_loss(logp: paddle.Tensor, old_logp, ref_logp, advantages, mask, epsilon: float = 0.2,
              beta: float = 0.04, averaging: str = "token", normalizer: float | None = None):
    """GRPO loss -> (scalar loss with gradient through logp, stats dict of python floats).

    logp [B, T]: per-token log-probs of the sampled tokens under the current policy (with gradient).
    old_logp [B, T] or None: the rollout policy's log-probs (None = logp detached, i.e. one update per
        rollout: the ratio is 1 but its gradient is still the policy gradient).
    ref_logp [B, T] or None: the reference policy's log-probs (adapters disabled); None only with beta = 0.
    advantages [B]; mask [B, T]: 1 on completion tokens.
    averaging: "token" or "sequence" (see the module docstring). normalizer: with "token", divide by this
        token count instead of the mask's own sum, so gradient accumulation over micro-batches can average
        over every completion token of the optimizer step.
    stats: loss, kl (mean per token), clip_fraction (share of tokens where the clipped term is the active
        one), ratio (mean per token), max_abs_log_ratio (largest |logp - old_logp| over completion tokens;
        exactly 0 at the first update of a rollout batch), surrogate (mean per token).
    """
    if averaging not in AVERAGING:
        raise ValueError(f"grpo.loss_averaging must be one of {AVERAGING}, got {averaging!r}")
    if len(logp.shape) != 2:
        raise ValueError(f"logp must be [B, T], got shape {list(logp.shape)}")
    mask = _as_tensor(mask, logp)
    old = logp.detach() if old_logp is None else _as_tensor(old_logp, logp).detach()
    adv = _as_tensor(advantages, logp).reshape([-1, 1]).detach()
    if adv.shape[0] != logp.shape[0]:
        raise ValueError(f"{adv.shape[0]} advantages for {logp.shape[0]} completions")

    ratio = paddle.exp(paddle.clip(logp - old, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = ratio * adv
    clipped = paddle.clip(ratio, 1.0 - epsilon, 1.0 + epsilon) * adv
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
    if averaging == "token":
        denom = paddle.to_tensor(float(normalizer), dtype=logp.dtype) if normalizer else paddle.clip(n_tokens, min=1.0)
        loss = (per_token * mask).sum() / denom
    else:
        lengths = mask.sum(axis=1)
        seq_mean = (per_token * mask).sum(axis=1) / paddle.clip(lengths, min=1.0)
        has_tokens = (lengths > 0).astype(logp.dtype)
        loss = (seq_mean * has_tokens).sum() / paddle.clip(has_tokens.sum(), min=1.0)

    with paddle.no_grad():
        tok = float(paddle.clip(n_tokens, min=1.0))
        is_clipped = (clipped < unclipped).astype(logp.dtype)  # min() picked the clipped term
        stats = {
            "loss": float(loss),
            "kl": float((kl * mask).sum()) / tok if kl is not None else 0.0,
            "clip_fraction": float((is_clipped * mask).sum()) / tok,
            "ratio": float((ratio * mask).sum()) / tok,
            "max_abs_log_ratio": float(((logp - old).abs() * mask).max()) if logp.size else 0.0,
            "surrogate": float((surrogate * mask).sum()) / tok,
        }
    return loss, stats
