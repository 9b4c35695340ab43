"""The identity of an evaluation: every setting its predictions depend on (ppiad.utils.identity explains the
check and the fingerprints). Two evaluations with the same identity give the same predictions, so a re-run may
resume from the other's; any difference stops it."""
from __future__ import annotations

import os
import re

from ppiad.config import Config
from ppiad.utils.identity import adapter_fingerprint, effective_dtype, model_fingerprint, text_fingerprint


def evaluation_identity(cfg: Config) -> dict:
    """{setting: value} for an evaluation of cfg.model (+ cfg.model.adapter) on cfg.data.eval.

    Sampling settings and the seed count only when eval.do_sample is on (greedy decoding ignores them); the
    dataset's folder keys only for folder datasets. eval.max_images and eval.batch_size are not part of it:
    a subset of the same predictions is still the same predictions."""
    from ppiad.models.generation import ANSWER_SCORE_METHOD
    from ppiad.prompt import PROMPT_TEMPLATE

    m, part = cfg.model, cfg.data.eval
    ident = {
        "model.path (weights and config)": model_fingerprint(m.path),
        "model.adapter": adapter_fingerprint(m.adapter),
        "model.dtype": effective_dtype(m.dtype),
        "model.min_pixels": m.min_pixels,
        "model.max_pixels": m.max_pixels,
        "model.max_prompt_length": m.max_prompt_length,
        "prompt": text_fingerprint(PROMPT_TEMPLATE),
        "answer score": ANSWER_SCORE_METHOD,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "eval.do_sample": cfg.eval.do_sample,
        "data.eval.dataset": part.dataset,
        "data.eval.root": os.path.abspath(part.root),
        "data.eval.split": part.split,
        "data.eval.categories": sorted(part.categories),
        "data.eval.bit_depth": part.bit_depth,
        "data.object_names": dict(sorted(cfg.data.object_names.items())),
    }
    if cfg.eval.do_sample:
        ident.update({"eval.temperature": cfg.eval.temperature, "seed": cfg.seed})
    from ppiad.data.references import reference_identity

    ident.update(reference_identity(cfg, "eval"))   # k-shot: k, its sentence and the reference pool
    if part.dataset == "folder":
        ident.update({"data.eval.normal_dirs": sorted(part.normal_dirs),
                      "data.eval.exclude_dirs": sorted(part.exclude_dirs)})
    return ident


def model_tag(cfg: Config) -> str:
    """A folder-name-safe name for the model and adapter evaluated: "<model dir>_base" or
    "<model dir>_<adapter name>-<8 hex of the adapter's content hash>", the adapter name being its checkpoint
    directory (`checkpoints/latest` resolved to `step_000300`) or its file name; two adapters with the same
    name from different runs get different tags."""
    from ppiad.models.lora import ADAPTER_WEIGHTS, _resolve   # the loader's rule: directory, file or `latest`

    model = os.path.basename(os.path.normpath(cfg.model.path)) or "model"
    if not cfg.model.adapter:
        return _safe(f"{model}_base")
    weights, _ = _resolve(cfg.model.adapter)
    name = (os.path.basename(os.path.dirname(os.path.abspath(weights))) if os.path.basename(weights) == ADAPTER_WEIGHTS
            else os.path.splitext(os.path.basename(weights))[0])
    return _safe(f"{model}_{name}-{adapter_fingerprint(cfg.model.adapter)[7:15]}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "model"
