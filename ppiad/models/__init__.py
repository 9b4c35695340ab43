"""Models: Qwen2-VL and Qwen2.5-VL in Paddle, their processor, one entry point.

    from ppiad.models import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained(path)          # dispatches on config.json's model_type
    processor = AutoProcessor.from_pretrained(path)

Names are resolved on first use, so importing ppiad.models (e.g. for the tokenizer) does not import Paddle.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AutoModel": "ppiad.models.auto",
    "AutoProcessor": "ppiad.models.auto",
    "MODEL_TYPES": "ppiad.models.auto",
    "Qwen2VLConfig": "ppiad.models.qwen2_vl",
    "Qwen2VLForConditionalGeneration": "ppiad.models.qwen2_vl",
    "Qwen2_5_VLConfig": "ppiad.models.qwen2_5_vl",
    "Qwen2_5_VLForConditionalGeneration": "ppiad.models.qwen2_5_vl",
    "Qwen2VLProcessor": "ppiad.models.processor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ppiad.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
