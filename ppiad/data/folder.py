"""Generic folder layout for users' own products: `<root>/<category>/good/*` and `<root>/<category>/<type>/*`.

`good` holds normal images; every other sub-directory holds defect images, its name being the defect type.
A category is any directory with at least one such sub-directory holding images.

The layout has no train/test division, so every sample gets split = "test", and every partition
(all, train, test) returns all images: a user who trains on their own folder trains on everything in it,
and should keep a second folder for evaluation.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

from ppiad.data.registry import (DatasetError, check_root, check_split, list_images, list_subdirs,
                                 object_name_for, select_categories, sort_samples)
from ppiad.data.sample import DEFECT, NORMAL, Sample

LAYOUT = ("a folder layout: <root>/<category>/good/*.png (normal) and <root>/<category>/<defect_type>/*.png "
          "(defect)")


def _category_images(root: str, category: str) -> dict[str, list[str]]:
    base = os.path.join(root, category)
    found = {t: list_images(os.path.join(base, t)) for t in list_subdirs(base)}
    return {t: paths for t, paths in found.items() if paths}


def load_folder(root: str, split: str = "all", categories: Iterable[str] | None = None,
                object_names: Mapping[str, str] | None = None) -> list[Sample]:
    root = check_root(root, LAYOUT)
    check_split(split)  # every partition is the whole folder (see the module docstring)
    per_category = {c: _category_images(root, c) for c in list_subdirs(root)}
    per_category = {c: types for c, types in per_category.items() if types}
    if not per_category:
        raise DatasetError(f"'{root}' holds no category with images in sub-directories; expected {LAYOUT}")
    samples = []
    for category in select_categories(per_category, categories, root):
        name = object_name_for(category, object_names)
        for defect_type, paths in per_category[category].items():
            label = NORMAL if defect_type == "good" else DEFECT
            samples += [Sample(p, category, name, label, defect_type, "test") for p in paths]
    return sort_samples(samples)
