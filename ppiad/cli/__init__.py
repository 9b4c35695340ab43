"""The command-line tools: `ppiad <command> ...` (also `python -m ppiad`, and `python tools/<command>.py` in a
checkout). Each command is a module here with `main(argv=None) -> int`; exit code 0 on success, 2 on bad input
with a one-line reason.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module under ppiad.cli, one-line summary)
COMMANDS = {
    "train": ("train", "train LoRA adapters of Qwen2-VL / Qwen2.5-VL with GRPO"),
    "eval": ("eval", "evaluate a model (+ adapter) on a dataset partition and write a report"),
    "mmad": ("mmad", "evaluate on the MMAD benchmark (1-shot detection, or all seven subtasks)"),
    "infer": ("infer", "inspect one image or a folder: verdict, P(defect), reasoning"),
    "serve": ("serve", "the inspection web app and its JSON API"),
    "export": ("export", "merge an adapter and write a Hugging Face-format checkpoint"),
    "prepare-data": ("prepare_data", "synthetic data, dataset statistics"),
    "demo": ("demo", "the whole method end to end on a CPU (what `make demo` runs)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ppiad <command> [options]   (ppiad <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from ppiad import __version__

        print(f"ppiad {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"ppiad.cli.{COMMANDS[name][0]}")
    sys.argv[0] = f"ppiad {name}"  # argparse names the program after it in usage and errors
    return module.main(argv[1:]) or 0
