"""Dataset preparation and inspection.

  python tools/prepare_data.py synth --out data/synth [--num_images 1000] [--defect_ratio 0.11] [--size 112]
                                     [--seed 0] [--categories fabric,washer] [--overwrite]
  python tools/prepare_data.py stats --dataset mvtec --root data/mvtec_ad [--split all] [--json]

`synth` writes a synthetic MVTec-layout tree (use another --seed for a disjoint held-out tree);
`stats` prints per-category normal/defect counts and the defect ratio (the paper's Table I), the defect types
it counted and (folder datasets, --normal_dirs / --exclude_dirs) the folders it skipped, such as masks.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from ppiad.data.folder import folder_layout
from ppiad.data.registry import MISSING_FILE_MODES, SPLITS, load_dataset
from ppiad.data.stats import count_missing, dataset_stats, format_stats
from ppiad.data.synthetic import CATEGORIES, SyntheticError, generate_synthetic
from ppiad.utils.cli import UsageError, user_errors


def cmd_synth(args) -> None:
    cats = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    start = time.time()
    try:
        summary = generate_synthetic(args.out, num_images=args.num_images, defect_ratio=args.defect_ratio,
                                     size=args.size, seed=args.seed, categories=cats, overwrite=args.overwrite)
    except SyntheticError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {summary['num_images']} images ({summary['normal']} normal, {summary['defect']} defect; "
          f"categories {', '.join(summary['categories'])}) to {summary['out_dir']} in {time.time() - start:.1f} s")


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def cmd_stats(args) -> None:
    folder = {"normal_dirs": _names(args.normal_dirs), "exclude_dirs": _names(args.exclude_dirs)}
    samples = load_dataset(args.dataset, args.root, split=args.split, missing_files=args.missing_files, **folder)
    stats = dataset_stats(samples, args.dataset, args.split)
    if args.dataset == "folder":
        layout = folder_layout(args.root, **{k: v for k, v in folder.items() if v is not None})
        stats["skipped"] = {f"{cat}/{name}" if cat else name: reason for cat, entry in layout.items()
                            for name, reason in entry["skipped"].items()}
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(format_stats(stats, count_missing(samples) if args.missing_files == "keep" else None))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic industrial dataset in MVTec-AD layout")
    s.add_argument("--out", required=True, help="output directory (must be new or empty, or use --overwrite)")
    s.add_argument("--num_images", type=int, default=1000, help="total images (default 1000)")
    s.add_argument("--defect_ratio", type=float, default=0.11, help="share of defect images (default 0.11)")
    s.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    s.add_argument("--seed", type=int, default=0, help="seed; another seed gives a different tree (default 0)")
    s.add_argument("--categories", default="", help=f"comma-separated subset of {','.join(CATEGORIES)}")
    s.add_argument("--overwrite", action="store_true", help="replace an existing synthetic tree at --out")
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("stats", help="per-category normal/defect counts of a dataset")
    t.add_argument("--dataset", required=True, choices=("mvtec", "visa", "folder"))
    t.add_argument("--root", required=True, help="dataset root directory")
    t.add_argument("--split", default="all", choices=SPLITS)
    t.add_argument("--missing_files", default="keep", choices=MISSING_FILE_MODES,
                   help="VisA rows whose image is missing: keep (count them), drop, or error")
    t.add_argument("--normal_dirs", default=None, help="folder datasets: comma-separated sub-directories holding "
                   "normal images (default good)")
    t.add_argument("--exclude_dirs", default=None, help="folder datasets: comma-separated sub-directories to skip")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t.set_defaults(func=cmd_stats)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    with user_errors():
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
