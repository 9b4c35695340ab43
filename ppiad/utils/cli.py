"""Shared command-line plumbing: `-c CONFIG -o key=value ...`, `--model/--adapter`, the demo's model as the
default, and exit code 2 with a one-line reason."""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from ppiad.config import Config, ConfigError, apply_overrides, load_config


class UsageError(Exception):
    """Bad input from the user (a path, a flag): reported in one line, exit code 2."""


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("-c", "--config", required=required, help="YAML config file")
    parser.add_argument("-o", "--opt", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. -o train.max_steps=10 model.dtype=float32")


# Where `make demo` (configs/demo.yaml: output_dir output, run_name demo) leaves its summary, relative to the
# directory it ran in.
DEMO_SUMMARY = os.path.join("output", "demo", "demo_summary.json")
NO_MODEL = ("no model named: give -c CONFIG (a config with model.path), or --model DIR (a Hugging Face-format "
            "Qwen2-VL folder; --adapter DIR adds a trained adapter), or run `make demo` here first to use its model")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model / --adapter: shortcuts for -o model.path=DIR / -o model.adapter=DIR."""
    parser.add_argument("--model", metavar="DIR",
                        help="Hugging Face-format Qwen2-VL checkpoint folder (= -o model.path=DIR)")
    parser.add_argument("--adapter", metavar="DIR",
                        help="LoRA adapter folder, e.g. a training checkpoint (= -o model.adapter=DIR)")


def demo_config(summary_path: str = DEMO_SUMMARY) -> tuple[str, str]:
    """(config.yaml of the demo's evaluation after GRPO, the trained adapter) of a finished `make demo` run.

    Raises UsageError (NO_MODEL) when the demo has not run in this directory or its files are gone."""
    if not os.path.isfile(summary_path):
        raise UsageError(NO_MODEL)
    try:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        config, adapter = os.path.join(summary["reports"]["grpo"], "config.yaml"), summary["adapter"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"'{summary_path}' is not a readable demo summary ({exc}); {NO_MODEL}") from exc
    if not os.path.isfile(config) or not os.path.exists(adapter):
        raise UsageError(f"the demo's model named in '{summary_path}' is gone ({config}, {adapter}); {NO_MODEL}")
    return config, adapter


def config_from_args(args: argparse.Namespace, default_model: bool = False) -> Config:
    """The config of `-c` + `-o`, then --model / --adapter (when the parser has them) on top.

    With `default_model` (infer, eval, serve) and neither -c nor --model, the model is the demo's trained one
    when `make demo` has run in this directory (a note on stderr says so); otherwise UsageError(NO_MODEL)."""
    model, adapter = getattr(args, "model", None), getattr(args, "adapter", None)
    if default_model and not args.config and not model:
        config, demo_adapter = demo_config()
        cfg = load_config(config)
        cfg.model["adapter"] = demo_adapter
        cfg = apply_overrides(cfg, args.opt)
        if adapter:
            cfg.model["adapter"] = adapter
        # the note names what is used: --adapter (or -o model.adapter) replaces the demo's trained adapter
        which = "trained model" if cfg.model.adapter == demo_adapter else "model with another adapter"
        print(f"note: no -c/--config or --model given: using the demo's {which} ({cfg.model.path} + adapter "
              f"{cfg.model.adapter or '(none)'}, config {config})", file=sys.stderr)
        return cfg
    cfg = load_config(args.config, args.opt)
    if model:
        cfg.model["path"] = model
    if adapter:
        cfg.model["adapter"] = adapter
    from ppiad.utils import threads

    try:   # the config's process-wide runtime settings (CPU threads)
        threads.configure(cfg.runtime.cpu_threads)
    except ValueError as exc:
        raise ConfigError(f"config key 'runtime.cpu_threads': {exc}") from exc
    return cfg


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr and exit code 2; others keep their traceback."""
    from ppiad.data.images import ImageLoadError
    from ppiad.data.registry import DatasetError
    from ppiad.models.processor import PromptTooLongError
    from ppiad.utils.identity import IdentityError
    from ppiad.utils.io import MalformedFileError

    try:
        yield
    except (ConfigError, UsageError, ImageLoadError, DatasetError, FileNotFoundError, IdentityError,
            PromptTooLongError, MalformedFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
