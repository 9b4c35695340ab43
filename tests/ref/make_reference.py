"""Reference outputs from transformers 4.51.3 (torch) for the Paddle parity test.

Run with the reference virtualenv only (.venv-ref): `python tests/ref/make_reference.py OUT_DIR [--seed N]`.
Writes OUT_DIR/model (a tiny random Qwen2VLForConditionalGeneration saved in HF format, with the real Qwen2
tokenizer and a preprocessor config) and OUT_DIR/reference.npz with the processor outputs and the model's
outputs on a left-padded batch of two synthetic images of different sizes.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, \
    Qwen2VLProcessor

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "..", "..", "..", "shared", "assets", "qwen2-tokenizer")

PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    "min_pixels": 3136, "max_pixels": 401408, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
}

TINY = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False,
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    bos_token_id=151643, eos_token_id=151645, initializer_range=0.2,
    vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=4, num_heads=4, in_chans=3,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
)


def synthetic_image(width, height, rng):
    """A textured 'product' picture: noisy background, a few coloured shapes, one dark scratch."""
    base = rng.integers(90, 160, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
        x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw.line([(rng.integers(0, width), rng.integers(0, height)) for _ in range(2)], fill=(10, 10, 10), width=3)
    return img


def prompt(obj):
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>"
            f"This is an image containing a {obj}. Analyze the given image and determine if there is any defect "
            "in the object.<|im_end|>\n<|im_start|>assistant\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--logit-positions", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model_dir = os.path.join(args.out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)

    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**TINY)).eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), model_dir)
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=2)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**{
        k: v for k, v in PREPROCESSOR.items() if k not in ("image_processor_type", "processor_class")}),
        tokenizer=tokenizer)
    images = [synthetic_image(640, 480, rng), synthetic_image(300, 500, rng)]
    inputs = processor(text=[prompt("bottle"), prompt("metal nut with a long name")], images=images,
                       return_tensors="pt", padding=True)

    with torch.no_grad():
        image_embeds = model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        out = model(**inputs, output_hidden_states=True)
        gen = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
    mask = inputs["attention_mask"].numpy()
    logit_index = np.stack([np.unique(np.linspace(np.argmax(row), len(row) - 1, args.logit_positions).round())
                            .astype(np.int64) for row in mask])
    logits = out.logits.numpy()
    selected = np.stack([logits[i, idx] for i, idx in enumerate(logit_index)])
    scores = torch.stack(gen.scores, 1).numpy()  # [B, steps, V]
    top2 = np.sort(scores, -1)[..., -2:]
    gap = float((top2[..., 1] - top2[..., 0]).min())
    new_tokens = gen.sequences[:, inputs["input_ids"].shape[1]:].numpy()
    np.savez(os.path.join(args.out_dir, "reference.npz"),
             input_ids=inputs["input_ids"].numpy(), attention_mask=mask,
             pixel_values=inputs["pixel_values"].numpy().astype(np.float32),
             image_grid_thw=inputs["image_grid_thw"].numpy(), image_embeds=image_embeds.numpy(),
             hidden=out.hidden_states[-1].numpy(), logit_index=logit_index, logits=selected,
             rope_deltas=out.rope_deltas.numpy(), greedy_tokens=new_tokens, greedy_min_gap=gap)
    print(json.dumps({"input_ids": list(inputs["input_ids"].shape), "pixel_values": list(inputs["pixel_values"].shape),
                      "image_grid_thw": inputs["image_grid_thw"].tolist(), "greedy_min_top2_gap": gap,
                      "greedy_tokens": new_tokens.tolist()}))


if __name__ == "__main__":
    sys.exit(main())
