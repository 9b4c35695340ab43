"""Reference outputs of transformers 4.51.3's Qwen2VLProcessor, for tests/test_processor.py.

Runs ONLY in the reference virtualenv (.venv-ref: torch + transformers 4.51.3), as a subprocess:
    python processor_reference.py SPEC.json OUT.npz
SPEC: {"dir": checkpoint dir, "cases": [{"name", optional "dir", "messages": [conversation, ...], "images": [png paths],
       "lenient_small": bool}], "texts": [str, ...]}
OUT.npz: per case <name>.input_ids / .attention_mask / .pixel_values / .image_grid_thw; a JSON blob "meta"
holds the rendered prompts, encode/decode results of "texts", and whether the reference rejects tiny images.
"""
import json
import math
import sys

import numpy as np
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor
from transformers.models.qwen2_vl import image_processing_qwen2_vl as ipq

_original_smart_resize = ipq.smart_resize


def _lenient_smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 1280):
    """The reference's smart_resize, except that a side under `factor` is upscaled rather than rejected."""
    if height >= factor and width >= factor:
        return _original_smart_resize(height, width, factor, min_pixels, max_pixels)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


_loaded = {}


def load(path):
    """Qwen2VLProcessor from a checkpoint dir: fast tokenizer (tokenizer.json), slow image processor, the
    dir's chat_template.json; left padding as ppiad uses."""
    if path not in _loaded:
        with open(f"{path}/chat_template.json", encoding="utf-8") as f:
            template = json.load(f)["chat_template"]
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        _loaded[path] = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor.from_pretrained(path),
                                         tokenizer=tokenizer, chat_template=template)
    return _loaded[path]


def main(spec_path, out_path):
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    arrays, meta = {}, {"prompts": {}}
    proc = load(spec["dir"])
    tokenizer = proc.tokenizer
    meta["tokenizer_class"] = type(tokenizer).__name__
    try:
        _original_smart_resize(20, 20)
        meta["ref_rejects_small"] = False
    except ValueError:
        meta["ref_rejects_small"] = True
    for case in spec["cases"]:
        ipq.smart_resize = _lenient_smart_resize if case.get("lenient_small") else _original_smart_resize
        proc = load(case.get("dir", spec["dir"]))
        texts = [proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
                 for conv in case["messages"]]
        name = case["name"]
        meta["prompts"][name] = list(texts)  # copy: the processor expands image pads in the list in place
        images = [Image.open(p).convert("RGB") for p in case["images"]] or None
        out = proc(text=texts, images=images, padding=True, return_tensors="np")
        for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
            if key in out:
                arrays[f"{name}.{key}"] = np.asarray(out[key])
    meta["encoded"] = [tokenizer.encode(t, add_special_tokens=True) for t in spec.get("texts", [])]
    meta["decoded"] = [tokenizer.decode(ids, skip_special_tokens=False) for ids in meta["encoded"]]
    meta["decoded_skip"] = [tokenizer.decode(ids, skip_special_tokens=True) for ids in meta["encoded"]]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
