"""Train LoRA adapters of Qwen2-VL or Qwen2.5-VL with GRPO (LR-IAD).

    python tools/train.py -c configs/tiny_cpu.yaml
    python tools/train.py -c configs/lriad_mvtec.yaml -o model.path=/models/Qwen2-VL-7B-Instruct \
        data.train.root=/data/mvtec_ad
    python -m paddle.distributed.launch --gpus 0,1,2,3 tools/train.py -c configs/lriad_mvtec.yaml
    python tools/train.py -c configs/lriad_mvtec.yaml -o train.resume=auto      # continue the latest checkpoint

Output in <output_dir>/<run_name>/: checkpoints/step_XXXXXX/ (adapter_model.safetensors + adapter_config.json:
pass the directory to tools/eval.py as model.adapter), vdl/ (VisualDL), metrics.jsonl, train.log, config.yaml,
identity.json (every setting the checkpoints depend on: a run directory whose checkpoints were made with other
settings is not continued; the tool stops naming the differing keys; a folder without checkpoints is not bound).
Extend a finished run with -o train.resume=auto train.max_steps=N (constant lr_schedule without warm-up only).
Ctrl-C (or SIGTERM) saves a checkpoint after the current step and exits 0; a second Ctrl-C aborts.
Exit code 0 on success, 2 on bad input with a one-line reason.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ppiad.config import ConfigError, require
from ppiad.utils.cli import add_config_args, config_from_args, user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    return p


def check_paths(cfg) -> None:
    """Stop early, naming the config key, when the model or the data is missing."""
    path = require(cfg, "model.path", "the Qwen2-VL / Qwen2.5-VL checkpoint directory to train")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"config key 'model.path': '{path}' is not a Hugging Face-format checkpoint directory (no "
                          f"config.json); set -o model.path=DIR")
    root = require(cfg, "data.train.root", f"the {cfg.data.train.dataset} training dataset directory")
    if not os.path.isdir(root):
        raise ConfigError(f"config key 'data.train.root': '{root}' is not a directory; set -o data.train.root=DIR")


def check_run_identity(cfg) -> None:
    """Stop (exit code 2, naming the differing keys) before continuing a run directory whose checkpoints were
    made with other settings; record this run's identity otherwise (ppiad.rl.identity).

    The identity binds a run directory only once it holds a checkpoint: a start that failed before its first
    checkpoint (bad setting, crash in setup) leaves nothing to continue, so the next start simply replaces its
    identity.json. train.max_steps / train.epochs may change (e.g. to extend a finished run) unless the
    learning-rate schedule depends on the total steps; the message then says why."""
    from ppiad.rl.checkpoint import find_latest
    from ppiad.rl.identity import NOT_IDENTITY, RUN_LENGTH, schedule_needs_total, training_identity
    from ppiad.utils.identity import IdentityError, check_identity, write_identity

    run_dir = os.path.join(cfg.output_dir, cfg.run_name)
    identity = training_identity(cfg)
    if find_latest(run_dir) is not None:
        why = schedule_needs_total(cfg)
        ignore = NOT_IDENTITY if why else NOT_IDENTITY | set(RUN_LENGTH)   # keys an older ppiad recorded
        try:
            check_identity(run_dir, identity, "training checkpoints", "pass another run_name (or output_dir) or "
                           "delete that folder", has_results=True, ignore=ignore)
        except IdentityError as exc:
            if why and any(k in str(exc) for k in RUN_LENGTH):
                raise IdentityError(f"{exc} (the run length cannot change here: {why}; only a constant "
                                    f"lr_schedule without warm-up can be extended)") from None
            raise
    if os.environ.get("PADDLE_TRAINER_ID", "0") == "0":   # rank 0 (paddle.distributed.launch sets the id)
        os.makedirs(run_dir, exist_ok=True)
        write_identity(run_dir, identity)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        cfg = config_from_args(args)
        check_paths(cfg)
        check_run_identity(cfg)
        from ppiad.rl.trainer import GRPOTrainer

        summary = GRPOTrainer(cfg).train()
    if summary["rank"] == 0:
        print(json.dumps({k: summary[k] for k in ("step", "checkpoint", "stopped", "run_dir")}))
    return exit_code(summary)


def exit_code(summary: dict) -> int:
    """0 for a finished run; 128 + the signal number for one stopped by a signal after saving (130 for Ctrl-C,
    143 for SIGTERM: the shell convention, so scripts and schedulers see the run did not finish)."""
    import signal

    name = summary.get("signal") or ""
    return 128 + signal.Signals[name].value if summary.get("stopped") and name else 0


if __name__ == "__main__":
    sys.exit(main())
