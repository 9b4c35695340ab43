"""One entry point for every supported checkpoint family, chosen by config.json's `model_type`.

    model = AutoModel.from_pretrained(dir, dtype="float32")      # Qwen2VL... or Qwen2_5_VLForConditionalGeneration
    processor = AutoProcessor.from_pretrained(dir)                # tokenizer + image processor + chat template

Both families take the same inputs: Qwen2.5-VL's processor differs from Qwen2-VL's only for video (seconds per
temporal patch), which ppiad does not take, so one processor class serves both.
"""
from __future__ import annotations

import os

from ppiad.models.weights import CheckpointError
from ppiad.utils.io import read_json

# model_type -> (module, model class); imported on use so that `import ppiad.models` stays light
MODEL_TYPES = {
    "qwen2_vl": ("ppiad.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("ppiad.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
}


def model_type_of(directory: str) -> str:
    """config.json's model_type of a Hugging Face-format directory; CheckpointError naming the file if it is
    missing, malformed or not a supported type."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"model directory not found: '{directory}'")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"'{directory}' has no config.json: not a Hugging Face-format checkpoint directory")
    try:
        cfg = read_json(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"'{path}': model_type {model_type!r} is not supported; ppiad supports "
                              f"{', '.join(repr(t) for t in MODEL_TYPES)}")
    return model_type


def model_class(model_type: str):
    """The ppiad model class for a supported model_type."""
    import importlib

    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; ppiad supports "
                              f"{', '.join(repr(t) for t in MODEL_TYPES)}")
    module, name = MODEL_TYPES[model_type]
    return getattr(importlib.import_module(module), name)


class AutoModel:
    """Factory: `AutoModel.from_pretrained(dir, dtype="float32", allow_pickle=False)`."""

    @staticmethod
    def from_pretrained(directory: str, dtype: str = "float32", allow_pickle: bool = False):
        """Load the model of `directory` (config.json + safetensors) with the class its model_type names.

        dtype "float32" (CPU, tested) or "bfloat16" (GPU, untested here). Raises CheckpointError for a missing
        directory / config.json, an unsupported model_type (the message lists the supported ones) or weights
        that do not fit the config.
        """
        return model_class(model_type_of(directory)).from_pretrained(directory, dtype=dtype,
                                                                      allow_pickle=allow_pickle)


class AutoProcessor:
    """Factory: `AutoProcessor.from_pretrained(dir, min_pixels=None, max_pixels=None, max_prompt_length=None)`
    and `AutoProcessor.from_config(cfg)` (model.path, model.min_pixels / max_pixels / max_prompt_length)."""

    @staticmethod
    def from_pretrained(directory: str, min_pixels: int | None = None, max_pixels: int | None = None,
                        max_prompt_length: int | None = None):
        from ppiad.models.processor import Qwen2VLProcessor

        model_type_of(directory)  # refuses unsupported families before reading anything else
        return Qwen2VLProcessor.from_pretrained(directory, min_pixels, max_pixels, max_prompt_length)

    @staticmethod
    def from_config(cfg):
        from ppiad.config import require

        m = cfg.model
        return AutoProcessor.from_pretrained(require(cfg, "model.path", "the checkpoint directory"),
                                             m.min_pixels, m.max_pixels, m.max_prompt_length)
