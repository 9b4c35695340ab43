"""Reading and writing checkpoint files, tensor by tensor.

safetensors is a tiny format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets) and the raw data. We read it ourselves through a memory map instead of `safetensors.numpy`
because real Qwen2-VL checkpoints are bfloat16, which numpy has no dtype for: bf16 is the upper half of a
float32, so widening it is a 16-bit shift.

Loading a model (`TensorSource.copy_into`) converts each tensor straight from the mapped file into the
parameter's own memory: a numpy view of the mapped bytes is widened (and, for linear weights, transposed in
cache-sized tiles) into a numpy view of the parameter, with no intermediate full-size copy; the file pages
of that tensor are then dropped from the process (madvise), so the peak memory of loading is the model plus
one tile, not model + file.

Pickle-based Paddle files (`model_state.pdparams`) are read only when the caller opts in, because
unpickling can run arbitrary code.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import threading
from typing import Iterator, Union

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
    """Read-only view of one .safetensors file; `get(name)` returns a float32/int numpy array (a copy),
    `source(name)` a `TensorSource` that reads it lazily."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                size = os.fstat(f.fileno()).st_size
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        except (OSError, struct.error, ValueError) as exc:
            raise CheckpointError(f"cannot read safetensors file '{path}': {exc}") from exc
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._data_start = 8 + n
        for name, e in self.entries.items():
            start, end = e.get("data_offsets", (0, -1))
            if not 0 <= start <= end or self._data_start + end > size:
                raise CheckpointError(f"'{path}': tensor '{name}' lies outside the file (offsets {start}..{end}, "
                                      f"file size {size}); the file is truncated or corrupt")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (BF16 as uint16), shaped, without copying (a view of the map)."""
        e = self.entries[name]
        start, end = e["data_offsets"]
        dtype = e["dtype"]
        if dtype == "BF16":
            np_dtype = np.uint16
        elif dtype in _NP_DTYPES:
            np_dtype = _NP_DTYPES[dtype]
        else:
            raise CheckpointError(f"'{self.path}': tensor '{name}' has unsupported dtype {dtype}")
        if end == start:
            return np.zeros(e["shape"], np_dtype)
        flat = np.frombuffer(self._mmap, dtype=np_dtype, count=(end - start) // np.dtype(np_dtype).itemsize,
                             offset=self._data_start + start)
        return flat.reshape(e["shape"])

    def get(self, name: str) -> np.ndarray:
        raw = self.raw(name)
        if self.entries[name]["dtype"] == "BF16":
            return bf16_to_float32(raw)
        return np.array(raw)  # copy out of the map

    def source(self, name: str) -> "TensorSource":
        return TensorSource(self, name)

    def release(self, name: str) -> None:
        """Drop the tensor's file pages from this process's memory (they stay in the OS page cache)."""
        if self._mmap is None:
            return
        start, end = self.entries[name]["data_offsets"]
        lo = (self._data_start + start) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = self._data_start + end
        if hi > lo and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class TensorSource:
    """One tensor of a safetensors file, not read yet: `shape`, `numpy()` (float32/int copy) and `copy_into`."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name
        self.shape = file.shape(name)
        self.dtype = file.entries[name]["dtype"]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numpy(self) -> np.ndarray:
        return self.file.get(self.name)

    def copy_into(self, dst: np.ndarray, transpose: bool = False) -> None:
        """Write the tensor as float32 into `dst` (a float32 array, e.g. a parameter's memory; shape = the
        tensor's shape, reversed when `transpose` is set for a 2-D tensor). No full-size temporary is made.
        Raises TypeError for a non-float32 `dst`, ValueError for a shape that does not fit."""
        copy_many([(self, dst, transpose)])

    def _bands(self, dst: np.ndarray, transpose: bool) -> list:
        """Checks `dst`; returns the copy as tasks, each a () -> None over a band of destination rows."""
        if dst.dtype != np.float32:
            raise TypeError(f"copy_into: destination must be float32, got {dst.dtype}")
        raw = self.file.raw(self.name)
        if transpose:
            raw = raw.T
        if tuple(raw.shape) != tuple(dst.shape):
            raise ValueError(f"copy_into: '{self.name}' has shape {raw.shape}, destination {dst.shape}")
        fn = _copy
        if self.dtype == "BF16":
            fn, dst = _copy_bf16, dst.view(np.uint32)
        if dst.ndim == 0 or dst.shape[0] <= BAND_ROWS or dst.size < (1 << 22):
            return [lambda: fn(dst, raw)]
        return [lambda i=i: fn(dst[i:i + BAND_ROWS], raw[i:i + BAND_ROWS])
                for i in range(0, dst.shape[0], BAND_ROWS)]


TILE = 256  # rows/columns per block of a transposed copy: a 256 x 256 tile of both arrays stays in cache
BAND_ROWS = 1024  # rows of the destination per task when a large tensor's copy is split over threads
_POOL = None


def copy_many(jobs) -> None:
    """`source.copy_into(dst, transpose)` for every (TensorSource, dst, transpose) in `jobs`, on a thread pool
    of the CPU-thread count. The tensors' bands are queued in order and each tensor's file pages are dropped
    from the process when its last band is done, so only the few tensors in flight have file pages mapped.

    Why threads across tensors and not only within large ones: most of loading a model is first-touch page
    faults of the new parameter memory (Qwen2-VL-2B: 2.2 M faults of 4 KiB, ~5 s of kernel time on the 2-core
    VM of docs/performance.md) and the bf16 widening; numpy's copy loops release the GIL, so both spread over
    the cores. Every destination is checked (TypeError / ValueError as `copy_into`) before anything is copied.
    """
    global _POOL
    tasks, remaining = [], {}
    for source, dst, transpose in jobs:
        bands = source._bands(dst, transpose)
        remaining[id(source)] = [len(bands), source]
        tasks += [(band, id(source)) for band in bands]
    lock = threading.Lock()

    def run(task):
        band, key = task
        band()
        with lock:
            entry = remaining[key]
            entry[0] -= 1
            last = entry[0] == 0
        if last:
            entry[1].file.release(entry[1].name)

    if len(tasks) <= 1:
        for task in tasks:
            run(task)
        return
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        from ppiad.utils.threads import resolve

        _POOL = ThreadPoolExecutor(max(1, resolve()[0]), thread_name_prefix="ppiad-load")
    for _ in _POOL.map(run, tasks):
        pass


def _copy_bf16(bits: np.ndarray, raw: np.ndarray) -> None:
    _copy(bits, raw)   # uint16 -> uint32, widened straight into the destination ...
    bits <<= 16        # ... bf16 is the top half of a float32


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src (with dtype conversion); a transposed 2-D source is copied tile by tile, which is several
    times faster than numpy's element order for large matrices (measured 0.16 s -> 0.05-0.10 s for
    [8960, 1536])."""
    if src.ndim != 2 or src.flags.c_contiguous or min(src.shape) <= TILE:
        dst[...] = src
        return
    rows, cols = src.shape
    for i in range(0, rows, TILE):
        for j in range(0, cols, TILE):
            dst[i:i + TILE, j:j + TILE] = src[i:i + TILE, j:j + TILE]


def cpu_float32_view(tensor) -> Union[np.ndarray, None]:
    """A writable numpy view of a dense float32 Paddle tensor in CPU memory (no copy), else None.

    Paddle has no writable zero-copy numpy export (`np.array(t)` copies; DLPack exports are read-only), so
    the view is made from the tensor's data pointer. It is valid while the tensor lives and is not resized.
    """
    import paddle

    if tensor.dtype != paddle.float32 or not tensor.place.is_cpu_place() or not tensor._is_initialized():
        return None
    n = int(np.prod(tensor.shape)) if tensor.shape else 1
    if n == 0:
        return None
    buf = (ctypes.c_float * n).from_address(tensor.data_ptr())
    return np.frombuffer(buf, dtype=np.float32).reshape(tensor.shape)


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
    for name, value in iter_sources(layout, files):
        yield name, value.numpy() if isinstance(value, TensorSource) else value


def iter_sources(layout: str, files: list[str]) -> Iterator[tuple[str, Union[TensorSource, np.ndarray]]]:
    """Yield (name, TensorSource) for safetensors (read lazily, see `TensorSource.copy_into`), or
    (name, numpy array) for a Paddle pickle file."""
    if layout == "hf":
        for path in files:
            st = SafetensorsFile(path)
            for name in st.keys():
                yield name, st.source(name)
        return
    import paddle

    state = paddle.load(files[0])
    for name in list(state):
        value = state.pop(name)
        arr = value.astype("float32").numpy() if hasattr(value, "numpy") and \
            str(value.dtype).endswith(("bfloat16", "float16")) else np.asarray(value)
        yield name, arr
