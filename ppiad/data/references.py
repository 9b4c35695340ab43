"""Normal reference images for k-shot prompts (`prompt.reference_images: k`, issue 17).

A k-shot prompt shows k normal images of the query's category before the query (ppiad.prompt.build_prompt).
The references come from a pool, per partition (`data.train` when training, `data.eval` when evaluating):
- `data.<partition>.reference_root` set: the images directly inside `<reference_root>/<category>/`;
- else the normal images of the TRAINING partition (`data.train`) of that category.
The pool never holds an image of the evaluation partition (`exclude`, given by the evaluation) and a draw never
returns the query itself. Each query gets its k references drawn without replacement by a generator seeded with
its path (SHA-256 of the path string), so a re-run, a resume or another batch size draws the same ones.
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Iterable, Mapping, Sequence

from ppiad.data.registry import DatasetError, list_images, list_subdirs
from ppiad.data.sample import NORMAL, Sample

PARTITIONS = ("train", "eval")


class ReferencePool:
    """Sorted normal image paths per category, and the deterministic k-of-them draw for each query."""

    def __init__(self, by_category: Mapping[str, Sequence[str]], k: int, source: dict,
                 exclude: Iterable[str] = ()):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"a reference pool needs k >= 1 references per prompt, got {k!r}")
        drop = {os.path.abspath(p) for p in exclude}
        self.k = k
        self.source = dict(source)
        self.by_category = {c: sorted(os.path.abspath(p) for p in paths if os.path.abspath(p) not in drop)
                            for c, paths in by_category.items()}
        self.excluded = sum(len(paths) for paths in by_category.values()) - sum(map(len, self.by_category.values()))

    def draw(self, sample: Sample) -> list[str]:
        """k reference paths for `sample`: same category, never the sample itself, seeded by its path.

        Raises DatasetError when the category's pool holds fewer than k other images."""
        query = os.path.abspath(sample.path)
        candidates = [p for p in self.by_category.get(sample.category, []) if p != query]
        if len(candidates) < self.k:
            raise DatasetError(f"prompt.reference_images={self.k}, but the reference pool ({self.describe()}) holds "
                               f"{len(candidates)} normal image(s) of category '{sample.category}' other than "
                               f"'{sample.path}'; add normal images there or set data.<partition>.reference_root")
        seed = int.from_bytes(hashlib.sha256(sample.path.encode("utf-8")).digest()[:8], "big")
        return random.Random(seed).sample(candidates, self.k)

    def describe(self) -> str:
        """One line for reports: where the references come from and how many there are."""
        n = sum(len(v) for v in self.by_category.values())
        where = ", ".join(f"{k}={v}" for k, v in self.source.items())
        return f"{where}; {n} images in {len(self.by_category)} categories"

    def all_paths(self) -> list[str]:
        return sorted(p for paths in self.by_category.values() for p in paths)


def reference_source(cfg, partition: str) -> dict:
    """The settings that define `partition`'s pool (for identities and reports; no file is read)."""
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    root = cfg.data[partition].get("reference_root", "")
    if root:
        return {"pool": f"data.{partition}.reference_root", "root": os.path.abspath(os.path.expanduser(root))}
    t = cfg.data.train
    src = {"pool": "normal images of data.train", "dataset": t.dataset, "root": os.path.abspath(t.root) if t.root else "",
           "split": t.split, "categories": sorted(t.categories)}
    if t.dataset == "folder":
        src.update(normal_dirs=sorted(t.normal_dirs), exclude_dirs=sorted(t.exclude_dirs))
    return src


def folder_pool(root: str) -> dict[str, list[str]]:
    """{category: image paths} of `<root>/<category>/*` (not recursive). DatasetError if there are none."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(f"reference_root '{root}' does not exist or is not a directory; expected "
                           f"<reference_root>/<category>/*.png normal images")
    pool = {c: list_images(os.path.join(root, c)) for c in list_subdirs(root)}
    pool = {c: paths for c, paths in pool.items() if paths}
    if not pool:
        raise DatasetError(f"reference_root '{root}' holds no <category>/ folder with images")
    return pool


def build_reference_pool(cfg, partition: str, exclude: Iterable[str] = (),
                         train_samples: Sequence[Sample] | None = None) -> ReferencePool | None:
    """`partition`'s pool for cfg.prompt.reference_images = k, or None when k = 0.

    `exclude`: paths never used as references (the evaluation partition's images). `train_samples`: the
    training partition if already loaded (else it is loaded here when the pool needs it)."""
    k = cfg.prompt.reference_images
    if k < 0:
        from ppiad.config import ConfigError

        raise ConfigError(f"config key 'prompt.reference_images' must be >= 0, got {k}")
    if k == 0:
        return None
    source = reference_source(cfg, partition)
    root = cfg.data[partition].get("reference_root", "")
    if root:
        by_category = folder_pool(root)
    else:
        if train_samples is None:
            from ppiad.config import require
            from ppiad.data.registry import build_dataset

            require(cfg, "data.train.root", "the training partition, whose normal images are the k-shot "
                                            "references (or set data.<partition>.reference_root)")
            train_samples = build_dataset(cfg.data.train, cfg.data.object_names)
        by_category: dict[str, list[str]] = {}
        for s in train_samples:
            if s.label == NORMAL:
                by_category.setdefault(s.category, []).append(s.path)
    return ReferencePool(by_category, k, source, exclude)


def reference_identity(cfg, partition: str) -> dict:
    """The identity keys of k-shot prompting for `partition` (ppiad.eval.identity, ppiad.rl.identity): empty at
    k = 0, so 0-shot identities stay what they were; else k, the k-shot sentence's fingerprint and the pool."""
    k = cfg.prompt.reference_images
    if not k:
        return {}
    from ppiad.prompt import REFERENCE_SENTENCE
    from ppiad.utils.identity import text_fingerprint

    return {"prompt.reference_images": k, "prompt (k-shot sentence)": text_fingerprint(REFERENCE_SENTENCE),
            "reference pool": reference_source(cfg, partition)}
