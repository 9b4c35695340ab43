"""Qwen2-VL inputs: image preprocessing, chat template and tokenisation, batched with left padding.

Matches transformers 4.51.3's `Qwen2VLProcessor` + `Qwen2VLImageProcessor` (the parity test checks ids and
pixel values against it; they are bit-equal). Deliberate differences, where the reference fails or misreads:
- images with a side under 28 px are upscaled by the same smart-resize formula instead of being rejected;
- a side that the max-pixels downscale would round to 0 is kept at one 28 px unit, and no result passes
  max_pixels: aspect ratios above min(200, max_pixels / 28**2) are padded with white to that ratio
  (`pad_to_aspect`) instead of being refused (the reference refuses past 200 and, at a small max_pixels,
  returns up to 3.5x the pixel budget for ratios it accepts: 50 x 10000 at 12,544 -> 28 x 1568);
- `size` in preprocessor_config.json is honoured when `min_pixels` / `max_pixels` are absent (4.51.3 ignores
  it and falls back to its built-in defaults).
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image

from ppiad.models.tokenizer import QwenTokenizer
from ppiad.utils.io import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
MAX_ASPECT_RATIO = 200
DEFAULT_TEMPLATE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_template.jinja")


class PromptTooLongError(ValueError):
    """A prompt longer than model.max_prompt_length tokens (image tokens included): a setting or an input the
    user can fix (a shorter object name or question, a lower model.max_pixels, a higher limit).

    `length` and `limit` are token counts; the message is one line naming both and the config key."""

    def __init__(self, length: int, limit: int):
        self.length, self.limit = int(length), int(limit)
        super().__init__(f"the prompt is {self.length} tokens (image tokens included), more than "
                         f"model.max_prompt_length={self.limit}; shorten the object name or text, lower "
                         f"model.max_pixels, or raise model.max_prompt_length")


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------
def max_aspect_ratio(factor: int = 28, max_pixels: int = 28 * 28 * 1280) -> float:
    """The largest aspect ratio smart_resize accepts: the reference's 200, and no more than fits `max_pixels`
    with the short side at one `factor` unit (a ratio r needs factor * factor * r pixels), e.g. 16 at
    max_pixels 12,544 and factor 28; 512 at 401,408 (so 200 rules there)."""
    return min(float(MAX_ASPECT_RATIO), max_pixels / (factor * factor))


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width) in pixels: multiples of `factor` (>= factor), area within [min_pixels, max_pixels]
    (the upper bound always; the lower one unless max_pixels forbids it), aspect kept to the nearest grid step.

    The formula is transformers 4.51.3's `smart_resize` (Qwen2-VL), so results are identical for every image
    it handles; beyond it: a side the downscale would round to 0 is kept at `factor`, and an upscale whose
    rounding up passes max_pixels gives back grid steps on its longer side. Raises ValueError for an empty
    size or an aspect ratio above `max_aspect_ratio(factor, max_pixels)` (the reference refuses past 200;
    past max_pixels / factor**2 no grid size within max_pixels keeps the aspect). ImageProcessor pads such
    images instead (see `pad_to_aspect`).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels {max_pixels} is below one {factor}x{factor} grid cell")
    ratio, limit = max(height, width) / min(height, width), max_aspect_ratio(factor, max_pixels)
    if ratio > limit:
        raise ValueError(f"image size {width}x{height}: aspect ratio {ratio:.1f} is above {limit:g}, the most "
                         f"that fits max_pixels {max_pixels} with sides of at least {factor} px (and at most "
                         f"{MAX_ASPECT_RATIO}); pad or crop the image, or raise max_pixels")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    while h_bar * w_bar > max_pixels:   # only after rounding up to min_pixels close to max_pixels
        if h_bar > factor and (w_bar == factor or h_bar * width >= w_bar * height):   # taller than the image
            h_bar -= factor
        else:
            w_bar -= factor
    return h_bar, w_bar


def pad_to_aspect(img: Image.Image, max_aspect: float) -> Image.Image:
    """`img` itself when its aspect ratio is at most `max_aspect`, else a copy centred on a white canvas
    (white as a transparent background is composited) whose short side is long_side / max_aspect, rounded up,
    so an extreme strip (a line-scan camera's, say) is judged rather than refused. The image's pixels are kept:
    nothing is cropped."""
    w, h = img.size
    if max(w, h) / min(w, h) <= max_aspect:
        return img
    side = math.ceil(max(w, h) / max_aspect)
    canvas = Image.new("RGB", (max(w, side), max(h, side)), (255, 255, 255))
    canvas.paste(img, ((canvas.width - w) // 2, (canvas.height - h) // 2))
    return canvas


def _to_pil_rgb(image) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        from ppiad.data.images import load_image

        return load_image(os.fspath(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(f"numpy images must be uint8 HxW or HxWxC, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a uint8 numpy array or a path, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


class ImageProcessor:
    """Qwen2-VL's resize -> rescale -> normalise -> patchify, one image at a time."""

    def __init__(self, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2, image_mean=OPENAI_CLIP_MEAN,
                 image_std=OPENAI_CLIP_STD, rescale_factor: float = 1 / 255, resample: int = Image.BICUBIC,
                 do_resize: bool = True, do_rescale: bool = True, do_normalize: bool = True):
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean = np.asarray(image_mean, dtype=np.float32)
        self.image_std = np.asarray(image_std, dtype=np.float32)
        self.rescale_factor = rescale_factor
        self.resample = resample
        self.do_resize, self.do_rescale, self.do_normalize = do_resize, do_rescale, do_normalize

    @classmethod
    def from_config(cls, cfg: dict, min_pixels: int | None = None, max_pixels: int | None = None,
                    source: str = "preprocessor_config.json") -> "ImageProcessor":
        size = cfg.get("size") or {}
        lo = min_pixels or cfg.get("min_pixels") or size.get("shortest_edge") or 56 * 56
        hi = max_pixels or cfg.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
        kwargs = {k: cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                      "rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize")
                  if k in cfg}
        try:
            return cls(min_pixels=lo, max_pixels=hi, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_image_tokens(self, grid_thw) -> int:
        """Number of <|image_pad|> tokens for one image: merged patches = t*h*w / merge**2."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // (self.merge_size ** 2)

    def preprocess(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (patches float32 [t*h*w, C*T*P*P], grid (t, h, w))."""
        img = _to_pil_rgb(image)
        if self.do_resize:
            img = pad_to_aspect(img, max_aspect_ratio(self.factor, self.max_pixels))
        width, height = img.size
        rh, rw = self.target_size(height, width)
        if rh % self.factor or rw % self.factor:
            raise ValueError(f"image size {rw}x{rh} is not a multiple of {self.factor}; enable resizing")
        if self.do_resize:
            img = img.resize((rw, rh), resample=self.resample)  # PIL like the reference (bicubic by default)
        arr = np.asarray(img)  # H, W, C uint8
        if self.do_rescale:
            arr = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)  # the reference's rounding
        else:
            arr = arr.astype(np.float32)
        if self.do_normalize:
            arr = (arr - self.image_mean) / self.image_std
        frames = np.repeat(arr.transpose(2, 0, 1)[None], self.temporal_patch_size, axis=0)  # one still -> T frames
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        channels = frames.shape[1]
        gt, gh, gw = 1, rh // p, rw // p
        # Patch order: merge windows row-major, then the m x m patches inside each window, so the model's merger
        # can group m*m consecutive rows; features inside a patch are (channel, frame, y, x).
        x = frames.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(gt * gh * gw, channels * tp * p * p)), (gt, gh, gw)

    def to_config(self) -> dict:
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "do_resize": self.do_resize, "do_rescale": self.do_rescale, "do_normalize": self.do_normalize,
            "do_convert_rgb": True, "resample": int(self.resample), "rescale_factor": self.rescale_factor,
            "image_mean": [float(v) for v in self.image_mean], "image_std": [float(v) for v in self.image_std],
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }


# ---------------------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------------------
def _jinja_env():
    """A sandboxed environment with the options and helpers HF chat templates are written against."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for HF's masks; here it renders as-is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def load_chat_template(path: str) -> tuple[str, str]:
    """(template text, where it came from): chat_template.json, chat_template.jinja, else ppiad's Qwen2-VL one.

    tokenizer_config.json's template is not used: it is often a text-only template (the shared Qwen tokenizer
    carries Qwen3's) that cannot place images.
    """
    json_file = os.path.join(path, "chat_template.json")
    if os.path.isfile(json_file):
        data = read_json(json_file)
        if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
            raise ValueError(f"'{json_file}' must hold {{\"chat_template\": \"<jinja text>\"}}")
        return data["chat_template"], json_file
    for name in ("chat_template.jinja",):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                return f.read(), candidate
    with open(DEFAULT_TEMPLATE_FILE, encoding="utf-8") as f:
        return f.read(), DEFAULT_TEMPLATE_FILE


# ---------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------
class Qwen2VLProcessor:
    """Texts with <|image_pad|> placeholders + images -> model inputs (LEFT padded)."""

    def __init__(self, tokenizer: QwenTokenizer, image_processor: ImageProcessor, chat_template: str,
                 chat_template_source: str = "<memory>", max_prompt_length: int | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source
        self.max_prompt_length = max_prompt_length
        try:
            self._template = _jinja_env().from_string(chat_template)
        except Exception as exc:
            raise ValueError(f"chat template from '{chat_template_source}' does not compile: {exc}") from None
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = tokenizer.eos_token_ids

    @classmethod
    def from_pretrained(cls, path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                        max_prompt_length: int | None = None) -> "Qwen2VLProcessor":
        """Load tokenizer, preprocessor_config.json and chat template from a HF-format directory."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory '{path}' does not exist")
        tokenizer = QwenTokenizer.from_pretrained(path)
        pre_file = os.path.join(path, "preprocessor_config.json")
        pre_cfg = read_json(pre_file) if os.path.isfile(pre_file) else {}
        image_processor = ImageProcessor.from_config(pre_cfg, min_pixels, max_pixels, source=pre_file)
        template, source = load_chat_template(path)
        return cls(tokenizer, image_processor, template, source, max_prompt_length)

    @classmethod
    def from_config(cls, cfg) -> "Qwen2VLProcessor":
        """From a ppiad Config: model.path, model.min_pixels / max_pixels / max_prompt_length."""
        from ppiad.config import require

        m = cfg.model
        return cls.from_pretrained(require(cfg, "model.path", "the Qwen2-VL checkpoint directory"),
                                   m.min_pixels, m.max_pixels, m.max_prompt_length)

    # -- text ---------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs):
        """HF-style messages -> prompt text (or a list of texts for a list of conversations)."""
        if messages and isinstance(messages[0], (list, tuple)):
            return [self.apply_chat_template(m, add_generation_prompt, **kwargs) for m in messages]
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {msg!r}")
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     eos_token=self.tokenizer.eos_token, pad_token=self.tokenizer.pad_token,
                                     **kwargs)

    # -- batching -----------------------------------------------------------------------------------------
    def __call__(self, text, images=None, return_tensors: str = "pd") -> dict:
        """Expand image placeholders, tokenise, LEFT pad. return_tensors: "pd" (paddle) or "np"."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no text given")
        pixel_values = grids = None
        if images is not None:
            images = [images] if not isinstance(images, (list, tuple)) else list(images)
            processed = [self.image_processor.preprocess(im) for im in images]
            if processed:
                pixel_values = np.concatenate([p for p, _ in processed], axis=0)
                grids = np.asarray([g for _, g in processed], dtype=np.int64)
        texts = self._expand_image_tokens(texts, grids)
        rows = self.tokenizer.encode_batch(texts)
        longest = max(len(r) for r in rows)
        if self.max_prompt_length is not None and longest > self.max_prompt_length:
            raise PromptTooLongError(longest, self.max_prompt_length)
        input_ids = np.full((len(rows), longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, row in enumerate(rows):
            if row:
                input_ids[i, longest - len(row):] = row
                attention_mask[i, longest - len(row):] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
               "image_grid_thw": grids}
        if return_tensors == "np":
            return out
        if return_tensors != "pd":
            raise ValueError(f"return_tensors must be 'pd' or 'np', got {return_tensors!r}")
        import paddle

        return {k: (None if v is None else paddle.to_tensor(v)) for k, v in out.items()}

    def _expand_image_tokens(self, texts: list[str], grids) -> list[str]:
        n_placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
        n_images = 0 if grids is None else len(grids)
        if n_placeholders != n_images:
            raise ValueError(f"the texts hold {n_placeholders} {IMAGE_TOKEN} placeholders but {n_images} images "
                             f"were given")
        if not n_images:
            return texts
        counts = iter(self.image_processor.num_image_tokens(g) for g in grids)
        out = []
        for t in texts:
            pieces = t.split(IMAGE_TOKEN)
            out.append(pieces[0] + "".join(IMAGE_TOKEN * next(counts) + rest for rest in pieces[1:]))
        return out

    def build_inputs(self, images: Sequence, object_names: Sequence[str], return_tensors: str = "pd",
                     references: Sequence[Sequence] | None = None) -> dict:
        """ppiad's prompt for each (image, object name): image(s) first in the user turn, then the task text.

        `references[i]` (optional) holds k_i normal reference images of prompt i's product, placed before its
        query image (k-shot, ppiad.prompt.build_prompt(name, k_i)); prompts of one batch may hold different
        counts and sizes. Images reach the model prompt by prompt, references first, query last; None or an
        empty list gives today's one-image prompt byte for byte. Raises ValueError when the lengths differ."""
        from ppiad.prompt import build_prompt  # lazy: the prompt module is owned elsewhere

        images, object_names = list(images), list(object_names)
        if len(images) != len(object_names):
            raise ValueError(f"build_inputs got {len(images)} images but {len(object_names)} object names")
        refs = [[] for _ in images] if references is None else [list(r) for r in references]
        if len(refs) != len(images):
            raise ValueError(f"build_inputs got {len(images)} images but {len(refs)} reference lists")
        return self.build_chat_inputs(images, [build_prompt(name, len(r)) for name, r in zip(object_names, refs)],
                                      return_tensors, refs)

    def build_chat_inputs(self, images: Sequence, prompts: Sequence[str], return_tensors: str = "pd",
                          references: Sequence[Sequence] | None = None) -> dict:
        """One user turn per (image, prompt text): the references[i] images, the query image, then the text
        (`build_inputs` with a text of the caller's, e.g. an MMAD question). Raises ValueError on length mismatch."""
        images, prompts = list(images), list(prompts)
        refs = [[] for _ in images] if references is None else [list(r) for r in references]
        if not len(images) == len(prompts) == len(refs):
            raise ValueError(f"build_chat_inputs got {len(images)} images, {len(prompts)} prompts and "
                             f"{len(refs)} reference lists")
        texts = [self.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * (len(r) + 1) + [
            {"type": "text", "text": text}]}], add_generation_prompt=True) for text, r in zip(prompts, refs)]
        ordered = [im for r, query in zip(refs, images) for im in r + [query]]
        return self(text=texts, images=ordered, return_tensors=return_tensors)

    # -- output -------------------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str) -> None:
        """Write preprocessor_config.json and chat_template.json (the tokenizer files are the checkpoint's own)."""
        from ppiad.utils.io import atomic_write_text

        os.makedirs(path, exist_ok=True)
        atomic_write_text(os.path.join(path, "preprocessor_config.json"),
                          json.dumps(self.image_processor.to_config(), indent=2) + "\n")
        atomic_write_text(os.path.join(path, "chat_template.json"),
                          json.dumps({"chat_template": self.chat_template}, indent=2) + "\n")
