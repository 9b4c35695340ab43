"""The identity of a training run: every setting its checkpoints depend on (ppiad.utils.identity explains the
check and the fingerprints). tools/train.py stops, naming the differing keys, before continuing a run
directory whose checkpoints were made with other settings (`train.resume=auto` would otherwise resume them
and its config.yaml would describe the new settings)."""
from __future__ import annotations

import os

from ppiad.config import Config
from ppiad.utils.identity import (adapter_fingerprint, effective_dtype, flat_settings, model_fingerprint,
                                  text_fingerprint)

# Where and how often a run saves, logs or evaluates, how many processes share it (the checkpoint loader
# handles that), and settings that only trade speed for memory or stop on a limit, do not change what it
# computes: train.recompute (recomputes the same activations in backward), model.attn_implementation (eager
# and sdpa compute the same attention), train.max_bad_steps (how many skipped steps to tolerate before
# stopping), model.max_prompt_length (a too-long prompt stops the run; nothing is truncated). Sections outside
# model / lora / rewards / grpo / train (data.num_workers, distributed, eval, demo) are not in the identity.
NOT_IDENTITY = frozenset({"train.save_every", "train.log_every", "train.resume", "model.path", "model.adapter",
                          "model.dtype", "model.allow_pickle", "train.eval_every", "train.eval_images",
                          "train.save_best", "train.save_best_metric", "train.log_samples_every",
                          "train.recompute", "model.attn_implementation", "train.max_bad_steps",
                          "model.max_prompt_length"})
# The length of the run: leaving them out lets `train.resume=auto -o train.max_steps=N` extend a finished run,
# allowed only when the learning rate of each step does not depend on the total (schedule_needs_total).
RUN_LENGTH = ("train.max_steps", "train.epochs")


def schedule_needs_total(cfg: Config) -> str:
    """Why the learning rate of a step depends on the run's total steps ("" when it does not): a decaying
    lr_schedule (linear, cosine) or a warm-up given as a share of the steps (ppiad.rl.trainer.lr_factor)."""
    reasons = []
    if cfg.train.lr_schedule != "constant":
        reasons.append(f"train.lr_schedule={cfg.train.lr_schedule} decays over the total steps")
    if cfg.train.warmup_ratio > 0:
        reasons.append(f"train.warmup_ratio={cfg.train.warmup_ratio} is a share of the total steps")
    return " and ".join(reasons)


def training_identity(cfg: Config) -> dict:
    """{setting: value}: the base model's fingerprint, the starting adapter's hash, the dtype really used, the
    training data (dataset, absolute root, split, categories, loader settings, object names), the prompt and
    answer-score method, the seed, and every model, LoRA, reward, GRPO and train setting but those in
    NOT_IDENTITY (train.max_steps / train.epochs only when schedule_needs_total: a constant schedule without
    warm-up can be extended)."""
    from ppiad.models.generation import ANSWER_SCORE_METHOD
    from ppiad.prompt import PROMPT_TEMPLATE

    part = cfg.data.train
    ident = {
        "model.path (weights and config)": model_fingerprint(cfg.model.path),
        "model.adapter": adapter_fingerprint(cfg.model.adapter),
        "model.dtype": effective_dtype(cfg.model.dtype),
        "prompt": text_fingerprint(PROMPT_TEMPLATE),
        "answer score": ANSWER_SCORE_METHOD,
        "seed": cfg.seed,
        "data.train.dataset": part.dataset,
        "data.train.root": os.path.abspath(part.root),
        "data.train.split": part.split,
        "data.train.categories": sorted(part.categories),
        "data.train.missing_files": part.missing_files,
        "data.train.bit_depth": part.bit_depth,
        "data.object_names": dict(sorted(cfg.data.object_names.items())),
    }
    from ppiad.data.references import reference_identity

    ident.update(reference_identity(cfg, "train"))   # k-shot: k, its sentence and the reference pool
    if part.dataset == "folder":
        ident.update({"data.train.normal_dirs": sorted(part.normal_dirs),
                      "data.train.exclude_dirs": sorted(part.exclude_dirs)})
    exclude = NOT_IDENTITY if schedule_needs_total(cfg) else NOT_IDENTITY | set(RUN_LENGTH)
    for section in ("model", "lora", "rewards", "grpo", "train"):
        ident.update(flat_settings(cfg[section], section, exclude))
    return ident
