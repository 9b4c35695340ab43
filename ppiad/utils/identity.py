"""What produced a resumable output, and the check that a re-run does not mix results of different settings.

An output folder that a re-run continues (an evaluation's predictions, a training run's checkpoints, the
demo's data trees, warm start and run) holds `identity.json` (`demo_identity.json` for the demo's run): a flat mapping {setting: value} of everything its results depend on.
A re-run computes its own identity first; if the folder's differs, it stops (IdentityError, exit code 2 in
the tools) with one line naming the differing keys, before anything is loaded or written.

Fingerprints:
- `file_fingerprint`: SHA-256 of the file size and of its first, middle and last MiB (the whole file when it
  is at most 3 MiB). Why not a full content hash: it would read Qwen2-VL-7B's 15 GB of safetensors at every
  evaluation. Why not names, sizes and mtimes: a copy (`cp`, a download to another
  disk) changes every mtime, and a retrained checkpoint keeps its names and sizes. Training changes every
  tensor, so the sampled bytes differ between checkpoints; an edit confined to bytes outside the samples
  would not be seen (a documented limit).
- `model_fingerprint`: the fingerprints of a checkpoint directory's weights (*.safetensors, *.pdparams) and
  of its configuration, tokenizer and processor files (*.json, *.jinja), by file name.
- `adapter_fingerprint`: full SHA-256 of a LoRA adapter's weights and adapter_config.json (megabytes).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

from ppiad.utils.io import atomic_write_json, read_json

IDENTITY_FILE = "identity.json"
SAMPLE_BYTES = 1 << 20
MODEL_FILE_SUFFIXES = (".safetensors", ".pdparams", ".json", ".jinja")


class IdentityError(ValueError):
    """An output folder holds results of other settings; the message names the folder and the keys."""


def file_fingerprint(path: str, sample: int = SAMPLE_BYTES) -> str:
    """Hex SHA-256 over the size and the first / middle / last `sample` bytes of `path` (all of a small file)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 3 * sample:
            h.update(f.read())
        else:
            for offset in (0, (size - sample) // 2, size - sample):
                f.seek(offset)
                h.update(f.read(sample))
    return h.hexdigest()


def model_fingerprint(model_dir: str) -> str:
    """"sha256:<hex>" over the fingerprints of the checkpoint's weight and config files, by name.

    Raises FileNotFoundError when the directory holds none of them."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory '{model_dir}' does not exist")
    names = sorted(n for n in os.listdir(model_dir)
                   if n.endswith(MODEL_FILE_SUFFIXES) and os.path.isfile(os.path.join(model_dir, n)))
    if not names:
        raise FileNotFoundError(f"'{model_dir}' holds no checkpoint files ({', '.join(MODEL_FILE_SUFFIXES)})")
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}\0{file_fingerprint(os.path.join(model_dir, name))}\n".encode())
    return "sha256:" + h.hexdigest()


def adapter_fingerprint(path: str) -> str:
    """"sha256:<hex>" of a LoRA adapter's weights (+ adapter_config.json beside them); "none" for ""."""
    if not path:
        return "none"
    from ppiad.models.lora import _resolve   # the loader's own rule for directories, files and `latest`

    weights, config = _resolve(path)
    h = hashlib.sha256()
    for f in (weights, config):
        if f:
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return "sha256:" + h.hexdigest()


def resolve_adapter(path: str) -> str:
    """The absolute path of the adapter `path` names, with a trainer's `checkpoints/latest` pointer resolved to
    the step directory it points at (so records say which checkpoint was used); "" for "".
    Raises FileNotFoundError when there are no adapter weights there."""
    if not path:
        return ""
    from ppiad.models.lora import _resolve   # the loader's own rule for directories, files and `latest`

    weights, _ = _resolve(path)
    if os.path.basename(os.path.normpath(path)) == "latest" and os.path.isfile(path):
        return os.path.abspath(os.path.dirname(weights))
    return os.path.abspath(path)


def base_model_mismatch(adapter: str, model_path: str) -> str | None:
    """A one-line warning when the training checkpoint holding `adapter` records a base model
    (`base_model_fingerprint` in its trainer_state.json, ppiad.rl.checkpoint) other than `model_path`'s;
    None when they match or nothing is recorded (an adapter saved outside a training run, an older ppiad)."""
    if not adapter:
        return None
    where = resolve_adapter(adapter)
    state = os.path.join(where if os.path.isdir(where) else os.path.dirname(where), "trainer_state.json")
    if not os.path.isfile(state):
        return None
    try:
        recorded = read_json(state).get("base_model_fingerprint")
    except (ValueError, AttributeError):
        return None
    if not recorded or recorded == model_fingerprint(model_path):
        return None
    return (f"adapter '{where}' was trained on another base model than '{model_path}' (fingerprints "
            f"{recorded[:19]} vs {model_fingerprint(model_path)[:19]}): its results will not be those of training")


def text_fingerprint(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def digest(identity: Mapping) -> str:
    """A short hash of a whole identity, for report headers."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def differing_keys(stored: Mapping, wanted: Mapping) -> list[str]:
    """Keys whose values differ (or that only one side has), sorted."""
    return sorted(k for k in set(stored) | set(wanted) if stored.get(k, "<absent>") != wanted.get(k, "<absent>"))


def effective_dtype(dtype: str) -> str:
    """The dtype Paddle really runs in: bfloat16 needs a GPU (Paddle's CPU build has no bf16 matmul)."""
    if dtype != "bfloat16":
        return dtype
    import paddle

    return dtype if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0 else "float32"


def flat_settings(node: Mapping, prefix: str, exclude: frozenset | set = frozenset()) -> dict:
    """{"grpo.beta": 0.0, "rewards.focal.alpha": 1.0, ...} for one config section, leaving out `exclude`."""
    out = {}
    for key, value in node.items():
        name = f"{prefix}.{key}"
        if name in exclude:
            continue
        if isinstance(value, Mapping) and value:
            out.update(flat_settings(value, name, exclude))
        else:
            out[name] = value
    return out


def check_identity(folder: str, wanted: Mapping, what: str, hint: str, has_results: bool | None = None,
                   filename: str = IDENTITY_FILE, ignore: frozenset | set = frozenset()) -> bool:
    """Stop if `folder` holds results of other settings. Returns True when the folder's identity matches,
    False when the folder has no identity and no results yet (a fresh start).

    `has_results`: whether the folder already holds results (default: it exists and is not empty); results
    without identity.json (from an older ppiad) are refused too. `what` names the results, `hint` says what to
    do instead (another output folder, delete it). `ignore`: keys left out of the comparison (settings an
    older ppiad recorded that no longer count). Raises IdentityError with one line."""
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        try:
            stored = read_json(path)
        except ValueError as exc:
            raise IdentityError(f"{exc}; {hint}") from None
        diff = [k for k in differing_keys(stored, _plain(wanted)) if k not in ignore]
        if diff:
            raise IdentityError(f"'{folder}' holds {what} made with other settings (differing: {', '.join(diff)}); "
                                f"{hint}")
        return True
    if has_results is None:
        has_results = os.path.isdir(folder) and bool(os.listdir(folder))
    if has_results:
        raise IdentityError(f"'{folder}' holds {what} without {filename} (made by an older ppiad, settings "
                            f"unknown); {hint}")
    return False


def write_identity(folder: str, identity: Mapping, filename: str = IDENTITY_FILE) -> None:
    atomic_write_json(os.path.join(folder, filename), _plain(identity))


def _plain(identity: Mapping) -> dict:
    """JSON round trip, so tuples compare equal to the lists read back."""
    return json.loads(json.dumps(dict(identity), sort_keys=True))
