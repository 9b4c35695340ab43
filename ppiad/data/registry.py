"""Dataset registry: `build_dataset(cfg.data.train | cfg.data.eval, cfg.data.object_names) -> list[Sample]`.

Also holds what every loader shares: the DatasetError type, the object-name rule, category selection and
directory listing. The loaders themselves live in mvtec.py / visa.py / folder.py and are imported lazily
(they import this module for the shared parts).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping

from ppiad.data.images import is_image_file
from ppiad.data.sample import Sample

SPLITS = ("all", "train", "test")
MISSING_FILE_MODES = ("keep", "drop", "error")
FOLDER_DEFAULTS = {"normal_dirs": ["good"], "exclude_dirs": []}


class DatasetError(ValueError):
    """A dataset root or index is not what the chosen layout expects; the message says what was expected."""


def object_name_for(category: str, object_names: Mapping[str, str] | None = None) -> str:
    """The prompt's object name: an explicit mapping wins, else the category with underscores as spaces."""
    if object_names and category in object_names:
        name = object_names[category]
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"data.object_names['{category}'] must be a non-empty string, got {name!r}")
        return name.strip()
    return category.replace("_", " ")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; valid splits: {', '.join(SPLITS)}")
    return split


def check_root(root: str, layout: str) -> str:
    """An absolute, existing directory, or a DatasetError describing the expected `layout`."""
    if not root:
        raise DatasetError(f"dataset root is not set (data.train.root / data.eval.root); expected {layout}")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root '{root}' does not exist or is not a directory; expected {layout}")
    return root


def select_categories(available: Iterable[str], wanted: Iterable[str] | None, root: str) -> list[str]:
    """Keep the wanted categories (all when empty); an unknown one is an error listing what exists."""
    available = sorted(available)
    wanted = list(wanted or [])
    if not wanted:
        return available
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DatasetError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} under "
                           f"'{root}'; available: {', '.join(available)}")
    return sorted(set(wanted))


def list_subdirs(path: str) -> list[str]:
    """Names of the visible sub-directories of `path`, sorted (hidden ones such as .git are skipped)."""
    if not os.path.isdir(path):
        return []
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def list_images(path: str) -> list[str]:
    """Absolute paths of the image files directly inside `path`, sorted; other files are ignored."""
    if not os.path.isdir(path):
        return []
    return sorted(os.path.join(path, e.name) for e in os.scandir(path)
                  if e.is_file() and not e.name.startswith(".") and is_image_file(e.name))


def sort_samples(samples: list[Sample]) -> list[Sample]:
    """The one deterministic order of every dataset: category, split, defect type, path."""
    return sorted(samples, key=lambda s: (s.category, s.split, s.defect_type, s.path))


def loaders() -> dict[str, Callable[..., list[Sample]]]:
    from ppiad.data.folder import load_folder
    from ppiad.data.mvtec import load_mvtec
    from ppiad.data.visa import load_visa

    return {"mvtec": load_mvtec, "visa": load_visa, "folder": load_folder}


def load_dataset(dataset: str, root: str, split: str = "all", categories: Iterable[str] | None = None,
                 object_names: Mapping[str, str] | None = None, missing_files: str = "keep",
                 normal_dirs: Iterable[str] | None = None, exclude_dirs: Iterable[str] | None = None
                 ) -> list[Sample]:
    """Load one partition of a dataset by layout name (mvtec, visa, folder). `normal_dirs` / `exclude_dirs`
    (folder datasets only; DatasetError for the others): see ppiad.data.folder."""
    table = loaders()
    if dataset not in table:
        raise DatasetError(f"unknown dataset '{dataset}'; valid datasets: {', '.join(table)}")
    if missing_files not in MISSING_FILE_MODES:
        raise DatasetError(f"unknown missing_files mode '{missing_files}'; valid: {', '.join(MISSING_FILE_MODES)}")
    check_split(split)
    kwargs = {"missing_files": missing_files} if dataset == "visa" else {}
    folder_keys = {"normal_dirs": normal_dirs, "exclude_dirs": exclude_dirs}
    if dataset == "folder":
        kwargs.update({k: v for k, v in folder_keys.items() if v is not None})
    else:
        given = [k for k, v in folder_keys.items() if v is not None and list(v) != FOLDER_DEFAULTS[k]]
        if given:
            raise DatasetError(f"{' and '.join(given)} apply to folder datasets only, not to '{dataset}'")
    return table[dataset](root, split=split, categories=categories, object_names=object_names, **kwargs)


def build_dataset(part_cfg: Mapping, object_names: Mapping[str, str] | None = None) -> list[Sample]:
    """Samples of `cfg.data.train` or `cfg.data.eval` (keys dataset, root, split, categories, missing_files,
    normal_dirs, exclude_dirs)."""
    return load_dataset(part_cfg.get("dataset", "mvtec"), part_cfg.get("root", ""), part_cfg.get("split", "all"),
                        part_cfg.get("categories") or None, object_names,
                        part_cfg.get("missing_files", "keep"), part_cfg.get("normal_dirs"),
                        part_cfg.get("exclude_dirs"))
