"""GRPO training-step cost on CPU: seconds per optimizer step, split into rollout / reference / policy update,
and peak memory (process RSS), for the tiny configuration (configs/tiny_cpu.yaml).

    .venv/bin/python bench/train_step.py [--steps 6] [--new-tokens 48] [--sizes tiny,medium] [--json]

A tiny checkpoint (random weights; `medium` = hidden 512, 4 layers) and a synthetic dataset are written to a
temporary directory; the trainer then runs STEPS optimizer steps with configs/tiny_cpu.yaml's settings
(G=4 completions, 1 prompt x 2 accumulation steps, 112x112 images). A random model rarely emits the stop
token, so completions run to --new-tokens: the figures are the worst case for that length. The first step
(warm-up) is left out of the means. Peak RSS is the process maximum (model, activations, allocator caches).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

SIZES = {
    "tiny": {},
    "medium": dict(hidden_size=512, layers=4, heads=8, kv_heads=2, intermediate_size=1376),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run(size: str, steps: int, new_tokens: int, work: str) -> dict:
    from ppiad.config import load_config
    from ppiad.data.synthetic import generate_synthetic
    from ppiad.models.tiny import build_tiny_checkpoint
    from ppiad.rl.trainer import GRPOTrainer

    model_dir = build_tiny_checkpoint(os.path.join(work, f"model_{size}"), seed=0, **SIZES[size])
    data = os.path.join(work, "synth")
    if not os.path.isdir(data):
        generate_synthetic(data, num_images=64, defect_ratio=0.25, size=112, seed=0)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), [
        f"model.path={model_dir}", f"data.train.root={data}", f"output_dir={work}", f"run_name=bench_{size}",
        f"train.max_steps={steps}", f"grpo.max_new_tokens={new_tokens}", f"train.save_every={steps + 1}"])
    start = time.perf_counter()
    GRPOTrainer(cfg).train()
    wall = time.perf_counter() - start
    with open(os.path.join(work, f"bench_{size}", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][1:]  # drop the warm-up step
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"size": size, "steps_timed": len(rows), "new_tokens": new_tokens,
            "completions_per_step": cfg.grpo.num_generations * cfg.train.grad_accum_steps,
            "completion_length": mean("completion_length"), "seconds_per_step": mean("seconds_per_step"),
            "rollout": mean("seconds_rollout"), "reference": mean("seconds_reference"),
            "update": mean("seconds_update"), "peak_rss_mb": peak_rss_mb(), "wall_seconds": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--sizes", default="tiny")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a Markdown table")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work:
        for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            if size not in SIZES:
                p.error(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
            results.append(run(size, args.steps, args.new_tokens, work))
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    print("| model | completions/step | mean length | s/step | rollout | reference | update | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['size']} | {r['completions_per_step']} | {r['completion_length']:.1f} | "
              f"{r['seconds_per_step']:.2f} | {r['rollout']:.2f} | {r['reference']:.2f} | {r['update']:.2f} | "
              f"{r['peak_rss_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
