"""What evaluation and inference ask of a model: images + object names in, parsed verdicts out.

`Predictor` is the seam between the tools and the model. The evaluation runner and `tools/infer.py` only
call `predict`, so they are tested with a simple stand-in, and `ModelPredictor` (Qwen2-VL + optional LoRA
adapter + greedy generation) is the one real implementation.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

from PIL import Image

from ppiad.config import Config, ConfigError, require

# Qwen2-VL's smart resize refuses aspect ratios above 200:1 (a line-scan strip, say); such images are padded.
MAX_ASPECT = 200


@dataclass(frozen=True)
class Prediction:
    completion: str          # the raw generated text
    think: str | None        # the reasoning inside <think></think> (None if absent)
    answer: str | None       # "A" (defect), "B" (normal), or None when the completion breaks the format
    valid_format: bool       # the completion is exactly <think>...</think> <answer>X</answer>
    score: float | None      # P(A) at the answer position: the model's probability of "defect"

    @property
    def verdict(self) -> str:
        return {"A": "defect", "B": "normal"}.get(self.answer or "", "unknown")

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor(Protocol):
    def predict(self, images: Sequence[Image.Image], object_names: Sequence[str],
                references: Sequence[Sequence[Image.Image]] | None = None) -> list[Prediction]:
        """One Prediction per image, in order. Images are 8-bit RGB (ppiad.data.images.load_image).
        `references[i]`: the normal reference images shown before image i (k-shot); None = none."""
        ...


def prediction_from_text(completion: str, score: float | None = None) -> Prediction:
    """Parse a completion with the project's one parser (strict answer only; lenient is for reports)."""
    from ppiad.prompt import parse_completion

    parsed = parse_completion(completion)
    if score is not None and not math.isfinite(float(score)):
        score = None
    return Prediction(completion=completion, think=parsed.think, answer=parsed.answer,
                      valid_format=bool(parsed.strict), score=None if score is None else float(score))


def fit_aspect(img: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Pad an image whose aspect ratio exceeds `max_aspect` with white (ppiad.models.processor.pad_to_aspect).
    The processor already pads to the ratio its max_pixels allows; this is for callers of other processors."""
    from ppiad.models.processor import pad_to_aspect

    return pad_to_aspect(img, max_aspect)


class ModelPredictor:
    """Qwen2-VL (+ merged LoRA adapter) with greedy decoding, as configured by cfg.model and cfg.eval."""

    def __init__(self, model, processor, *, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, seed: int | None = None):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.seed = seed
        self._answer_tokens = None

    @classmethod
    def from_config(cls, cfg: Config) -> "ModelPredictor":
        path = require(cfg, "model.path", "the Qwen2-VL / Qwen2.5-VL checkpoint directory to evaluate")
        if not os.path.isdir(path):
            raise ConfigError(f"model.path '{path}' is not a directory (expected a Hugging Face-format "
                              f"Qwen2-VL checkpoint folder with config.json)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"model.path '{path}' has no config.json: not a Hugging Face-format checkpoint")
        adapter = cfg.model.adapter
        if adapter and not os.path.exists(adapter):
            raise ConfigError(f"model.adapter '{adapter}' does not exist")
        from ppiad.utils.distributed import launched_world
        from ppiad.utils.identity import base_model_mismatch

        mismatch = base_model_mismatch(adapter, path)   # loaded anyway (eval, infer, serve), but never silently
        if mismatch and launched_world()[0] == 0:
            print(f"warning: {mismatch}", file=sys.stderr, flush=True)

        from ppiad.models import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(
            path, dtype=_inference_dtype(cfg.model.dtype), allow_pickle=cfg.model.allow_pickle)
        model.set_attn_implementation(cfg.model.attn_implementation)
        if adapter:
            from ppiad.models.lora import load_adapter, merge_adapter

            # load_adapter adds adapters shaped by the adapter's own config (r, alpha, targets); merging folds
            # B@A into the weights so decoding is as fast as the base model. Only into float32 weights: in
            # bf16 small updates round away (merge_adapter), so a bf16 model keeps its adapters unmerged.
            try:
                load_adapter(model, adapter)
            except ValueError as exc:
                raise ConfigError(f"model.adapter '{adapter}': {exc}") from exc
            if _inference_dtype(cfg.model.dtype) == "float32":
                merge_adapter(model)
        model.eval()
        processor = AutoProcessor.from_config(cfg)  # min/max pixels, max prompt length
        return cls(model, processor, max_new_tokens=cfg.eval.max_new_tokens, do_sample=cfg.eval.do_sample,
                   temperature=cfg.eval.temperature, seed=cfg.seed)

    def _answer_token_ids(self):
        if self._answer_tokens is None:
            from ppiad.models.generation import AnswerTokens

            self._answer_tokens = AnswerTokens.from_tokenizer(self.processor.tokenizer)
        return self._answer_tokens

    def predict(self, images: Sequence[Image.Image], object_names: Sequence[str],
                references: Sequence[Sequence[Image.Image]] | None = None) -> list[Prediction]:
        if len(images) != len(object_names):
            raise ValueError(f"predict: {len(images)} images but {len(object_names)} object names")
        if not images:
            return []
        inputs = self.processor.build_inputs(list(images), list(object_names),  # pads extreme aspects
                                             references=references)
        result = self._generate(inputs)
        scores = _to_list(result.answer_scores)
        return [prediction_from_text(text, score) for text, score in zip(result.texts, scores)]

    def complete(self, images: Sequence[Image.Image], prompts: Sequence[str],
                 references: Sequence[Sequence[Image.Image]] | None = None) -> list[str]:
        """The completion for each (image, prompt text of the caller's), e.g. an MMAD multiple-choice question."""
        if not images:
            return []
        return self._generate(self.processor.build_chat_inputs(list(images), list(prompts),
                                                               references=references)).texts

    def _generate(self, inputs):
        import paddle

        from ppiad.models.generation import generate

        with paddle.no_grad():
            result = generate(self.model, inputs, num_samples=1, max_new_tokens=self.max_new_tokens,
                              do_sample=self.do_sample, temperature=self.temperature,
                              eos_token_ids=self.processor.eos_token_ids,
                              answer_token_ids=self._answer_token_ids(), seed=self.seed,
                              tokenizer=self.processor.tokenizer)
        return result


def _inference_dtype(dtype: str) -> str:
    """bfloat16 needs a GPU: Paddle's CPU build has no bf16 matmul kernels, so fall back to float32 there."""
    import paddle

    if dtype == "bfloat16" and not (paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0):
        import sys

        print("note: model.dtype=bfloat16 needs a GPU; running in float32 on this CPU", file=sys.stderr)
        return "float32"
    return dtype


def _to_list(x) -> list:
    if x is None:
        return []
    if hasattr(x, "numpy"):
        x = x.numpy()
    return [float(v) for v in list(x)]
