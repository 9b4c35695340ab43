"""The identity of a training run: every setting its checkpoints depend on (ppiad.utils.identity explains the
check and the fingerprints). tools/train.py stops, naming the differing keys, before continuing a run
directory whose checkpoints were made with other settings (`train.resume=auto` would otherwise resume them
and its config.yaml would describe the new settings)."""
from __future__ import annotations

import os

from ppiad.config import Config
from ppiad.utils.identity import (adapter_fingerprint, effective_dtype, flat_settings, model_fingerprint,
                                  text_fingerprint)

# Where and how often a run saves, logs or evaluates, and how many processes share it (the checkpoint loader
# handles that), do not change what it computes.
NOT_IDENTITY = frozenset({"train.save_every", "train.log_every", "train.resume", "model.path", "model.adapter",
                          "model.dtype", "model.allow_pickle", "train.eval_every", "train.eval_images",
                          "train.save_best", "train.save_best_metric", "train.log_samples_every"})


def training_identity(cfg: Config) -> dict:
    """{setting: value}: the base model's fingerprint, the starting adapter's hash, the dtype really used, the
    training data (dataset, absolute root, split, categories, loader settings, object names), the prompt and
    answer-score method, the seed, and every model, LoRA, reward, GRPO and train setting but those in
    NOT_IDENTITY."""
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
    for section in ("model", "lora", "rewards", "grpo", "train"):
        ident.update(flat_settings(cfg[section], section, NOT_IDENTITY))
    return ident
