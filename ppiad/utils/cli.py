"""Shared command-line plumbing: `-c CONFIG -o key=value ...`, and exit code 2 with a one-line reason."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Iterator

from ppiad.config import Config, ConfigError, load_config


class UsageError(Exception):
    """Bad input from the user (a path, a flag): reported in one line, exit code 2."""


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("-c", "--config", required=required, help="YAML config file")
    parser.add_argument("-o", "--opt", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. -o train.max_steps=10 model.dtype=float32")


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config and apply its process-wide runtime settings (CPU threads)."""
    from ppiad.utils import threads

    cfg = load_config(args.config, args.opt)
    try:
        threads.configure(cfg.runtime.cpu_threads)
    except ValueError as exc:
        raise ConfigError(f"config key 'runtime.cpu_threads': {exc}") from exc
    return cfg


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr and exit code 2; others keep their traceback."""
    from ppiad.data.images import ImageLoadError
    from ppiad.data.registry import DatasetError

    try:
        yield
    except (ConfigError, UsageError, ImageLoadError, DatasetError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
