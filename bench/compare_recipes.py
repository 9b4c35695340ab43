"""GRPO recipes on the demo's task (issue 16, item 8): the recipe before dynamic sampling against dynamic
sampling (the demo's default since this comparison), Dr. GRPO, milder class factors and clip-higher; same data,
warm start, step budget and seeds. Each recipe states its settings in full, so the comparison does not move
when configs/demo.yaml does.

    .venv/bin/python bench/compare_recipes.py                                  # all recipes, seeds 0 1 2
    .venv/bin/python bench/compare_recipes.py --recipes base dynamic --seeds 0 --steps 100 --eval_every 25
    .venv/bin/python bench/compare_recipes.py -o train.learning_rate=0.001     # any override for all runs

Each run is tools/train.py on the demo config with `train.eval_every` held-out evaluations (the whole held-out
tree, greedy; the same images for every recipe). From each run's metrics.jsonl the script reads eval/f1_macro
and eval/auroc at every evaluated step, and the training time to the first evaluation with F1-macro >= the
target (the sum of train/seconds_per_step up to that step: rollouts and updates, not the evaluations).
Prints mean +- std over seeds and writes <output_dir>/recipes/results.json. Finished runs are reused (a run
directory resumes with train.resume=auto), so an interrupted comparison continues.

Clip-higher changes nothing at grpo.num_iterations = 1 (the ratio is exactly 1 there), so it is compared at
k = 2 against today's recipe at k = 2. ~10 CPU-minutes per run on an idle 2-core machine (the demo's budget).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ppiad.config import load_config  # noqa: E402
from ppiad.demo.pipeline import prepare_data, prepare_model, run_tool  # noqa: E402
from ppiad.utils.io import atomic_write_json, read_jsonl  # noqa: E402

OFF = ["grpo.dynamic_sampling=false"]   # the recipe before dynamic sampling became the demo's default
RECIPES = {
    "base": ("the recipe before dynamic sampling (bnpo, group std)", OFF),
    "dynamic": ("dynamic sampling, factor 3 (the demo's default)", ["grpo.dynamic_sampling=true",
                                                                        "grpo.max_resample_factor=3"]),
    "dr_grpo": ("Dr. GRPO (constant divisor, no std scaling)", [*OFF, "grpo.loss_type=dr_grpo"]),
    "sqrt_factors": ("milder class factors (sqrt of the inverse frequency)",
                     [*OFF, "rewards.focal.class_factors=sqrt_inverse"]),
    "base_k2": ("the recipe before dynamic sampling, 2 updates per rollout", [*OFF, "grpo.num_iterations=2"]),
    "clip_higher_k2": ("clip-higher 0.28, 2 updates per rollout",
                       [*OFF, "grpo.num_iterations=2", "grpo.epsilon_high=0.28"]),
    "dapo": ("dynamic sampling + clip-higher 0.28 + masked truncation, k = 2",
             ["grpo.dynamic_sampling=true", "grpo.epsilon_high=0.28", "grpo.mask_truncated_completions=true",
              "grpo.num_iterations=2"]),
}


def curve(run_dir: str) -> dict:
    """{step: (f1_macro, auroc, training seconds up to the step)} from a run's metrics.jsonl."""
    rows: dict = {}
    for row in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):   # a resumed run logs some steps again:
        rows.setdefault(int(row["step"]), {}).update(row)            # the last record of a step wins
    seconds, out = 0.0, {}
    for step in sorted(rows):
        seconds += rows[step].get("seconds_per_step", 0.0)
        if "eval/f1_macro" in rows[step]:
            out[step] = (rows[step]["eval/f1_macro"], rows[step].get("eval/auroc"), seconds)
    return out


def mean_std(values) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not v.size:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("-o", "--opt", nargs="+", action="extend", default=[])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default: the config's)")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--target_f1", type=float, default=0.85)
    args = p.parse_args()

    base = load_config(args.config, args.opt)
    prepare_data(base)
    prepare_model(base)
    steps = args.steps or base.train.max_steps
    results: dict = {}
    for name in args.recipes:
        desc, overrides = RECIPES[name]
        runs = {}
        for seed in args.seeds:
            run_name = f"recipe_{name}_s{seed}"
            run_tool("train", args.config, [*args.opt, *overrides, f"seed={seed}", f"run_name={run_name}",
                                            f"train.max_steps={steps}", f"train.eval_every={args.eval_every}",
                                            "train.eval_images=-1", "train.resume=auto"])
            runs[seed] = curve(os.path.join(base.output_dir, run_name))
        evaluated = sorted(set.intersection(*(set(c) for c in runs.values())))
        reach = [next((c[s][2] for s in sorted(c) if c[s][0] >= args.target_f1), None) for c in runs.values()]
        results[name] = {
            "description": desc, "overrides": overrides,
            "f1_macro": {s: mean_std(c[s][0] for c in runs.values()) for s in evaluated},
            "auroc": {s: mean_std(c[s][1] for c in runs.values()) for s in evaluated},
            "seconds_to_target": mean_std(reach), "reached_target": sum(r is not None for r in reach),
        }
        atomic_write_json(os.path.join(base.output_dir, "recipes", "results.json"),
                          {"steps": steps, "seeds": args.seeds, "overrides": args.opt, "target_f1": args.target_f1,
                           "results": results})

    pct = lambda m: "-" if m["mean"] is None else f"{100 * m['mean']:.1f} +- {100 * m['std']:.1f}"  # noqa: E731
    print(f"\nGRPO recipes: {steps} steps, seeds {args.seeds}, held-out synthetic tree (percent, mean +- std)\n")
    for name, r in results.items():
        cells = [f"step {s}: F1 {pct(r['f1_macro'][s])}, AUROC {pct(r['auroc'][s])}" for s in r["f1_macro"]]
        t = r["seconds_to_target"]
        reach = "-" if t["mean"] is None else f"{t['mean']:.0f} s ({r['reached_target']}/{len(args.seeds)} seeds)"
        print(f"- {r['description']}: " + "; ".join(cells) + f"; time to F1 {args.target_f1}: {reach}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
