"""VisA raw layout: `<root>/<object>/Data/Images/{Normal,Anomaly}/...`, indexed by `<root>/split_csv/1cls.csv`.

The CSV (columns object, split, label, image, mask) is the single source of truth: one sample per row,
category = object, split = the row's split (train/test), label normal -> NORMAL ("good"),
anomaly -> DEFECT ("anomaly"). The mask column is never used. "All" = every row (9,621 normal + 1,200 anomaly).

Rows whose image file is missing on disk, by `missing_files`:
  keep  (default) the index still lists them, so counts match the official split; a warning says how many
        are missing, and evaluation later records each as unreadable rather than silently shrinking the set;
  drop  they are left out (with the same warning);
  error a DatasetError naming the first missing files.
"""
from __future__ import annotations

import csv
import logging
import os
from typing import Iterable, Mapping

from ppiad.data.registry import (MISSING_FILE_MODES, DatasetError, check_root, check_split, object_name_for,
                                 select_categories, sort_samples)
from ppiad.data.sample import DEFECT, NORMAL, Sample

log = logging.getLogger(__name__)

SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
REQUIRED_COLUMNS = ("object", "split", "label", "image")
LAYOUT = "a VisA layout: <root>/split_csv/1cls.csv (columns object,split,label,image,mask) and " \
         "<root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG"
LABELS = {"normal": (NORMAL, "good"), "anomaly": (DEFECT, "anomaly")}


def read_split_csv(csv_path: str) -> list[dict]:
    """The rows of a VisA split file, checked: right columns, known split and label values."""
    if not os.path.isfile(csv_path):
        raise DatasetError(f"VisA split file '{csv_path}' not found; expected {LAYOUT}")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DatasetError(f"VisA split file '{csv_path}' lacks column(s) {', '.join(missing)}: it has "
                               f"[{', '.join(columns)}], expected [object, split, label, image, mask]")
        rows = []
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if row["split"] not in ("train", "test"):
                raise DatasetError(f"{csv_path}:{line}: split '{row['split']}' is not train or test")
            if row["label"] not in LABELS:
                raise DatasetError(f"{csv_path}:{line}: label '{row['label']}' is not normal or anomaly")
            if not row["object"] or not row["image"]:
                raise DatasetError(f"{csv_path}:{line}: empty object or image field")
            rows.append(row)
    return rows


def load_visa(root: str, split: str = "all", categories: Iterable[str] | None = None,
              object_names: Mapping[str, str] | None = None, missing_files: str = "keep") -> list[Sample]:
    root = check_root(root, LAYOUT)
    check_split(split)
    if missing_files not in MISSING_FILE_MODES:
        raise DatasetError(f"unknown missing_files mode '{missing_files}'; valid: {', '.join(MISSING_FILE_MODES)}")
    csv_path = os.path.join(root, SPLIT_CSV)
    rows = read_split_csv(csv_path)
    if not rows:
        raise DatasetError(f"VisA split file '{csv_path}' has no rows")
    keep = set(select_categories({r["object"] for r in rows}, categories, root))
    samples = []
    for r in rows:
        if r["object"] in keep and split in ("all", r["split"]):
            label, defect_type = LABELS[r["label"]]
            path = os.path.normpath(os.path.join(root, r["image"]))
            samples.append(Sample(path, r["object"], object_name_for(r["object"], object_names), label,
                                  defect_type, r["split"]))
    return sort_samples(_handle_missing(samples, missing_files, csv_path))


def _handle_missing(samples: list[Sample], mode: str, csv_path: str) -> list[Sample]:
    absent = [s for s in samples if not os.path.isfile(s.path)]
    if not absent:
        return samples
    first = ", ".join(s.path for s in absent[:3])
    if mode == "error":
        raise DatasetError(f"{len(absent)} of {len(samples)} images listed in '{csv_path}' are missing "
                           f"(first: {first}); set missing_files to keep or drop to continue")
    action = "left out" if mode == "drop" else "kept in the index and will be reported as unreadable"
    log.warning("%d of %d images listed in %s are missing on disk (first: %s); they are %s",
                len(absent), len(samples), csv_path, first, action)
    if mode == "drop":
        gone = {s.path for s in absent}
        return [s for s in samples if s.path not in gone]
    return samples
