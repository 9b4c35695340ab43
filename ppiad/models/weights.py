"""Reading and writing checkpoint files, tensor by tensor.

safetensors is a tiny format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets) and the raw data. We read it ourselves through a memory map instead of `safetensors.numpy`
because real Qwen2-VL checkpoints are bfloat16, which numpy has no dtype for: bf16 is the upper half of a
float32, so widening it is a 16-bit shift. Memory-mapping means only one tensor at a time is materialised,
so loading a checkpoint does not hold the whole file and the model in RAM at once.

Pickle-based Paddle files (`model_state.pdparams`) are read only when the caller opts in, because
unpickling can run arbitrary code.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import numpy as np

from ppiad.utils.io import atomic_path, atomic_write_json

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PADDLE_WEIGHTS = "model_state.pdparams"

_NP_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed, or does not fit the model."""


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (as uint16) -> float32: bf16 is the top 16 bits of the float32 pattern."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round-to-nearest-even as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


class SafetensorsFile:
    """Read-only view of one .safetensors file; `get(name)` returns a float32/int numpy array."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as exc:
            raise CheckpointError(f"cannot read safetensors file '{path}': {exc}") from exc
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._data_start = 8 + n
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) > 8 + n else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        start, end = e["data_offsets"]
        raw = self._mmap[self._data_start + start: self._data_start + end] if self._mmap is not None else \
            np.zeros(0, np.uint8)
        dtype = e["dtype"]
        if dtype == "BF16":
            arr = bf16_to_float32(raw.view(np.uint16))
        elif dtype in _NP_DTYPES:
            arr = np.array(raw.view(_NP_DTYPES[dtype]))  # copy out of the map
        else:
            raise CheckpointError(f"'{self.path}': tensor '{name}' has unsupported dtype {dtype}")
        return arr.reshape(e["shape"])


def save_safetensors(path: str, tensors: dict[str, np.ndarray], bf16_names: frozenset = frozenset()) -> None:
    """Write `tensors` (name -> numpy array) atomically; names in `bf16_names` are stored as BF16."""
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files without format=pt
    offset = 0
    rev = {v: k for k, v in _NP_DTYPES.items()}
    for name, arr in tensors.items():
        if name in bf16_names:
            dtype, nbytes = "BF16", arr.size * 2
        else:
            if arr.dtype.type not in rev:
                raise CheckpointError(f"cannot store tensor '{name}' of dtype {arr.dtype} in safetensors")
            dtype, nbytes = rev[arr.dtype.type], arr.nbytes
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep data 8-byte aligned
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, arr in tensors.items():
                data = float32_to_bf16(arr) if name in bf16_names else np.ascontiguousarray(arr)
                f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())


def save_sharded(directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None,
                 bf16_names: frozenset = frozenset()) -> list[str]:
    """Write model.safetensors, or shards + model.safetensors.index.json when max_shard_bytes is set."""
    os.makedirs(directory, exist_ok=True)
    if not max_shard_bytes:
        save_safetensors(os.path.join(directory, SAFE_WEIGHTS), tensors, bf16_names)
        return [SAFE_WEIGHTS]
    shards: list[dict] = [{}]
    size = 0
    for name, arr in tensors.items():
        nbytes = arr.size * (2 if name in bf16_names else arr.itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(files, shards):
        save_safetensors(os.path.join(directory, fname), shard, bf16_names)
        weight_map.update({n: fname for n in shard})
    total = sum(a.size * (2 if n in bf16_names else a.itemsize) for n, a in tensors.items())
    atomic_write_json(os.path.join(directory, SAFE_INDEX), {"metadata": {"total_size": total},
                                                            "weight_map": weight_map})
    return files + [SAFE_INDEX]


def find_weights(directory: str, allow_pickle: bool = False) -> tuple[str, list[str]]:
    """Return (layout, files): layout "hf" for safetensors ([out, in] linears), "paddle" for .pdparams."""
    index = os.path.join(directory, SAFE_INDEX)
    single = os.path.join(directory, SAFE_WEIGHTS)
    pdparams = os.path.join(directory, PADDLE_WEIGHTS)
    if os.path.isfile(single):
        return "hf", [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"'{index}' is not a valid safetensors index (needs 'weight_map'): {exc}") from exc
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            path = os.path.join(directory, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"'{index}' lists shard '{fname}', which is missing from '{directory}'")
            files.append(path)
        return "hf", files
    if os.path.isfile(pdparams):
        if not allow_pickle:
            raise CheckpointError(
                f"'{pdparams}' is a pickle-based Paddle file and unpickling can run arbitrary code; it is only "
                f"loaded with allow_pickle=True (config: model.allow_pickle=true). Prefer safetensors.")
        return "paddle", [pdparams]
    raise CheckpointError(f"no weights in '{directory}': expected {SAFE_WEIGHTS}, {SAFE_INDEX} (+ shards) or "
                          f"{PADDLE_WEIGHTS}")


def iter_tensors(layout: str, files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, numpy array) one tensor at a time."""
    if layout == "hf":
        for path in files:
            st = SafetensorsFile(path)
            for name in st.keys():
                yield name, st.get(name)
        return
    import paddle

    state = paddle.load(files[0])
    for name in list(state):
        value = state.pop(name)
        arr = value.astype("float32").numpy() if hasattr(value, "numpy") and \
            str(value.dtype).endswith(("bfloat16", "float16")) else np.asarray(value)
        yield name, arr
