"""Reward ablation under imbalance on the demo's task: same data, warm start, step budget and seeds per setting.

    .venv/bin/python bench/ablate_rewards.py                       # all settings, seeds 0 1 2
    .venv/bin/python bench/ablate_rewards.py --settings acc focal_adv --seeds 0 --steps 100
    .venv/bin/python bench/ablate_rewards.py -o train.learning_rate=0.001   # any config override for all runs

Each run trains the demo's warm-started tiny model with GRPO (tools/train.py) and evaluates it on the held-out
synthetic tree (tools/eval.py). Prints F1-macro and defect recall per setting as mean +- std over seeds and
writes <output_dir>/ablation/results.json. Finished runs are reused, so an interrupted ablation continues.
The demo's data and warm-started model are prepared first if absent (same config as `make demo`).
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
from ppiad.demo.pipeline import headline, prepare_data, prepare_model, run_tool  # noqa: E402
from ppiad.rl.checkpoint import find_latest  # noqa: E402
from ppiad.utils.io import atomic_write_json  # noqa: E402

# name -> (description, overrides). Every setting keeps the format reward (weight 1); the focal settings use the
# config's class factors (configs/demo.yaml: auto, the default) unless they name their own, so
# focal_adv_group_auto differs from focal_adv_group only under `-o rewards.focal.class_factors=...`.
SETTINGS = {
    "acc": ("format + accuracy", ["rewards.accuracy_weight=1", "rewards.focal_weight=0"]),
    "focal_reward_group": ("format + focal, reward mode, p from the group",
                           ["rewards.focal.mode=reward", "rewards.focal.p_source=group"]),
    "focal_reward_token": ("format + focal, reward mode, p from the answer token",
                           ["rewards.focal.mode=reward", "rewards.focal.p_source=token"]),
    "focal_adv_group": ("format + focal, advantage_weight mode, p from the group",
                        ["rewards.focal.mode=advantage_weight", "rewards.focal.p_source=group"]),
    "focal_adv_token": ("format + focal, advantage_weight mode, p from the answer token",
                        ["rewards.focal.mode=advantage_weight", "rewards.focal.p_source=token"]),
    "focal_adv_group_auto": ("format + focal, advantage_weight mode, p from the group, f = inverse frequency",
                             ["rewards.focal.mode=advantage_weight", "rewards.focal.p_source=group",
                              "rewards.focal.class_factors=auto"]),
}
METRICS = ("f1_macro", "defect_recall", "false_alarm_rate", "accuracy", "auroc")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("-o", "--opt", nargs="+", action="extend", default=[])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run (default: the config's)")
    args = p.parse_args()

    base = load_config(args.config, args.opt)
    prepare_data(base)
    prepare_model(base)
    steps = args.steps or base.train.max_steps
    out_root = os.path.join(base.output_dir, "ablation")
    results: dict = {}
    for name in args.settings:
        desc, overrides = SETTINGS[name]
        results[name] = {"description": desc, "runs": {}}
        for seed in args.seeds:
            run_name = f"ablation_{name}_s{seed}"
            common = [*args.opt, *overrides, f"seed={seed}", f"run_name={run_name}", f"train.max_steps={steps}"]
            eval_dir = os.path.join(out_root, run_name)
            metrics_path = os.path.join(eval_dir, "metrics.json")
            if not os.path.exists(metrics_path):
                run_tool("train", args.config, [*common, "train.resume=auto"])
                adapter = find_latest(os.path.join(base.output_dir, run_name))
                run_tool("eval", args.config, [*common, f"model.adapter={adapter}"],
                         ["--output_dir", eval_dir, "--no_progress"])
            with open(metrics_path, encoding="utf-8") as f:
                results[name]["runs"][seed] = headline(json.load(f))
        runs = list(results[name]["runs"].values())
        for key in METRICS:
            vals = np.array([r[key] for r in runs if r[key] is not None], dtype=float)
            results[name][key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        atomic_write_json(os.path.join(out_root, "results.json"),
                          {"steps": steps, "seeds": args.seeds, "overrides": args.opt, "results": results})

    print(f"\nReward ablation: {steps} GRPO steps, seeds {args.seeds}, held-out synthetic test set (percent, "
          f"mean +- std over seeds)\n")
    print("| setting | F1-macro | defect recall | false-alarm rate | accuracy | AUROC |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        cells = [f"{100 * r[k]['mean']:.1f} +- {100 * r[k]['std']:.1f}"
                 for k in METRICS]
        print(f"| {r['description']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
