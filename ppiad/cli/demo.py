"""Train and evaluate LR-IAD end to end on a CPU: synthetic data, a tiny stand-in model, GRPO (what `make demo` runs).

    python tools/demo.py                       # configs/demo.yaml
    python tools/demo.py -o train.max_steps=50 # any config key, as for the other tools

Generates synthetic industrial data (train and held-out trees), builds a tiny Qwen2-VL-architecture stand-in,
warm-starts it on the answer format only (random answers), trains it with GRPO (format + focal rewards),
evaluates before and after GRPO on the held-out tree, inspects a few images with drawn explanations, and
prints the figures and where everything is. Re-running continues where a previous run stopped.
"""
from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message="No ccache found")

import argparse
import os
import sys

from ppiad.utils.cli import add_config_args, config_from_args, user_errors

DEFAULT_CONFIG = os.path.join("configs", "demo.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, required=False)
    args = parser.parse_args(argv)
    args.config = args.config or DEFAULT_CONFIG
    with user_errors():
        cfg = config_from_args(args)
        from ppiad.demo.pipeline import run_demo

        run_demo(cfg, args.config, args.opt, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
