"""Qwen2.5-VL at real dimensions: ppiad's logits against transformers 4.51.3 on a random checkpoint stored as the
hub stores it, plus ppiad's load time and peak memory.

    python bench/qwen2_5_vl_real_dims.py --size 3b  --work /tmp/q25_3b           # Qwen2.5-VL-3B-Instruct's dims
    python bench/qwen2_5_vl_real_dims.py --size 7b --layers 4 --work /tmp/q25_7b  # 7B's widths, 4 decoder layers

Two processes, one after the other (never both models in memory at once):
1. the reference virtualenv (.venv-ref, torch + transformers 4.51.3) builds a random Qwen2_5_VLForConditionalGeneration
   with the real config (seeded, initializer_range 0.02), saves it as the hub does (bf16 safetensors in 4 GB shards
   + index, config.json, the real Qwen2 tokenizer, preprocessor_config.json, chat_template.json), then casts it to
   fp32 and runs one forward on a 640x480 synthetic image (644x476 after smart resize: 1,564 patches, 17 x 23
   merged tokens, which do not tile into 4 x 4 windows) with the LR-IAD prompt;
2. ppiad (.venv) loads the folder with AutoModel / AutoProcessor in fp32, checks the input ids, runs the same
   forward and prints the relative logit error max|ppiad - torch| / max|torch| (target <= 1e-3), its load time and
   its peak resident memory (ru_maxrss).

An fp32 3B forward needs ~16 GB per side; each side refuses to start unless /proc/meminfo's MemAvailable is above
`--min-available-gb` (default 18 for 3b, 14 otherwise); `--lock FILE` runs each side under `flock FILE` on a
shared machine. Prints one JSON line per side; exit 0 when the ids are equal and the logits within 1e-3, 3 when
memory was short.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKENIZER_DIR = os.path.join(os.path.dirname(ROOT), "shared", "assets", "qwen2-tokenizer")
REF_PYTHON = os.environ.get("PPIAD_REF_PYTHON", os.path.join(ROOT, ".venv-ref", "bin", "python"))
LOGIT_POSITIONS = 32  # the last positions compared (the answer is read at the end of the prompt)

VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, patch_size=14,
              spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2, hidden_act="silu",
              window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
COMMON = dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", attention_dropout=0.0,
              bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
              vision_token_id=151654, image_token_id=151655, video_token_id=151656, hidden_act="silu",
              initializer_range=0.02, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1000000.0,
              rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, use_cache=True,
              use_sliding_window=False, sliding_window=32768, max_window_layers=70, torch_dtype="bfloat16")
# Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct config.json
SIZES = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, out_hidden_size=2048),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, out_hidden_size=3584),
}
PREPROCESSOR = {  # Qwen2.5-VL-*-Instruct's preprocessor_config.json
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def hub_config(size: str, layers: int | None) -> dict:
    dims = dict(SIZES[size])
    vision = dict(VISION, out_hidden_size=dims.pop("out_hidden_size"))
    if layers:
        dims["num_hidden_layers"] = layers
    return dict(COMMON, **dims, vision_config=vision)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 ** 2
    return 0.0


def the_prompt() -> str:
    sys.path.insert(0, ROOT)
    from ppiad.prompt import build_prompt  # plain Python: importable in either virtualenv

    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{build_prompt('printed circuit board')}<|im_end|>\n"
            "<|im_start|>assistant\n")


def torch_side(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import (AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor)

    model_dir = os.path.join(args.work, "model")
    os.makedirs(model_dir, exist_ok=True)
    cfg_dict = hub_config(args.size, args.layers)
    vision = dict(cfg_dict["vision_config"])
    vision["in_channels"] = vision.pop("in_chans")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**dict(cfg_dict, vision_config=vision))).eval()
    torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(model_dir, safe_serialization=True, max_shard_size="4GB")
    with open(os.path.join(model_dir, "config.json"), "w") as f:  # the hub's own spelling (in_chans, mrope)
        json.dump(cfg_dict, f, indent=2)
    save_s = time.perf_counter() - t0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), model_dir)
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=2)
    with open(os.path.join(ROOT, "ppiad", "models", "chat_template.jinja"), encoding="utf-8") as f:
        template = f.read()
    with open(os.path.join(model_dir, "chat_template.json"), "w") as f:
        json.dump({"chat_template": template}, f)

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).resize((640, 480))
    image.save(os.path.join(args.work, "image.png"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**{
        k: v for k, v in PREPROCESSOR.items() if k not in ("image_processor_type", "processor_class")}),
        tokenizer=tokenizer)
    inputs = processor(text=[the_prompt()], images=[image], return_tensors="pt")
    model = model.float()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(**inputs).logits[0, -LOGIT_POSITIONS:].numpy()
    forward_s = time.perf_counter() - t0
    np.savez(os.path.join(args.work, "torch.npz"), input_ids=inputs["input_ids"].numpy(), logits=logits,
             image_grid_thw=inputs["image_grid_thw"].numpy())
    n_params = sum(p.numel() for p in model.parameters())
    return {"side": "torch", "size": args.size, "layers": cfg_dict["num_hidden_layers"], "params_B": n_params / 1e9,
            "tokens": int(inputs["input_ids"].shape[1]), "grid": inputs["image_grid_thw"].tolist(),
            "build_s": round(build_s, 1), "save_s": round(save_s, 1), "forward_s": round(forward_s, 1),
            "peak_rss_GB": round(peak_rss_gb(), 2)}


def ppiad_side(args) -> dict:
    import numpy as np
    import paddle

    sys.path.insert(0, ROOT)
    from ppiad.models import AutoModel, AutoProcessor

    model_dir = os.path.join(args.work, "model")
    ref = np.load(os.path.join(args.work, "torch.npz"))
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(model_dir, dtype="float32")
    load_s = time.perf_counter() - t0
    load_rss = peak_rss_gb()
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(text=[the_prompt()], images=[os.path.join(args.work, "image.png")])
    ids_equal = bool(np.array_equal(inputs["input_ids"].numpy(), ref["input_ids"]))
    t0 = time.perf_counter()
    with paddle.no_grad():
        logits = model(**inputs, logits_to_keep=LOGIT_POSITIONS).logits[0].numpy()
    forward_s = time.perf_counter() - t0
    rel = float(np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max())
    same_argmax = float((logits.argmax(-1) == ref["logits"].argmax(-1)).mean())
    files = sorted(os.listdir(model_dir))
    return {"side": "ppiad", "size": args.size, "model": type(model).__name__, "files": files,
            "input_ids_equal": ids_equal, "logits_rel_err": rel, "argmax_agreement": same_argmax,
            "load_s": round(load_s, 1), "peak_rss_after_load_GB": round(load_rss, 2), "forward_s": round(forward_s, 1),
            "peak_rss_GB": round(peak_rss_gb(), 2), "threads": os.environ.get("OMP_NUM_THREADS")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="3b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real count)")
    ap.add_argument("--work", required=True, help="scratch directory (the checkpoint is ~7.5 GB for 3b)")
    ap.add_argument("--min-available-gb", type=float, default=None)
    ap.add_argument("--lock", help="a lock file shared by memory-heavy jobs on this machine: each side runs "
                                   "under `flock LOCK`, so two big models are never in memory at once")
    ap.add_argument("--side", choices=["torch", "ppiad"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:  # checked by each side, after it holds the lock
        need = args.min_available_gb or (18.0 if args.size == "3b" and not args.layers else 14.0)
        have = mem_available_gb()
        if have < need:
            print(json.dumps({"side": args.side, "skipped": f"MemAvailable {have:.1f} GB < {need:.0f} GB needed"}))
            return 3
    if args.side == "torch":
        print(json.dumps(torch_side(args)), flush=True)
        return 0
    if args.side == "ppiad":
        result = ppiad_side(args)
        print(json.dumps(result), flush=True)
        return 0 if result["input_ids_equal"] and result["logits_rel_err"] <= 1e-3 else 1
    os.makedirs(args.work, exist_ok=True)
    base = [os.path.abspath(__file__), "--size", args.size, "--work", args.work] + \
        (["--layers", str(args.layers)] if args.layers else []) + \
        (["--min-available-gb", str(args.min_available_gb)] if args.min_available_gb else [])
    lock = ["flock", args.lock] if args.lock else []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    code = subprocess.run([*lock, REF_PYTHON, *base, "--side", "torch"], env=env).returncode
    if code:
        return code
    return subprocess.run([*lock, sys.executable, *base, "--side", "ppiad"], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
