"""Evaluate a Qwen2-VL / Qwen2.5-VL checkpoint (optionally with a LoRA adapter) on MMAD (ppiad.eval.mmad).

    python tools/mmad.py -c configs/lriad_mvtec.yaml --mmad_json data/MMAD/mmad.json            (1-shot detection)
    python tools/mmad.py -c configs/lriad_mvtec.yaml --mmad_json data/MMAD/mmad.json --subtasks all --shots 0

Output (default <output_dir>/<run_name>/mmad_<subtasks>_<k>shot_<model tag>, the tag being <model dir>_base
or <model dir>_<adapter name>-<8 hex of the adapter's content hash>): identity.json, answers.jsonl (resumable),
mmad_metrics.json (MMAD's figures per source and ppiad's detection figures), mmad_report.md, config.yaml.
Before the model loads, MMAD's query images are compared with data.train's images by content (leakage guard,
ppiad.data.leakage): LR-IAD's "All" partitions hold the test images MMAD asks about; data.allow_overlap=true runs
anyway.
Exit code 0 on success, 2 on bad input with a one-line reason.
"""
from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message="No ccache found")

import argparse
import os
import sys

from ppiad.utils.cli import UsageError, add_config_args, config_from_args, user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--mmad_json", required=True, help="MMAD's mmad.json")
    p.add_argument("--data_root", help="folder the json's image paths are relative to (default: the json's folder)")
    p.add_argument("--subtasks", choices=("detection", "all"), default="detection",
                   help="the anomaly-detection question alone, or all seven subtasks")
    p.add_argument("--shots", type=int, default=1, help="normal templates before the query (MMAD's default: 1)")
    p.add_argument("--templates", choices=("random", "similar"), default="random",
                   help="MMAD's random_templates (default) or similar_templates")
    p.add_argument("--max_images", type=int, default=-1, help="at most this many images, evenly spread (-1 = all)")
    p.add_argument("--output_dir", help="where answers and the report go (default: see above; it names the adapter)")
    return p


def mmad_identity(cfg, args) -> dict:
    """evaluation_identity's model and prompt settings (not data.eval's, nor the config's k-shot pool) + MMAD's."""
    from ppiad.eval.identity import evaluation_identity
    from ppiad.utils.identity import file_fingerprint

    ident = {k: v for k, v in evaluation_identity(cfg).items()
             if not k.startswith("data.eval") and "reference" not in k}
    ident.update({"mmad.json": file_fingerprint(args.mmad_json), "mmad.data_root": os.path.abspath(
        args.data_root or os.path.dirname(os.path.abspath(args.mmad_json))), "mmad.subtasks": args.subtasks,
        "mmad.shots": args.shots, "mmad.templates": args.templates})
    return ident


def _default_predictor(cfg):
    from ppiad.eval.predictor import ModelPredictor

    return ModelPredictor.from_config(cfg)


def run(args, cfg, predictor_factory) -> int:
    from ppiad.eval.identity import model_tag
    from ppiad.eval.mmad import MMADError, run_mmad, load_mmad
    from ppiad.eval.runner import select_subset
    from ppiad.config import save_config
    from ppiad.utils.identity import check_identity, write_identity

    try:
        items = load_mmad(args.mmad_json, args.data_root, args.subtasks, args.shots, args.templates)
    except MMADError as exc:
        raise UsageError(str(exc)) from None
    items = select_subset(items, args.max_images)
    if not items:
        raise UsageError("no MMAD images to evaluate (--max_images 0?)")
    from ppiad.data.leakage import guard_run, partition_paths

    # MMAD's query images are MVTec-AD / VisA / ... test images: a model trained on those partitions has seen them
    guard_run(cfg, partition_paths(cfg, "train"), [i.path for i in items])
    out = args.output_dir or os.path.join(cfg.output_dir, cfg.run_name,
                                          f"mmad_{args.subtasks}_{args.shots}shot_{model_tag(cfg)}")
    identity = mmad_identity(cfg, args)
    check_identity(out, identity, "MMAD answers", "give another --output_dir or delete that folder",
                   has_results=os.path.exists(os.path.join(out, "answers.jsonl")))
    predictor = predictor_factory(cfg)
    os.makedirs(out, exist_ok=True)
    write_identity(out, identity)
    save_config(cfg, os.path.join(out, "config.yaml"))
    meta = {"model": cfg.model.path, "adapter": cfg.model.adapter or "base model", "mmad_json": args.mmad_json,
            "subtasks": args.subtasks, "shots": args.shots, "templates": args.templates}
    metrics = run_mmad(items, predictor, out, batch_size=cfg.eval.batch_size, object_names=cfg.data.object_names,
                       bit_depth=cfg.data.eval.bit_depth, meta=meta)
    avg = metrics["mmad"]["average"]
    det = avg["accuracy"].get("Anomaly Detection")
    print(f"MMAD ({args.subtasks}, {args.shots}-shot): average {100 * (avg['average'] or 0):.2f}"
          + (f", detection balanced accuracy {100 * det:.2f}" if det is not None else "")
          + f", {metrics['mmad']['unparseable']} unparseable of {metrics['mmad']['n']} answers (counted wrong)")
    print(f"report: {os.path.join(out, 'mmad_report.md')}")
    return 0


def main(argv=None, predictor_factory=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        cfg = config_from_args(args)
        return run(args, cfg, predictor_factory or _default_predictor)


if __name__ == "__main__":
    sys.exit(main())
