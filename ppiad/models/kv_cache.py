"""A preallocated key/value cache for token-by-token decoding, written in place.

The list-of-(key, value) cache that `Qwen2VLForConditionalGeneration.forward(use_cache=True)` returns grows by
concatenation: every decode step copies each layer's whole cache (O(context) per step and layer, plus an
allocation). `StaticKVCache` instead holds, per layer, key and value buffers of a fixed capacity
[N, Hk, capacity, D] and writes each step's new key/value at the next free index. Attention then runs over
the whole buffer, so a step costs the same at every context length; the slots not filled yet (and the
prompts' left padding) are excluded by one additive bias [N, 1, 1, capacity] (0 = attend, the most negative
float32 = ignore) that is shared by all layers and updated once per step, in place.

Used by `generation.generate` for decode steps (one new token per row, no gradient). Teacher-forced passes
(`completion_logprobs`) keep the list cache, which gradients can flow through.
"""
from __future__ import annotations

import numpy as np
import paddle


class StaticKVCache:
    """Per-layer key/value buffers [N, Hk, capacity, D] (float32 or the model's dtype) + a shared bias.

    Build it from a prefill cache with `from_prefill`. `length` = positions filled so far (prompt + decoded).
    """

    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, head_dim: int, capacity: int, dtype):
        self.capacity, self.length = int(capacity), 0
        self.keys = [paddle.zeros([rows, num_kv_heads, capacity, head_dim], dtype=dtype) for _ in range(num_layers)]
        self.values = [paddle.zeros([rows, num_kv_heads, capacity, head_dim], dtype=dtype) for _ in range(num_layers)]
        self._neg = float(np.finfo(np.float32).min)
        self.bias = paddle.full([rows, 1, 1, capacity], self._neg, dtype="float32")  # nothing filled yet

    @classmethod
    def from_prefill(cls, past_key_values, attention_mask: paddle.Tensor, capacity: int,
                     repeats: int = 1) -> "StaticKVCache":
        """From a prefill's list cache (per layer (key, value) [B, Hk, P, D]) and its attention mask [B, P]
        (0 = left padding): rows repeated `repeats` times each (row i*repeats + j = prompt i), room for
        capacity - P more positions. Raises ValueError if capacity < P."""
        k0 = past_key_values[0][0]
        b, hk, p, d = k0.shape
        if capacity < p:
            raise ValueError(f"KV cache capacity {capacity} is smaller than the prompt ({p} positions)")
        cache = cls(len(past_key_values), b * repeats, hk, d, capacity, k0.dtype)
        for i, (k, v) in enumerate(past_key_values):
            cache.keys[i][:, :, :p] = _repeat(k, repeats)
            cache.values[i][:, :, :p] = _repeat(v, repeats)
        keep = _repeat(attention_mask.astype("float32"), repeats).reshape([b * repeats, 1, 1, p])  # 1 or 0
        cache.bias[:, :, :, :p] = (1.0 - keep) * cache._neg
        cache.length = p
        return cache

    def begin_step(self) -> paddle.Tensor:
        """Make the next position visible (every row writes one token) and return the bias [N, 1, 1, capacity]
        to add to the attention scores. Raises ValueError when the cache is full."""
        if self.length >= self.capacity:
            raise ValueError(f"KV cache is full ({self.capacity} positions); allocate a larger capacity")
        self.bias[:, :, :, self.length] = 0.0
        return self.bias

    def write(self, layer: int, key: paddle.Tensor, value: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Store one step's key/value [N, Hk, 1, D] of `layer` at index `length`; returns the full buffers."""
        self.keys[layer][:, :, self.length:self.length + 1] = key
        self.values[layer][:, :, self.length:self.length + 1] = value
        return self.keys[layer], self.values[layer]

    def end_step(self) -> None:
        self.length += 1

    def layer(self, index: int) -> "_LayerView":
        return _LayerView(self, index)


class _LayerView:
    """What one attention layer sees of the cache: `write(key, value)` -> full key, value buffers."""

    __slots__ = ("cache", "index")

    def __init__(self, cache: StaticKVCache, index: int):
        self.cache, self.index = cache, index

    def write(self, key, value):
        return self.cache.write(self.index, key, value)


def _repeat(x: paddle.Tensor, n: int) -> paddle.Tensor:
    return x if n == 1 else paddle.repeat_interleave(x, n, axis=0)
