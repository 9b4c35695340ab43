"""Generation speed: ppiad (Paddle, KV cache) vs transformers 4.51.3 (torch) on the same weights and inputs.

    .venv/bin/python bench/generate.py [--configs tiny,medium] [--batches 1,8] [--new-tokens 64] [--repeats 3]

For each model size a checkpoint is written with ppiad's tiny-checkpoint builder (random weights, the task
tokenizer); both sides load that directory. Inputs are ppiad's processor output on synthetic images, saved
to .npz and fed unchanged to the reference (bench/ref_generate.py, run with the reference virtualenv's
python, default .venv-ref/bin/python or $PPIAD_REF_PYTHON). Greedy, NEW_TOKENS tokens per row, no early
stop. Printed per case: tokens/s (all rows, vision + prefill + decode, best of REPEATS runs; the two sides
alternate run by run so that load from other processes hits both alike, each after one warm-up), the ratio
ppiad/ref, the share of greedy tokens both sides agree on, and the mean decode step time over the first and
the last 8 steps (flat = the cache does not make later steps slower).

Threads: both sides get the same count (--threads, default 1: stable on a shared 2-core machine).
MKL_DEBUG_CPU_TYPE=5 is set for both unless --no-mkl-avx2: Paddle's CPU wheel ships an MKL that takes a
slow non-AVX2 code path on AMD CPUs without it (see docs/performance.md). Both are set before Paddle loads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

CONFIGS = {
    # the default tiny stand-in (as in tests and the demo)
    "tiny": dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128),
    # hidden 512, 4 layers, Qwen2-like head layout (head_dim 64, grouped KV)
    "medium": dict(hidden_size=512, layers=4, heads=8, kv_heads=2, intermediate_size=1536, vision_depth=2,
                   vision_embed_dim=128, vision_heads=4),
}
REF_PYTHON = os.environ.get("PPIAD_REF_PYTHON", os.path.join(ROOT, ".venv-ref", "bin", "python"))


def make_inputs(proc, batch, size):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
    return proc.build_inputs(images, ["bottle"] * batch)


def run_ppiad(model, inputs, new_tokens, warmup):
    """One timed generate() call (after a warm-up call if `warmup`)."""
    from ppiad.models.generation import generate

    stamps = []
    hook = model.model.register_forward_pre_hook(lambda layer, args: stamps.append(time.perf_counter()))
    try:
        if warmup:
            generate(model, inputs, max_new_tokens=new_tokens, eos_token_ids=[-1], pad_token_id=0)
        stamps.clear()
        start = time.perf_counter()
        res = generate(model, inputs, max_new_tokens=new_tokens, eos_token_ids=[-1], pad_token_id=0)
        total = time.perf_counter() - start
    finally:
        hook.remove()
    # stamps[0] = prefill start; each later stamp starts a decode step
    return {"seconds": total, "step_seconds": np.diff(stamps[1:]).tolist(), "tokens": res.sequences.numpy().tolist()}


def run_ref(model_dir, inputs_path, new_tokens, env):
    """One timed transformers generate() (after its own warm-up) in the reference virtualenv."""
    proc = subprocess.run([REF_PYTHON, os.path.join(HERE, "ref_generate.py"), model_dir, inputs_path,
                           str(new_tokens), "1"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(runs):
    return min(runs, key=lambda r: r["seconds"])


def edge_means(steps, n=8):
    return 1000 * float(np.mean(steps[:n])), 1000 * float(np.mean(steps[-n:]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,medium")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ref", action="store_true", help="time ppiad only")
    ap.add_argument("--image-size", type=int, default=224, help="square test images (640 -> ~650-token prompts)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both sides")
    ap.add_argument("--no-mkl-avx2", action="store_true", help="do not set MKL_DEBUG_CPU_TYPE=5")
    args = ap.parse_args(argv)
    if not args.no_ref and not os.path.exists(REF_PYTHON):
        sys.exit(f"reference python not found at {REF_PYTHON}: set PPIAD_REF_PYTHON or pass --no-ref")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if not args.no_mkl_avx2:
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    env = dict(os.environ)
    from ppiad.models import AutoModel, AutoProcessor
    from ppiad.models.tiny import build_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            model_dir = build_tiny_checkpoint(os.path.join(tmp, name), seed=0, **CONFIGS[name])
            model = AutoModel.from_pretrained(model_dir)
            proc = AutoProcessor.from_pretrained(model_dir)
            n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
            for batch in [int(b) for b in args.batches.split(",")]:
                inputs = make_inputs(proc, batch, args.image_size)
                inputs_path = os.path.join(tmp, "inputs.npz")
                np.savez(inputs_path, **{k: v.numpy() for k, v in inputs.items()})
                mine, theirs = [], []
                for run in range(args.repeats):  # alternate the two sides
                    mine.append(run_ppiad(model, inputs, args.new_tokens, warmup=run == 0))
                    if not args.no_ref:
                        theirs.append(run_ref(model_dir, inputs_path, args.new_tokens, env))
                ours = best_of(mine)
                n_tok = batch * args.new_tokens
                row = {"config": name, "params_M": n_params / 1e6, "batch": batch,
                       "prompt_len": int(inputs["input_ids"].shape[1]),
                       "ppiad_tok_s": n_tok / ours["seconds"], "ppiad_first8_ms": edge_means(ours["step_seconds"])[0],
                       "ppiad_last8_ms": edge_means(ours["step_seconds"])[1]}
                if not args.no_ref:
                    ref = best_of(theirs)
                    agree = np.mean(np.array(ours["tokens"]) == np.array(ref["tokens"]))
                    row.update({"ref_tok_s": n_tok / ref["seconds"], "ratio": ref["seconds"] / ours["seconds"],
                                "ref_first8_ms": edge_means(ref["step_seconds"])[0],
                                "ref_last8_ms": edge_means(ref["step_seconds"])[1], "token_agreement": float(agree),
                                "ref_threads": ref["threads"]})
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print()
    print("| config | batch | prompt | ppiad tok/s | ref tok/s | ratio | step ms first8 -> last8 (ppiad; ref) | "
          "same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config']} ({r['params_M']:.1f}M) | {r['batch']} | {r['prompt_len']} | {r['ppiad_tok_s']:.0f} | "
              f"{r.get('ref_tok_s', float('nan')):.0f} | {r.get('ratio', float('nan')):.2f} | "
              f"{r['ppiad_first8_ms']:.1f} -> {r['ppiad_last8_ms']:.1f}; "
              f"{r.get('ref_first8_ms', float('nan')):.1f} -> {r.get('ref_last8_ms', float('nan')):.1f} | "
              f"{r.get('token_agreement', float('nan')):.0%} |")


if __name__ == "__main__":
    main()
