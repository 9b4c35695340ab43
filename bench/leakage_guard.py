"""Time the leakage guard (ppiad.data.leakage) on two folders of files: stat-only when no sizes match, a cold run
that must hash every file (all the same size), and a warm run from the hash cache.

    .venv/bin/python bench/leakage_guard.py [--files 1000] [--kib 64]

Writes 2 x N files of random bytes under a temporary folder (removed afterwards) and prints one line per case.
The page cache holds the files (just written), so the cold figure is hashing speed, not disk speed.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppiad.data.leakage import HashCache, find_overlaps  # noqa: E402


def write(folder, n, size, seed, vary, offset=0):
    import random

    rng = random.Random(seed)
    os.makedirs(folder)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"{i:05d}.bin")
        with open(p, "wb") as f:
            f.write(rng.randbytes(size + (offset + i + 1 if vary else 0)))
        paths.append(p)
    return paths


def timed(label, groups, cache, n_files, mib):
    t0 = time.perf_counter()
    found = find_overlaps(groups, [("training", "evaluation")], cache)
    dt = time.perf_counter() - t0
    print(f"{label}: {dt * 1000:.0f} ms for {n_files} files ({mib:.0f} MiB), {len(found)} overlaps")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000, help="files per side")
    ap.add_argument("--kib", type=int, default=64, help="size of each file")
    args = ap.parse_args()
    size = args.kib * 1024
    with tempfile.TemporaryDirectory() as tmp:
        mib = 2 * args.files * size / 2 ** 20
        # sizes all different between the sides: nothing needs reading
        a = write(os.path.join(tmp, "a"), args.files, size, 0, vary=True)
        b = write(os.path.join(tmp, "b"), args.files, size, 1, vary=True, offset=args.files)
        timed("no equal sizes (stat only)", {"training": a, "evaluation": b}, HashCache(), 2 * args.files, mib)
        # every file the same size: all are hashed, then read from the cache
        c = write(os.path.join(tmp, "c"), args.files, size, 2, vary=False)
        d = write(os.path.join(tmp, "d"), args.files, size, 3, vary=False)
        cache_file = os.path.join(tmp, "hashes.json")
        timed("all sizes equal, cold (hash all)", {"training": c, "evaluation": d}, HashCache(cache_file),
              2 * args.files, mib)
        timed("all sizes equal, warm (cache file)", {"training": c, "evaluation": d}, HashCache(cache_file),
              2 * args.files, mib)


if __name__ == "__main__":
    main()
