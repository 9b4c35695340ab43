"""Random seeds and RNG state: one call seeds everything; the full state round-trips through JSON for checkpoints.

Resuming a run must reproduce the uninterrupted run exactly (same sampled completions, same LoRA dropout
masks), so a checkpoint stores the state of every generator the trainer draws from: Python's `random`,
NumPy's global generator and Paddle's (one per device). The state is plain JSON (no pickle), so loading a
checkpoint never runs code.
"""
from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import paddle


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and Paddle (all devices) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    paddle.seed(seed)


@contextmanager
def seeded(seed: Optional[int]) -> Iterator[None]:
    """Paddle's generator seeded with `seed` for the block only; its state is put back afterwards (None = no
    change). Two blocks with the same seed and the same random ops draw the same numbers (dropout masks)."""
    if seed is None:
        yield
        return
    state = paddle.get_rng_state()
    paddle.seed(seed)
    try:
        yield
    finally:
        paddle.set_rng_state(state)


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any mix of ints/strings (e.g. base seed, step, rank); same on every machine."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def _paddle_state_to_json(state) -> list:
    # GeneratorState pickles through a tuple (device, seed, offset, engine bytes as ints): keep that tuple.
    return [list(s.__getstate__()) for s in state]


def _paddle_state_from_json(items) -> list:
    cls = type(paddle.get_rng_state()[0])
    out = []
    for item in items:
        s = cls.__new__(cls)
        s.__setstate__(tuple(item))
        out.append(s)
    return out


def get_rng_state() -> dict:
    """The state of every global generator, as JSON-serialisable data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "paddle": _paddle_state_to_json(paddle.get_rng_state()),
    }
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        state["paddle_cuda"] = _paddle_state_to_json(paddle.get_cuda_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` returned (CUDA state only when saved and a GPU is present)."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        paddle.set_rng_state(_paddle_state_from_json(state["paddle"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"invalid RNG state in checkpoint: {exc}") from exc
    if "paddle_cuda" in state and paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        paddle.set_cuda_rng_state(_paddle_state_from_json(state["paddle_cuda"]))
