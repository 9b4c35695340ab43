"""Evaluate a Qwen2-VL / Qwen2.5-VL checkpoint (optionally with a LoRA adapter) on a dataset partition, report.

    python tools/eval.py -c configs/lriad_mvtec.yaml -o model.adapter=output/lriad_mvtec/final
    python tools/eval.py -c configs/lriad_mvtec.yaml -o model.adapter= --output_dir output/base_on_visa
    python -m paddle.distributed.launch --nproc_per_node 4 tools/eval.py -c configs/lriad_mvtec.yaml
    python tools/eval.py --compare "Qwen2-VL base=output/base_on_visa" "LR-IAD=<folder the first command printed>" \
        --output_dir output/table3      (paper-style comparison of finished runs; no model is loaded)

Data: cfg.data.eval (dataset, root, split, categories). Output (default
<output_dir>/<run_name>/eval_<dataset>_<split>_<model>_<adapter or "base">): identity.json (every setting the
predictions depend on), predictions.jsonl (resumable: re-running skips finished images), metrics.json,
report.md, overall.csv, per_category.csv, report.png, config.yaml. A re-run into a folder whose identity.json
differs stops before loading anything, naming the differing settings (ppiad.eval.identity).
Exit code 0 on success, 2 on bad input with a one-line reason.
"""
from __future__ import annotations

import warnings

# Paddle warns about a missing C++ compiler cache on import; it concerns extension builds, not this tool.
warnings.filterwarnings("ignore", message="No ccache found")

import argparse
import os
import sys

from ppiad.config import ConfigError, require, save_config
from ppiad.utils.cli import UsageError, add_config_args, add_model_args, config_from_args, user_errors
from ppiad.utils.identity import base_model_mismatch, digest, resolve_adapter, write_identity


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    add_model_args(p)
    p.add_argument("--compare", nargs="+", metavar="NAME=DIR",
                   help="write a Table III / V-VI comparison of finished eval runs to <output_dir>/comparison.md")
    p.add_argument("--calibrate", action="store_true",
                   help="also report figures at the P(A) threshold meeting eval.target_fpr (= -o eval.calibrate=true)")
    p.add_argument("--output_dir", help="where to write predictions and the report (default "
                                        "<output_dir>/<run_name>/eval_<dataset>_<split>_<model>_<adapter or base>)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def default_output_dir(cfg) -> str:
    """Named after the data, the model and the adapter, so the base model and each adapter get their own."""
    from ppiad.eval.identity import model_tag

    part = cfg.data.eval
    k = cfg.prompt.reference_images
    shots = f"_{k}shot" if k else ""   # k-shot and 0-shot predictions never share a folder
    return os.path.join(cfg.output_dir, cfg.run_name, f"eval_{part.dataset}_{part.split}_{model_tag(cfg)}{shots}")


def check_output_identity(cfg, out_dir: str) -> dict:
    """The evaluation's identity; IdentityError (exit code 2) if `out_dir` holds predictions of another one."""
    import glob

    from ppiad.eval.identity import evaluation_identity
    from ppiad.eval.runner import PREDICTIONS
    from ppiad.utils.identity import check_identity

    identity = evaluation_identity(cfg)
    results = [os.path.join(out_dir, PREDICTIONS), os.path.join(out_dir, "metrics.json")]
    has_results = any(os.path.exists(f) for f in results) or bool(glob.glob(os.path.join(out_dir, "predictions.rank*")))
    check_identity(out_dir, identity, "predictions", "give another --output_dir or delete that folder",
                   has_results=has_results)
    return identity


def _default_predictor(cfg):
    from ppiad.eval.predictor import ModelPredictor

    return ModelPredictor.from_config(cfg)


def run(args, cfg, predictor_factory) -> int:
    from ppiad.data.registry import build_dataset
    from ppiad.eval.runner import dist_info, run_evaluation

    part = cfg.data.eval
    require(cfg, "data.eval.root", f"the {part.dataset} dataset directory to evaluate on")
    if not os.path.isdir(part.root):
        raise UsageError(f"data.eval.root '{part.root}' is not a directory")
    model_path = require(cfg, "model.path", "the Qwen2-VL / Qwen2.5-VL checkpoint directory to evaluate")
    if cfg.eval.batch_size <= 0:
        raise ConfigError(f"config key 'eval.batch_size' must be positive, got {cfg.eval.batch_size}")
    if not 0.0 <= cfg.eval.target_fpr <= 1.0:
        raise ConfigError(f"config key 'eval.target_fpr' must be in [0, 1], got {cfg.eval.target_fpr}")
    calibrate = args.calibrate or cfg.eval.calibrate
    threshold = cfg.eval.threshold if cfg.eval.threshold >= 0 else None
    if calibrate and threshold is not None:
        raise ConfigError("eval.threshold is set and calibration was asked for: use one (calibrate fits a "
                          "threshold on this data; eval.threshold applies one fitted elsewhere)")
    if threshold is not None and threshold > 1:
        raise ConfigError(f"config key 'eval.threshold' is a probability in [0, 1] (or -1 = off), got {threshold}")
    samples = build_dataset(part, cfg.data.object_names)
    if not samples:
        raise UsageError(f"data.eval: no images in {part.dataset} '{part.root}' (split {part.split})")
    from ppiad.data.leakage import guard_run, partition_paths
    from ppiad.data.references import build_reference_pool

    # k-shot references: never an image of the evaluated partition
    references = build_reference_pool(cfg, "eval", exclude=[s.path for s in samples])
    # leakage guard: evaluation images identical to training images or references stop the run (exit 2)
    guard_run(cfg, partition_paths(cfg, "train"), [s.path for s in samples], references)
    out_dir = args.output_dir or default_output_dir(cfg)
    identity = check_output_identity(cfg, out_dir)   # every rank, before anything is written
    rank, _ = dist_info()
    predictor = predictor_factory(cfg)  # after the cheap checks: loading a 7B model takes a while
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_identity(out_dir, identity)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))

    # the checkpoint really used (a `latest` pointer resolved) and its content hash, not the name given
    adapter = (f"{resolve_adapter(cfg.model.adapter)} ({identity['model.adapter']})" if cfg.model.adapter
               else "base model")
    meta = {"model": model_path, "adapter": adapter, "dataset": part.dataset, "root": part.root,
            "partition": part.split, "categories": ", ".join(part.categories) or "all",
            "decoding": ("sampling, temperature %g" % cfg.eval.temperature) if cfg.eval.do_sample else "greedy",
            "max_new_tokens": cfg.eval.max_new_tokens, "identity": f"{digest(identity)} (identity.json)"}
    mismatch = base_model_mismatch(cfg.model.adapter, model_path)   # printed by the loader, kept in the report
    if mismatch:
        meta["warning"] = mismatch
    # run_evaluation adds k ("reference images (k-shot)") and the reference pool to the meta
    name = os.path.basename(resolve_adapter(cfg.model.adapter) if cfg.model.adapter else os.path.normpath(model_path))
    if cfg.model.adapter:
        name += f" ({identity['model.adapter'][:19]})"   # sha256:<12 hex> of the adapter's content
    title = f"{name} on {part.dataset} ({part.split})"
    metrics = run_evaluation(samples, predictor, out_dir, batch_size=cfg.eval.batch_size, meta=meta,
                             max_images=cfg.eval.max_images, calibrate=calibrate,
                             target_fpr=cfg.eval.target_fpr, threshold=threshold, title=title, progress=not args.no_progress,
                             num_workers=cfg.data.num_workers, bit_depth=part.bit_depth, references=references)
    if metrics is not None:
        o = metrics["overall"]
        line = (f"{title}: accuracy {100 * o['accuracy']:.2f}  F1-macro {100 * o['f1_macro']:.2f}  "
                f"invalid {100 * o['invalid_rate']:.2f}%  ({o['n']} images")
        n_bad = metrics.get("unreadable", {}).get("n", 0)
        line += f", {n_bad} unreadable excluded)" if n_bad else ")"
        print(line)
        cal = metrics.get("calibrated")
        if cal and cal.get("threshold") is not None:
            c = cal["overall"]
            kind = "fixed threshold" if cal.get("fixed") else "calibrated"
            print(f"{kind} (P(A) >= {cal['threshold']:.4f}, false alarms {100 * (cal['fpr'] or 0):.2f}%): "
                  f"accuracy {100 * c['accuracy']:.2f}  F1-macro {100 * c['f1_macro']:.2f}  "
                  f"defect recall {100 * c['recall']['defect']:.2f}")
        print(f"report: {os.path.join(out_dir, 'report.md')}")
    return 0


def compare(args) -> int:
    from ppiad.eval.report import write_comparison

    runs = []
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path:
            raise UsageError(f"--compare expects NAME=DIR, got '{item}'")
        metrics = path if path.endswith(".json") else os.path.join(path, "metrics.json")
        if not os.path.isfile(metrics):
            raise UsageError(f"--compare {name}: no metrics.json at '{metrics}' (run tools/eval.py first)")
        runs.append((name.strip(), metrics))
    if not args.output_dir:
        raise UsageError("--compare needs --output_dir for comparison.md")
    out = os.path.join(args.output_dir, "comparison.md")
    try:
        text = write_comparison(runs, out, title="Comparison of evaluation runs")
    except (ValueError, KeyError) as exc:
        raise UsageError(f"--compare: {exc}") from exc
    print(text)
    from ppiad.eval.report import image_count_warning, load_metrics

    warning = image_count_warning([(name, load_metrics(m)) for name, m in runs])
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"written: {out}")
    return 0


def main(argv=None, predictor_factory=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        if args.compare:
            return compare(args)
        cfg = config_from_args(args, default_model=True)
        return run(args, cfg, predictor_factory or _default_predictor)


if __name__ == "__main__":
    sys.exit(main())
