"""Reference outputs from transformers 4.51.3 (torch) for the Paddle Qwen2.5-VL parity test.

Run with the reference virtualenv only (.venv-ref): `python tests/ref/make_reference_qwen2_5_vl.py OUT_DIR`.
Writes OUT_DIR/model (a tiny random Qwen2_5_VLForConditionalGeneration in HF format: 4 vision blocks, full
attention at blocks 1 and 3, windows of 112 px; the real Qwen2 tokenizer; a preprocessor config), the inputs
(OUT_DIR/image0.png, image1.png, texts.json) and OUT_DIR/reference.npz: the processor's and the model's outputs on
a left-padded batch of two prompts with non-square images of different sizes whose merged grids (17 x 23,
18 x 11) do not tile into 4 x 4 windows, plus each prompt run alone (keys alone0.*, alone1.*).
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, \
    Qwen2VLImageProcessor

from make_reference import PREPROCESSOR, TOKENIZER_DIR, prompt, synthetic_image

TINY = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False,
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    bos_token_id=151643, eos_token_id=151645, initializer_range=0.2,
    vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=2,
                       in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                       hidden_act="silu", window_size=112, fullatt_block_indexes=[1, 3], tokens_per_second=2),
)


def run(model, processor, tokenizer, texts, images, new_tokens, logit_positions):
    inputs = processor(text=list(texts), images=images, return_tensors="pt", padding=True)  # it edits the list
    with torch.no_grad():
        image_embeds = model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        out = model(**inputs, output_hidden_states=True)
        gen = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
    mask = inputs["attention_mask"].numpy()
    logit_index = np.stack([np.unique(np.linspace(np.argmax(row), len(row) - 1, logit_positions).round())
                            .astype(np.int64) for row in mask])
    logits = out.logits.numpy()
    scores = torch.stack(gen.scores, 1).numpy()  # [B, steps, V]
    top2 = np.sort(scores, -1)[..., -2:]
    return dict(input_ids=inputs["input_ids"].numpy(), attention_mask=mask,
                pixel_values=inputs["pixel_values"].numpy().astype(np.float32),
                image_grid_thw=inputs["image_grid_thw"].numpy(), image_embeds=image_embeds.numpy(),
                hidden=out.hidden_states[-1].numpy(), logit_index=logit_index,
                logits=np.stack([logits[i, idx] for i, idx in enumerate(logit_index)]),
                last_logits=logits[:, -1], rope_deltas=out.rope_deltas.numpy(),
                greedy_tokens=gen.sequences[:, inputs["input_ids"].shape[1]:].numpy(),
                greedy_min_gap=np.float32((top2[..., 1] - top2[..., 0]).min()))


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

    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY)).eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), model_dir)
    pre = dict(PREPROCESSOR, processor_class="Qwen2_5_VLProcessor")
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**{
        k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")}), tokenizer=tokenizer)
    images = [synthetic_image(640, 480, rng), synthetic_image(300, 500, rng)]
    texts = [prompt("bottle"), prompt("metal nut with a long name")]
    for i, img in enumerate(images):  # lossless, so ppiad's processor sees the very same pixels
        img.save(os.path.join(args.out_dir, f"image{i}.png"))
    with open(os.path.join(args.out_dir, "texts.json"), "w") as f:
        json.dump(texts, f)
    arrays = run(model, processor, tokenizer, texts, images, args.new_tokens, args.logit_positions)
    for i in range(len(texts)):  # each prompt alone, no padding
        alone = run(model, processor, tokenizer, texts[i:i + 1], images[i:i + 1], args.new_tokens,
                    args.logit_positions)
        arrays.update({f"alone{i}.{k}": v for k, v in alone.items()})
    np.savez(os.path.join(args.out_dir, "reference.npz"), **arrays)
    print(json.dumps({"input_ids": list(arrays["input_ids"].shape), "image_grid_thw": arrays["image_grid_thw"].tolist(),
                      "greedy_min_top2_gap": float(arrays["greedy_min_gap"]),
                      "greedy_tokens": arrays["greedy_tokens"].tolist()}))


if __name__ == "__main__":
    sys.exit(main())
