"""Generic folder layout for users' own products: `<root>/<category>/good/*` and `<root>/<category>/<type>/*`.

`good` (or the folders named in `normal_dirs`) holds normal images; every other sub-directory holding images
is a defect type, its name being the type, except:
- folders named in `exclude_dirs`;
- mask folders, which are never training or test images: recognised by name (`ground_truth`, `gt`, `mask(s)`,
  case-insensitive; MVTec-AD keeps its masks in `ground_truth/`) and by content (every one of the
  first few images is single-channel with at most two values, black and one other: a binary mask).
  A category that is itself a mask folder (a root pointed at one MVTec-AD category gives `ground_truth` as a
  category) is skipped the same way.
Each skipped folder is logged as a warning and listed by `folder_layout` (and `prepare_data.py stats`).
A category is any directory with at least one such sub-directory holding images.

The layout has no train/test division, so every sample gets split = "test", and every partition
(all, train, test) returns all images: a user who trains on their own folder trains on everything in it,
and should keep a second folder for evaluation.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from ppiad.data.registry import (DatasetError, check_root, check_split, list_images, list_subdirs,
                                 object_name_for, select_categories, sort_samples)
from ppiad.data.sample import DEFECT, NORMAL, Sample

LAYOUT = ("a folder layout: <root>/<category>/good/*.png (normal) and <root>/<category>/<defect_type>/*.png "
          "(defect)")
# Names that mean masks in every layout we know of; "label(s)" is left out on purpose (a product's label can be
# a defect type): such folders are still caught by content when they hold binary masks.
MASK_DIR_NAMES = ("ground_truth", "groundtruth", "gt", "mask", "masks")
MASK_SAMPLE = 3   # images of a folder looked at to recognise masks by content
_SINGLE_CHANNEL = ("1", "L", "I;16", "I;16B", "I;16L", "I")

log = logging.getLogger(__name__)


def is_mask_image(path: str) -> bool:
    """A single-channel image whose values are 0 and at most one other value (a binary mask)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in _SINGLE_CHANNEL:
                return False
            values = np.unique(np.asarray(img))
    except (OSError, ValueError, SyntaxError):
        return False   # unreadable files are the loader's business (reported as unreadable), not masks
    return values.size <= 2 and int(values.min()) == 0


def mask_folder_reason(name: str, images: Sequence[str]) -> str | None:
    """Why the folder `name` holding `images` is a mask folder, or None."""
    if name.lower() in MASK_DIR_NAMES:
        return f"mask folder (named '{name}')"
    sample = list(images)[:MASK_SAMPLE]
    if sample and all(is_mask_image(p) for p in sample):
        return f"mask folder (its images are single-channel binary: {', '.join(os.path.basename(p) for p in sample)})"
    return None


_warned: set = set()   # (message, folder, reason) already logged by this process


def _warn_once(message: str, folder: str, reason: str) -> None:
    """Log a skipped folder once per process, however often the layout is scanned (e.g. load, then stats)."""
    if (message, folder, reason) not in _warned:
        _warned.add((message, folder, reason))
        log.warning(message, folder, reason)


def folder_layout(root: str, normal_dirs: Iterable[str] = ("good",), exclude_dirs: Iterable[str] = ()) -> dict:
    """`{category: {"normal": {dir: [paths]}, "defect": {dir: [paths]}, "skipped": {dir: reason}}}` for the
    categories that hold images; skipped categories appear under `""` with `"category"` reasons.

    Raises DatasetError when a name is both in normal_dirs and exclude_dirs."""
    root = check_root(root, LAYOUT)
    normal, exclude = set(normal_dirs), set(exclude_dirs)
    if normal & exclude:
        raise DatasetError(f"folder(s) {', '.join(sorted(normal & exclude))} are in both normal_dirs and "
                           f"exclude_dirs")
    layout, skipped_categories = {}, {}
    for category in list_subdirs(root):
        base = os.path.join(root, category)
        if category in exclude:
            skipped_categories[category] = "in exclude_dirs"
            continue
        if category.lower() in MASK_DIR_NAMES:
            skipped_categories[category] = f"mask folder (named '{category}')"
            continue
        entry = {"normal": {}, "defect": {}, "skipped": {}}
        for name in list_subdirs(base):
            paths = list_images(os.path.join(base, name))
            if not paths:
                continue
            if name in exclude:
                entry["skipped"][name] = "in exclude_dirs"
            elif name in normal:
                entry["normal"][name] = paths
            else:
                reason = mask_folder_reason(name, paths)
                if reason:
                    entry["skipped"][name] = reason
                else:
                    entry["defect"][name] = paths
        if entry["normal"] or entry["defect"]:
            layout[category] = entry
        elif entry["skipped"] and all(r.startswith("mask") for r in entry["skipped"].values()):
            skipped_categories[category] = "holds only mask folders"
    for category, entry in layout.items():
        for name, reason in entry["skipped"].items():
            _warn_once("folder dataset: skipped %s: %s", os.path.join(root, category, name), reason)
    for category, reason in skipped_categories.items():
        _warn_once("folder dataset: skipped category %s: %s", os.path.join(root, category), reason)
    if skipped_categories:
        layout[""] = {"normal": {}, "defect": {}, "skipped": skipped_categories}
    return layout


def load_folder(root: str, split: str = "all", categories: Iterable[str] | None = None,
                object_names: Mapping[str, str] | None = None, normal_dirs: Iterable[str] = ("good",),
                exclude_dirs: Iterable[str] = ()) -> list[Sample]:
    root = check_root(root, LAYOUT)
    check_split(split)  # every partition is the whole folder (see the module docstring)
    normal_dirs = list(normal_dirs)
    layout = {c: e for c, e in folder_layout(root, normal_dirs, exclude_dirs).items() if c}
    if not layout:
        raise DatasetError(f"'{root}' holds no category with images in sub-directories; expected {LAYOUT}")
    samples = []
    for category in select_categories(layout, categories, root):
        name = object_name_for(category, object_names)
        entry = layout[category]
        for folder, paths in entry["normal"].items():
            # the defect_type of normal images is "good" whatever their folder is called
            samples += [Sample(p, category, name, NORMAL, "good", "test") for p in paths]
        for defect_type, paths in entry["defect"].items():
            samples += [Sample(p, category, name, DEFECT, defect_type, "test") for p in paths]
    return sort_samples(samples)
