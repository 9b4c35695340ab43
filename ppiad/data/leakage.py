"""Leakage guard (issue 17): training, evaluation and reference images compared by content before a run.

A file counts as the same image when its bytes are identical (SHA-256), whatever its path or name, so a copied
test image in a training folder is caught. Only files whose byte size occurs in two groups are read at all;
their digests are cached by (absolute path, size, mtime) in memory and in `<cache dir>/content_hashes.json`
(`$PPIAD_CACHE_DIR`, default `~/.cache/ppiad`), so a second run reads nothing again. Re-encoded or resized
copies are not found (that would need perceptual hashing).

An overlap stops the run with a LeakageError (a DatasetError: exit code 2 in the tools) naming the count and a
few pairs, unless `data.allow_overlap: true`, which logs it instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ppiad.data.registry import DatasetError

log = logging.getLogger(__name__)
CACHE_FILE = "content_hashes.json"
SHOWN = 3   # pairs named in the error message


class LeakageError(DatasetError):
    """Training / reference images share content with evaluation images."""


@dataclass(frozen=True)
class Overlap:
    group_a: str       # e.g. "training"
    path_a: str
    group_b: str       # e.g. "evaluation"
    path_b: str


def cache_dir() -> str:
    return os.environ.get("PPIAD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ppiad")


class HashCache:
    """SHA-256 of file bytes keyed by (absolute path, size, mtime_ns); persisted as JSON when `path` is set."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                self.entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                log.warning("leakage guard: ignoring unreadable hash cache %s", path)

    def digest(self, path: str, st: os.stat_result | None = None) -> str:
        path = os.path.abspath(path)
        st = st or os.stat(path)
        hit = self.entries.get(path)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self.entries[path] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        from ppiad.utils.io import atomic_write_text

        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.entries))
            self.dirty = False
        except OSError as exc:   # a read-only home must not stop a run: the cache only saves time
            log.warning("leakage guard: cannot write the hash cache %s: %s", self.path, exc)


def find_overlaps(groups: Mapping[str, Iterable[str]], pairs: Sequence[tuple[str, str]],
                  cache: HashCache | None = None) -> list[Overlap]:
    """Files of group a and group b with identical bytes, for each (a, b) in `pairs`; sorted by b's path.

    Missing files are skipped (the loaders report them). Raises nothing else."""
    cache = cache or HashCache()
    stats: dict[str, dict[str, os.stat_result]] = {}
    for name, paths in groups.items():
        stats[name] = {}
        for p in set(map(os.path.abspath, paths)):
            try:
                stats[name][p] = os.stat(p)
            except OSError:
                continue
    found = []
    for a, b in pairs:
        sizes_b = {st.st_size for st in stats.get(b, {}).values()}
        candidates_a = {p: st for p, st in stats.get(a, {}).items() if st.st_size in sizes_b}
        if not candidates_a:
            continue
        by_digest: dict[str, str] = {}
        for p in sorted(candidates_a):
            by_digest.setdefault(cache.digest(p, candidates_a[p]), p)
        sizes_a = {st.st_size for st in candidates_a.values()}
        for p in sorted(stats[b]):
            st = stats[b][p]
            if st.st_size in sizes_a:
                other = by_digest.get(cache.digest(p, st))
                if other is not None:   # the same path in both groups is an overlap too
                    found.append(Overlap(a, other, b, p))
    cache.save()
    return found


def check_no_leakage(groups: Mapping[str, Iterable[str]], pairs: Sequence[tuple[str, str]],
                     allow_overlap: bool = False, cache: HashCache | None = None) -> list[Overlap]:
    """Raise LeakageError when any pair of groups shares content, unless `allow_overlap` (then log a warning).
    Returns the overlaps found."""
    overlaps = find_overlaps(groups, pairs, cache or HashCache(os.path.join(cache_dir(), CACHE_FILE)))
    if not overlaps:
        return overlaps
    counts: dict[tuple[str, str], int] = {}
    for o in overlaps:
        counts[(o.group_a, o.group_b)] = counts.get((o.group_a, o.group_b), 0) + 1
    what = "; ".join(f"{n} {b} image(s) identical to {a} images" for (a, b), n in counts.items())
    shown = ", ".join(f"'{o.path_b}' = '{o.path_a}'" for o in overlaps[:SHOWN])
    message = f"leakage: {what} (same file content), e.g. {shown}"
    if allow_overlap:
        log.warning("%s; running anyway (data.allow_overlap=true)", message)
        return overlaps
    raise LeakageError(f"{message}; remove them from one side, or set data.allow_overlap=true to run anyway")


def guard_run(cfg, train_paths: Iterable[str] | None, eval_paths: Iterable[str] | None,
              references=None) -> list[Overlap]:
    """The check before a training run or an evaluation: training vs evaluation images and, for a pool from a
    `reference_root` folder, references vs evaluation images (a pool of data.train's normals is already in the
    training side). A side that is None (its partition is not configured or not on this machine) is left out.
    `references`: a ppiad.data.references.ReferencePool or None."""
    if eval_paths is None:
        return []
    groups, pairs = {"evaluation": list(eval_paths)}, []
    if train_paths is not None:
        groups["training"] = list(train_paths)
        pairs.append(("training", "evaluation"))
    if references is not None and references.source.get("pool", "").endswith("reference_root"):
        groups["reference"] = references.all_paths()
        pairs.append(("reference", "evaluation"))
    if not pairs:
        return []
    return check_no_leakage(groups, pairs, cfg.data.allow_overlap)


def partition_paths(cfg, partition: str, samples=None) -> list[str] | None:
    """Image paths of data.<partition> (`samples` if already loaded), or None when its root is unset or not a
    directory here (an evaluation-only machine need not hold the training data)."""
    part = cfg.data[partition]
    if samples is not None:
        return [s.path for s in samples]
    if not part.root:
        return None
    if not os.path.isdir(part.root):
        log.warning("leakage guard: data.%s.root '%s' is not a directory here; not compared", partition, part.root)
        return None
    from ppiad.data.registry import build_dataset

    return [s.path for s in build_dataset(part, cfg.data.object_names)]
