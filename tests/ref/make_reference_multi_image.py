"""Reference outputs from transformers 4.51.3 (torch) for prompts holding several images (k-shot, issue 17).

Run with the reference virtualenv only (.venv-ref):
`python tests/ref/make_reference_multi_image.py OUT_DIR --family qwen2_vl|qwen2_5_vl`.
Writes OUT_DIR/model (the tiny random model of make_reference.py / make_reference_qwen2_5_vl.py), the images
OUT_DIR/image{0,1,2}.png, OUT_DIR/prompts.json and OUT_DIR/reference.npz. The batch is left padded and its
prompts hold different image counts and sizes: prompt 0 is a 1-shot prompt (a 300x500 normal reference, then a
640x480 query), prompt 1 a 0-shot prompt (one 200x260 query). Keys `alone0.*` hold prompt 0 run alone. The
prompt text is ppiad's (ppiad.prompt.build_prompt, pure Python), written in the Qwen2-VL chat format by hand
here, so the test checks ppiad's template rendering and tokenisation against the reference's.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2VLImageProcessor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the repository, for ppiad.prompt only

from make_reference import PREPROCESSOR, TOKENIZER_DIR, synthetic_image  # noqa: E402
from ppiad.prompt import build_prompt  # noqa: E402

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
# (object name, sizes of its images: references first, the query last)
PROMPTS = [("bottle", [(300, 500), (640, 480)]), ("metal nut", [(200, 260)])]


def chat_text(name: str, n_images: int) -> str:
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + VISION * n_images
            + build_prompt(name, n_images - 1) + "<|im_end|>\n<|im_start|>assistant\n")


def family_classes(family: str):
    if family == "qwen2_vl":
        from make_reference import TINY
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        return TINY, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from make_reference_qwen2_5_vl import TINY
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    return TINY, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--family", choices=("qwen2_vl", "qwen2_5_vl"), default="qwen2_vl")
    ap.add_argument("--seed", type=int, default=2)  # greedy top-2 gap 0.013: no near-ties
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tiny, config_cls, model_cls, processor_cls = family_classes(args.family)
    model_dir = os.path.join(args.out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    model = model_cls(config_cls(**tiny)).eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), model_dir)
    pre = dict(PREPROCESSOR, processor_class=processor_cls.__name__)
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    processor = processor_cls(image_processor=Qwen2VLImageProcessor(**{
        k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")}), tokenizer=tokenizer)

    images, spec = [], []
    for name, sizes in PROMPTS:
        files = []
        for w, h in sizes:
            img = synthetic_image(w, h, rng)
            path = os.path.join(args.out_dir, f"image{len(images)}.png")
            img.save(path)   # lossless: ppiad's processor reads the very same pixels
            images.append(img)
            files.append(os.path.basename(path))
        spec.append({"object": name, "images": files})
    with open(os.path.join(args.out_dir, "prompts.json"), "w") as f:
        json.dump(spec, f)
    texts = [chat_text(name, len(sizes)) for name, sizes in PROMPTS]

    def run(texts, images):
        inputs = processor(text=list(texts), images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
            gen = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id, output_scores=True,
                                 return_dict_in_generate=True)
        mask = inputs["attention_mask"].numpy()
        # 16 positions spread over each row's real tokens (the full [B, T, 151936] logits would be ~1 GB)
        logit_index = np.stack([np.unique(np.linspace(np.argmax(row), len(row) - 1, 16).round()).astype(np.int64)
                                for row in mask])
        logits = out.logits.numpy()
        scores = torch.stack(gen.scores, 1).numpy()
        top2 = np.sort(scores, -1)[..., -2:]
        return dict(input_ids=inputs["input_ids"].numpy(), attention_mask=mask,
                    pixel_values=inputs["pixel_values"].numpy().astype(np.float32),
                    image_grid_thw=inputs["image_grid_thw"].numpy(), logit_index=logit_index,
                    logits=np.stack([logits[i, idx] for i, idx in enumerate(logit_index)]),
                    rope_deltas=out.rope_deltas.numpy(),
                    greedy_tokens=gen.sequences[:, inputs["input_ids"].shape[1]:].numpy(),
                    greedy_min_gap=np.float32((top2[..., 1] - top2[..., 0]).min()))

    arrays = run(texts, images)
    n0 = len(PROMPTS[0][1])
    arrays.update({f"alone0.{k}": v for k, v in run(texts[:1], images[:n0]).items()})
    np.savez(os.path.join(args.out_dir, "reference.npz"), **arrays)
    print(json.dumps({"input_ids": list(arrays["input_ids"].shape), "image_grid_thw": arrays["image_grid_thw"].tolist(),
                      "greedy_min_top2_gap": float(arrays["greedy_min_gap"])}))


if __name__ == "__main__":
    sys.exit(main())
