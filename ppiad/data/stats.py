"""Per-category normal/defect counts of a dataset partition (the layout of the paper's Table I)."""
from __future__ import annotations

import os
from typing import Iterable

from ppiad.data.sample import Sample


def dataset_stats(samples: Iterable[Sample], dataset: str, split: str) -> dict:
    """`{"dataset", "split", "categories": {cat: {"normal", "defect"}}, "total": {"normal", "defect", "defect_ratio"},
    "defect_types": {cat: [defect types counted, sorted]}}`."""
    cats: dict[str, dict[str, int]] = {}
    types: dict[str, set] = {}
    for s in samples:
        counts = cats.setdefault(s.category, {"normal": 0, "defect": 0})
        counts["defect" if s.is_defect else "normal"] += 1
        if s.is_defect:
            types.setdefault(s.category, set()).add(s.defect_type)
    normal = sum(c["normal"] for c in cats.values())
    defect = sum(c["defect"] for c in cats.values())
    total = normal + defect
    return {
        "dataset": dataset,
        "split": split,
        "categories": {c: cats[c] for c in sorted(cats)},
        "total": {"normal": normal, "defect": defect, "defect_ratio": defect / total if total else 0.0},
        "defect_types": {c: sorted(types[c]) for c in sorted(types)},
    }


def count_missing(samples: Iterable[Sample]) -> int:
    """How many listed images do not exist on disk (VisA indexes can list files a user has not got)."""
    return sum(not os.path.isfile(s.path) for s in samples)


def format_stats(stats: dict, missing: int | None = None) -> str:
    """A plain-text table: one row per category, then the totals, the defect types counted per category and
    (folder datasets) the folders skipped (`stats["skipped"]`: {"category/folder": reason})."""
    rows = [(cat, c["normal"], c["defect"]) for cat, c in stats["categories"].items()]
    t = stats["total"]
    width = max([len("Category"), len("Total")] + [len(r[0]) for r in rows])
    line = f"{{:<{width}}}  {{:>8}}  {{:>8}}  {{:>8}}  {{:>8}}"

    def fmt(name, normal, defect):
        n = normal + defect
        return line.format(name, normal, defect, n, f"{100.0 * defect / n:.1f}%" if n else "-")

    out = [f"dataset: {stats['dataset']}   split: {stats['split']}",
           line.format("Category", "Normal", "Defect", "Total", "Defect%")]
    out.append("-" * len(out[-1]))
    out += [fmt(*r) for r in rows]
    out.append("-" * len(out[1]))
    out.append(fmt("Total", t["normal"], t["defect"]))
    if stats.get("defect_types"):
        out.append("defect types counted:")
        out += [f"  {cat}: {', '.join(types)}" for cat, types in stats["defect_types"].items()]
    if stats.get("skipped"):
        out.append("folders skipped (not counted):")
        out += [f"  {where}: {reason}" for where, reason in stats["skipped"].items()]
    if missing:
        out.append(f"note: {missing} listed image(s) are missing on disk; they are counted above and will be "
                   f"reported as unreadable (use --missing_files drop to leave them out)")
    return "\n".join(out)
