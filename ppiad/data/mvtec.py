"""MVTec-AD layout: `<root>/<category>/{train/good, test/<defect_type>, ground_truth/...}`.

A category is any directory holding train/ or test/. Inside train/ and test/, the sub-directory `good` holds
normal images and any other one holds defect images of that type. ground_truth/ (the masks) is never read:
the method is mask-free. Partitions: train = train/, test = test/, all = both (the paper's "All").
The synthetic generator (synthetic.py) writes this same layout.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

from ppiad.data.registry import (DatasetError, check_root, check_split, list_images, list_subdirs,
                                 object_name_for, select_categories, sort_samples)
from ppiad.data.sample import DEFECT, NORMAL, Sample

LAYOUT = "an MVTec-AD layout: <root>/<category>/train/good/*.png and <root>/<category>/test/<defect_type>/*.png"


def mvtec_categories(root: str) -> list[str]:
    return [c for c in list_subdirs(root)
            if os.path.isdir(os.path.join(root, c, "train")) or os.path.isdir(os.path.join(root, c, "test"))]


def load_mvtec(root: str, split: str = "all", categories: Iterable[str] | None = None,
               object_names: Mapping[str, str] | None = None) -> list[Sample]:
    root = check_root(root, LAYOUT)
    check_split(split)
    available = mvtec_categories(root)
    if not available:
        raise DatasetError(f"'{root}' holds no MVTec-AD category (a directory with train/ or test/); "
                           f"expected {LAYOUT}")
    samples = []
    for category in select_categories(available, categories, root):
        name = object_name_for(category, object_names)
        for part in ("train", "test"):
            if split not in ("all", part):
                continue
            part_dir = os.path.join(root, category, part)
            for defect_type in list_subdirs(part_dir):
                label = NORMAL if defect_type == "good" else DEFECT
                for path in list_images(os.path.join(part_dir, defect_type)):
                    samples.append(Sample(path, category, name, label, defect_type, part))
    if not samples:
        raise DatasetError(f"no images found for split '{split}' under '{root}'; expected {LAYOUT}")
    return sort_samples(samples)
