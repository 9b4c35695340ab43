"""Atomic file writes: a crash or Ctrl-C never leaves a half-written result or checkpoint behind."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Iterator


class MalformedFileError(ValueError):
    """A JSON / JSONL file the tools read back is malformed; the message names the file (and line)."""


def _current_umask() -> int:
    """The process umask (os.umask can only be read by setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_current_umask())   # mkstemp makes 0600; give the file the usual umask-derived mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line and flush it, so a killed run keeps every finished record."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict]:
    """Read a JSONL file; a torn last line (from a kill mid-write) is ignored, other bad lines raise
    MalformedFileError naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i >= len(lines) - 2:  # the last non-empty line may be torn
                break
            raise MalformedFileError(f"{path}:{i + 1}: not a JSON line ({exc}); fix or delete that line "
                                     f"(every other line is a finished record)") from None
    return records


def read_json(path: str):
    """Load a JSON file; a malformed one raises MalformedFileError (a ValueError) naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise MalformedFileError(f"'{path}' is not valid JSON: {exc}") from None
