"""Qwen2-VL in plain Paddle: vision transformer, patch merger, Qwen2 decoder with multimodal rotary positions.

The architecture follows transformers 4.51.3's `modeling_qwen2_vl.py` (the reference a parity test checks us
against); the code is our own. Parameter names equal the Hugging Face checkpoint's, so a
`Qwen/Qwen2-VL-*-Instruct` directory loads without conversion.

Weight layout: every dense layer is `ppiad.models.linear.Linear`, whose weight is [out, in] as in torch and
the HF safetensors (Paddle's nn.Linear would keep [in, out]), so weights load and save without transposition.
The lm_head keeps HF's [vocab, hidden] layout too, so tied embeddings share one tensor.

Shapes used in comments: B batch, T new tokens, S = T_past + T keys, H heads, Hk key/value heads, D head dim.
Precision: fp32 on CPU (tested). dtype="bfloat16" casts the weights and keeps RMSNorm, rotary and softmax in
fp32 as the reference does; it needs a GPU and is untested here.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppiad.models import weights as W
from ppiad.models.kv_cache import StaticKVCache, _LayerView
from ppiad.models.linear import Linear
from ppiad.utils.io import atomic_write_json

QWEN2_VL_MODEL_TYPE = "qwen2_vl"
QWEN2_VL_ARCHITECTURE = "Qwen2VLForConditionalGeneration"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Qwen2VLVisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584  # output width of the patch merger = the decoder's hidden size
    mlp_ratio: float = 4
    num_heads: int = 16
    in_chans: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"


@dataclass
class Qwen2VLConfig:
    # class-level (not fields): what config.json must say, and the vision config type; Qwen2.5-VL overrides them
    model_type = QWEN2_VL_MODEL_TYPE
    architecture = QWEN2_VL_ARCHITECTURE
    vision_config_class = Qwen2VLVisionConfig

    vision_config: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict = field(default_factory=lambda: {"type": "mrope", "mrope_section": [16, 24, 24]})
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged on save

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        return list(self.rope_scaling["mrope_section"])

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Qwen2VLConfig":
        d = dict(d)
        vision = dict(d.pop("vision_config", None) or {})
        if "in_channels" in vision:  # transformers spells it in_channels, the hub's config.json in_chans
            vision["in_chans"] = vision.pop("in_channels")
        vnames = set(cls.vision_config_class.__dataclass_fields__)
        vcfg = cls.vision_config_class(**{k: v for k, v in vision.items() if k in vnames})
        names = set(cls.__dataclass_fields__) - {"vision_config", "extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        cfg = cls(vision_config=vcfg, **kwargs)
        cfg.extra = {k: v for k, v in d.items() if k != "extra"}
        cfg.extra["_vision_extra"] = {k: v for k, v in vision.items() if k not in vnames}
        if not cfg.rope_scaling or "mrope_section" not in cfg.rope_scaling:
            raise W.CheckpointError(f"{source}: rope_scaling.mrope_section is required for {cls.model_type}, "
                                    f"found rope_scaling={cfg.rope_scaling!r}")
        if 2 * sum(cfg.mrope_section) != cfg.head_dim:
            raise W.CheckpointError(f"{source}: 2 * sum(mrope_section={cfg.mrope_section}) must equal head_dim "
                                    f"{cfg.head_dim} (hidden_size / num_attention_heads)")
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise W.CheckpointError(f"{source}: hidden_size must divide by num_attention_heads and that by "
                                    f"num_key_value_heads")
        return cfg

    def to_dict(self) -> dict:
        extra = dict(self.extra)
        vision = dict(self.vision_config.__dict__)
        vision.update(extra.pop("_vision_extra", {}))
        out = {"architectures": [self.architecture], "model_type": self.model_type}
        out.update(extra)
        out.update({k: v for k, v in self.__dict__.items() if k not in ("vision_config", "extra")})
        out["vision_config"] = vision
        return out

    @classmethod
    def from_file(cls, path: str) -> "Qwen2VLConfig":
        if not os.path.isfile(path):
            raise W.CheckpointError(f"model config not found: '{path}'")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except ValueError as exc:
            raise W.CheckpointError(f"'{path}' is not valid JSON: {exc}") from exc
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type != cls.model_type or (archs and cls.architecture not in archs):
            raise W.CheckpointError(
                f"'{path}' does not describe a {cls.model_type} model: model_type={model_type!r}, "
                f"architectures={archs!r} (expected model_type '{cls.model_type}' and '{cls.architecture}'; "
                f"ppiad.models.AutoModel picks the class from model_type)")
        return cls.from_dict(d, source=path)


@dataclass
class Qwen2VLOutput:
    logits: paddle.Tensor                 # [B, T, V] (or the last `logits_to_keep` positions)
    loss: Optional[paddle.Tensor] = None  # mean next-token cross entropy over labels != -100
    past_key_values: Optional[list] = None  # per layer (key, value), each [B, Hk, S, D]
    rope_deltas: Optional[paddle.Tensor] = None  # [B, 1] int64: rotary position - cache index after prefill
    hidden_states: Optional[paddle.Tensor] = None  # [B, T, hidden] final normed hidden states


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------
def rotate_half(x: paddle.Tensor) -> paddle.Tensor:
    x1, x2 = paddle.split(x, 2, axis=-1)
    return paddle.concat([-x2, x1], axis=-1)


def _cast(x: paddle.Tensor, dtype) -> paddle.Tensor:
    """x.astype(dtype), skipped when x already has it (even a same-dtype astype costs an op dispatch, ~10 us,
    which adds up over the ~100 small ops of a decode step)."""
    return x if x.dtype == dtype else x.astype(dtype)


def _neg_large(dtype) -> float:
    # the most negative finite value: fully masked rows (left padding) then soften to uniform, never NaN
    return float(np.finfo(np.float32).min) if dtype == paddle.float32 else -1e30


class RMSNorm(nn.Layer):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = _cast(x, paddle.float32)
        x = x * paddle.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)
        return self.weight * _cast(x, dtype)


# ----------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------
class PatchConv(nn.Conv3D):
    """The patch conv (weight [E, C, t, p, p], as in the checkpoint) applied to flattened patches.

    Each patch is exactly one conv window (stride = kernel), so the conv equals a matmul with the flattened
    weight (much faster on CPU). The weight is read inside this layer's own call, which is what lets sharding
    stage 3 gather it (its hooks sit on the layer that owns the parameter)."""

    def forward(self, pixel_values):  # [N, C*t*p*p] -> [N, E]
        w = self.weight.reshape([self.weight.shape[0], -1])
        return paddle.matmul(pixel_values.astype(w.dtype), w, transpose_y=True)


class PatchEmbed(nn.Layer):
    """3-D conv with stride = kernel over (t, h, w) patches, i.e. one linear map per flattened patch."""

    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        k = [cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size]
        self.embed_dim = cfg.embed_dim
        self.proj = PatchConv(cfg.in_chans, cfg.embed_dim, kernel_size=k, stride=k, bias_attr=False)

    def forward(self, pixel_values):  # [N, C*t*p*p] -> [N, E]
        return self.proj(pixel_values)


def vision_rotary_tables(cos, sin, num_heads: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """cos, sin [1, N, D] -> cos and signed sin [H, N, D] for `_rotate`, made once per forward for all blocks.

    Paddle's CPU elementwise kernels are several times slower when one operand is broadcast than on equal
    shapes (measured ~8x for [16, 1936, 80] x [1, 1936, 80]), so the tables are repeated over the heads.
    The signed sin is (-sin of the first half, sin of the second half): rotate_half(x) * sin equals
    flip_halves(x) * signed_sin exactly (only signs move).
    """
    half = cos.shape[-1] // 2
    signed = paddle.concat([-sin[..., :half], sin[..., half:]], axis=-1)
    return paddle.tile(cos, [num_heads, 1, 1]), paddle.tile(signed, [num_heads, 1, 1])


def _rotate(x, cos, signed_sin):
    """x * cos + rotate_half(x) * sin, with the halves of x swapped by one roll of half the last axis instead
    of split/neg/concat (the sign is in `signed_sin`). Not paddle.flip: its CPU kernel took 9.8 ms for a
    [16, 1936, 80] tensor, roll 2.6 ms (the same values)."""
    return x * cos + paddle.roll(x, x.shape[-1] // 2, axis=-1) * signed_sin


VISION_SCORE_BLOCK_BYTES = 8 << 20  # scores of one block of query rows; 6-8 MB measured fastest (docs/performance.md)


class VisionAttention(nn.Layer):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)

    def forward(self, x, cu_seqlens: list[int], cos, sin):  # x [N, E]; cos, sin: `vision_rotary_tables`
        n = x.shape[0]
        # [3, H, N, D], made contiguous once: on a strided view every matmul below and the rotary would copy
        # its input first (v of one 1,936-patch image: 700 ms -> 200 ms for a block's attention)
        qkv = self.qkv(x).reshape([n, 3, self.num_heads, self.head_dim]).transpose([1, 2, 0, 3]).contiguous()
        q, k, v = qkv[0], qkv[1], qkv[2]
        dtype = q.dtype
        # the score scale 1/sqrt(D) is applied to q ([H, N, D]) rather than to the scores ([H, N, N])
        q = (_rotate(q.astype("float32"), cos, sin) * (1.0 / math.sqrt(self.head_dim))).astype(dtype)
        k = _rotate(k.astype("float32"), cos, sin).astype(dtype)
        outs = []
        # Full attention within each image, none across images: one attention per image (a loop over
        # images, not an N x N block-diagonal mask), computed for a block of query rows at a time so that
        # the block's scores [H, rows, L] stay in the CPU's cache instead of a [H, L, L] tensor (240 MB for a
        # 1,936-patch image) being written, softmaxed and read back from memory: 351 -> 187 ms per block's
        # attention at 2 threads (docs/performance.md). Each row's result is the same computation.
        for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            rows = max(1, VISION_SCORE_BLOCK_BYTES // (self.num_heads * (e - s) * 4))
            for r in range(s, e, rows):
                scores = paddle.matmul(q[:, r:min(r + rows, e)], k[:, s:e], transpose_y=True)
                probs = F.softmax(scores.astype("float32"), axis=-1).astype(dtype)
                outs.append(paddle.matmul(probs, v[:, s:e]))
        out = paddle.concat(outs, axis=1) if len(outs) > 1 else outs[0]  # [H, N, D]
        return self.proj(out.transpose([1, 0, 2]).reshape([n, -1]))


class VisionMlp(nn.Layer):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.act = act

    def forward(self, x):
        h = self.fc1(x)
        if self.act == "quick_gelu":
            h = h * F.sigmoid(1.702 * h)
        elif self.act == "gelu":
            h = F.gelu(h)
        else:
            raise ValueError(f"unsupported vision hidden_act {self.act!r}")
        return self.fc2(h)


class VisionBlock(nn.Layer):
    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, epsilon=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, epsilon=1e-6)
        self.attn = VisionAttention(cfg.embed_dim, cfg.num_heads)
        self.mlp = VisionMlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.hidden_act)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Layer):
    """LayerNorm, then each 2x2 group of neighbouring patches (contiguous in the input) -> one token."""

    def __init__(self, out_dim: int, context_dim: int, merge: int):
        super().__init__()
        self.hidden = context_dim * merge * merge
        self.ln_q = nn.LayerNorm(context_dim, epsilon=1e-6)
        # a LayerList so the names are mlp.0 / mlp.2 as in the checkpoint (mlp.1 is the parameter-free GELU)
        self.mlp = nn.LayerList([Linear(self.hidden, self.hidden), nn.GELU(), Linear(self.hidden, out_dim)])

    def forward(self, x):
        x = self.ln_q(x).reshape([-1, self.hidden])
        for layer in self.mlp:
            x = layer(x)
        return x


def vision_rotary_freqs(grid_thw: np.ndarray, merge: int, inv_freq: np.ndarray) -> np.ndarray:
    """Rotary angles float32 [N, D/2] of the vision tower: D/4 frequencies of each patch's row, then D/4 of its
    column, patches in the processor's merge-group order (h/m, w/m, m, m) per frame, frames repeated."""
    pos = []
    for t, h, w in grid_thw:
        rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
        cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
        rows = rows.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        pos.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
    pos = np.concatenate(pos, 0).astype(np.float32)  # [N, 2]
    return (pos[:, :, None] * inv_freq[None, None, :]).reshape(len(pos), -1)


def vision_rotary_cos_sin(freqs: np.ndarray) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Angles [N, D/2] -> cos, sin [1, N, D] (the halves repeated, as rotate_half expects), broadcast over heads."""
    emb = paddle.to_tensor(np.concatenate([freqs, freqs], -1))
    return paddle.cos(emb).unsqueeze(0), paddle.sin(emb).unsqueeze(0)


class Qwen2VisionTransformer(nn.Layer):
    def __init__(self, cfg: Qwen2VLVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.LayerList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg.hidden_size, cfg.embed_dim, cfg.spatial_merge_size)
        rot_dim = cfg.embed_dim // cfg.num_heads // 2  # half the head dim for rows, half for columns
        self.rot_inv_freq = 1.0 / (10000.0 ** (np.arange(0, rot_dim, 2, dtype=np.float32) / rot_dim))

    def rotary(self, grid_thw: np.ndarray) -> tuple[paddle.Tensor, paddle.Tensor]:
        """cos/sin [1, N, D]: 2-D rotary from each patch's (row, col), patches in merge-group order."""
        return vision_rotary_cos_sin(vision_rotary_freqs(grid_thw, self.cfg.spatial_merge_size, self.rot_inv_freq))

    def forward(self, pixel_values, grid_thw) -> paddle.Tensor:
        grid = _as_numpy_int(grid_thw).reshape(-1, 3)
        x = self.patch_embed(pixel_values)
        cos, sin = vision_rotary_tables(*self.rotary(grid), self.cfg.num_heads)
        lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])  # one attention segment per frame
        cu = [0] + np.cumsum(lengths).tolist()
        if cu[-1] != x.shape[0]:
            raise ValueError(f"pixel_values has {x.shape[0]} patches but image_grid_thw describes {cu[-1]}")
        for blk in self.blocks:
            x = blk(x, cu, cos, sin)
        return self.merger(x)


# ----------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------
class Qwen2Attention(nn.Layer):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.num_heads, self.num_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = Linear(cfg.hidden_size, self.num_kv * self.head_dim)
        self.v_proj = Linear(cfg.hidden_size, self.num_kv * self.head_dim)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias_attr=False)
        self.attn_implementation = "eager"   # or "sdpa": Qwen2VLForConditionalGeneration.set_attn_implementation

    def forward(self, x, cos, sin, allowed, past):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape([b, t, self.num_heads, self.head_dim]).transpose([0, 2, 1, 3])
        k = self.k_proj(x).reshape([b, t, self.num_kv, self.head_dim]).transpose([0, 2, 1, 3])
        v = self.v_proj(x).reshape([b, t, self.num_kv, self.head_dim]).transpose([0, 2, 1, 3])
        if t > 1:  # Paddle's CPU elementwise kernels are several times slower with a broadcast operand: repeat
            # the tables over the heads (one 2B layer at 587 tokens: q's rotary 21.5 -> 8.3 ms; same values)
            q = _rotate(q, *(tab.expand([b, self.num_heads, t, tab.shape[-1]]).contiguous() for tab in (cos, sin)))
            k = _rotate(k, *(tab.expand([b, self.num_kv, t, tab.shape[-1]]).contiguous() for tab in (cos, sin)))
        else:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)  # sin: signed (see vision_rotary_tables)
        if isinstance(past, _LayerView):  # preallocated cache: written in place, attention over the whole buffer
            k, v = past.write(k, v)
            present = past
        else:
            if past is not None:
                k = paddle.concat([past[0], k], axis=2)
                v = paddle.concat([past[1], v], axis=2)
            present = (k, v)
        if self.attn_implementation == "sdpa":
            return self.o_proj(self._sdpa(q, k, v, allowed)), present
        g = self.num_heads // self.num_kv
        s = k.shape[2]
        # grouped-query attention: the g query heads of one key/value head are g*T rows of one matmul
        # against its keys, q [B, Hk, g*T, D] x k [B, Hk, S, D]^T (no broadcast copy of k or v)
        qg = q.reshape([b, self.num_kv, g * t, self.head_dim])
        scores = paddle.matmul(qg, k, transpose_y=True) / math.sqrt(self.head_dim)
        scores = _cast(scores, paddle.float32).reshape([b, self.num_kv, g, t, s])
        if allowed is not None and allowed.dtype == paddle.bool:
            scores = paddle.where(allowed, scores, paddle.full([], _neg_large(scores.dtype), scores.dtype))
        elif allowed is not None:  # additive bias (0 or the most negative float) from a preallocated cache
            scores = scores + allowed
        probs = _cast(F.softmax(scores, axis=-1), v.dtype).reshape([b, self.num_kv, g * t, s])
        out = paddle.matmul(probs, v)  # [B, Hk, g*T, D]
        out = out.reshape([b, self.num_heads, t, self.head_dim]).transpose([0, 2, 1, 3]).reshape([b, t, -1])
        return self.o_proj(out), present

    def _sdpa(self, q, k, v, allowed):
        """Paddle's fused scaled dot-product attention (flash / memory-efficient kernels on GPU for bf16/fp16;
        Paddle's math fallback elsewhere, tested on CPU for equality with the eager path) with the same mask:
        an additive bias of 0 / the most negative finite value, so fully masked padding rows give a uniform
        average as in the eager path, never NaN. q [B, H, T, D], k, v [B, Hk, S, D] -> [B, T, H*D]."""
        b, _, t, _ = q.shape
        s = k.shape[2]
        if allowed.dtype == paddle.bool:
            bias = paddle.where(allowed.reshape([b, 1, t, s]), paddle.zeros([], q.dtype),
                                paddle.full([], _neg_large(q.dtype), q.dtype))
        else:   # an additive bias [B, 1, 1, 1, S] from a preallocated decode cache (ppiad.models.kv_cache)
            bias = allowed.astype(q.dtype).reshape([b, 1, 1, s]).expand([b, 1, t, s])
        out = F.scaled_dot_product_attention(q.transpose([0, 2, 1, 3]), k.transpose([0, 2, 1, 3]),
                                             v.transpose([0, 2, 1, 3]), attn_mask=bias, training=False,
                                             scale=1.0 / math.sqrt(self.head_dim))   # [B, T, H, D]
        return out.reshape([b, t, -1])


class Qwen2MLP(nn.Layer):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias_attr=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias_attr=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias_attr=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Layer):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, allowed, past):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Qwen2Model(nn.Layer):
    """Embeddings + decoder layers + final norm (the checkpoint's `model.*`)."""

    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.LayerList([Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        d = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
        # channel c of the rotary embedding takes its position from axis axis_of[c] (0 t, 1 h, 2 w)
        sec = cfg.mrope_section * 2
        self.axis_of = np.concatenate([np.full(n, i % 3) for i, n in enumerate(sec)])
        self.recompute = False   # Qwen2VLForConditionalGeneration.set_recompute

    def _rotary_tables(self):
        """inv_freq [D/2] and the axis picker [3, 1, 1, D] as tensors, made once (not at every forward)."""
        if getattr(self, "_tables", None) is None:
            onehot = np.eye(3, dtype=np.float32)[:, self.axis_of][:, None, None, :]
            self._tables = (paddle.to_tensor(self.inv_freq), paddle.to_tensor(onehot))
        return self._tables

    def rotary(self, position_ids, dtype):
        """position_ids [3, B, T] -> cos, signed sin [B, 1, T, D] with the multimodal sections applied (signed:
        the first half negated, for `_rotate`).

        [B, T] position ids (text, the same on the three axes: decode steps) give the same values with
        plain rotary (each channel's value then comes from that one position), in fewer operations.
        """
        inv_freq, onehot = self._rotary_tables()
        freqs = position_ids.astype("float32").unsqueeze(-1) * inv_freq  # [(3,) B, T, D/2]
        emb = paddle.concat([freqs, freqs], axis=-1)  # [(3,) B, T, D]
        if position_ids.ndim == 2:
            cos, sin = paddle.cos(emb), paddle.sin(emb)
        else:
            cos = (paddle.cos(emb) * onehot).sum(0)
            sin = (paddle.sin(emb) * onehot).sum(0)
        half = sin.shape[-1] // 2
        sin = paddle.concat([-sin[..., :half], sin[..., half:]], axis=-1)
        return _cast(cos.unsqueeze(1), dtype), _cast(sin.unsqueeze(1), dtype)

    def forward(self, inputs_embeds, position_ids, attention_mask, past_key_values, use_cache):
        b, t, _ = inputs_embeds.shape
        if isinstance(past_key_values, StaticKVCache):
            return self._forward_static(inputs_embeds, position_ids, past_key_values)
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        s = past_len + t
        if attention_mask is None:
            attention_mask = paddle.ones([b, s], dtype="int64")
        if attention_mask.shape[-1] != s:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected past + new = "
                             f"{past_len} + {t}")
        # query i (absolute position past_len + i) may see key j if j <= past_len + i and j is not padding
        causal = paddle.arange(s).unsqueeze(0) <= (paddle.arange(t) + past_len).unsqueeze(1)  # [T, S]
        allowed = causal.unsqueeze(0) & (attention_mask.astype("bool").unsqueeze(1))  # [B, T, S]
        allowed = allowed.reshape([b, 1, 1, t, s])  # broadcasts over (kv head, group)
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        presents = []
        checkpointed = self.recompute and self.training and paddle.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            if checkpointed:
                # keep only the layer's inputs; its activations are recomputed in backward (the RNG state is
                # restored, so LoRA dropout draws the same masks). Hook-based (use_reentrant=False) so that
                # gradients also reach the prompt's KV cache passed in `past`.
                from paddle.distributed.fleet.utils import recompute
                x, present = recompute(layer, x, cos, sin, allowed, past, use_reentrant=False)
            else:
                x, present = layer(x, cos, sin, allowed, past)
            if use_cache:
                presents.append(present)
        return self.norm(x), (presents if use_cache else None)

    def _forward_static(self, inputs_embeds, position_ids, cache: StaticKVCache):
        """One decode step on a preallocated cache: one new token per row; the cache's own bias replaces the
        attention mask (a single query sees every filled key, so no causal mask is needed)."""
        b, t, _ = inputs_embeds.shape
        if t != 1:
            raise ValueError(f"a StaticKVCache takes one new token per row and step, got {t}")
        bias = cache.begin_step().reshape([b, 1, 1, 1, cache.capacity])  # broadcasts over (kv head, group)
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, cos, sin, bias, cache.layer(i))
        cache.end_step()
        return self.norm(x), cache


class LMHead(nn.Layer):
    """Logits = hidden @ weight^T with weight in HF layout [vocab, hidden]; tied heads reuse the embedding."""

    def __init__(self, hidden: int, vocab: int, tied_embedding: nn.Embedding | None = None):
        super().__init__()
        if tied_embedding is None:
            self.weight = self.create_parameter([vocab, hidden])
            self._tied = None
        else:
            self._tied = [tied_embedding]  # a plain list, so the shared weight is not registered twice
            # Sharding stage 3 gathers a layer's own parameters plus its `extra_parameters` before its call and
            # frees them after: the embedding frees the shared weight when its call returns, so list it here too.
            self.extra_parameters = [tied_embedding.weight]

    def forward(self, h):
        w = self._tied[0].weight if self._tied is not None else self.weight
        return paddle.matmul(h, w, transpose_y=True)


class _Uninitialized(nn.initializer.Initializer):
    """Gives a parameter memory without writing it (from_pretrained overwrites every parameter)."""

    def forward(self, var, block=None):
        paddle.empty(var.shape, var.dtype)._share_buffer_to(var)
        return None


def _legacy_name(name: str) -> str:
    """Checkpoints saved by transformers >= 4.52 nest the parts as model.language_model.* / model.visual.*;
    the hub's Qwen2-VL files (and this module) use model.* / visual.*."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def _as_numpy_int(x) -> np.ndarray:
    if x is None:
        return None
    if isinstance(x, paddle.Tensor):
        x = x.numpy()
    return np.asarray(x).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# The full model
# ----------------------------------------------------------------------------------------------------------
class Qwen2VLForConditionalGeneration(nn.Layer):
    config_class = Qwen2VLConfig  # what from_pretrained reads config.json with; a subclass names its own
    vision_tower_class = Qwen2VisionTransformer

    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.config = config
        self.visual = self.vision_tower_class(config.vision_config)
        self.model = Qwen2Model(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size,
                              self.model.embed_tokens if config.tie_word_embeddings else None)

    # ---- memory settings ---------------------------------------------------------------------------------
    def set_attn_implementation(self, name: str) -> None:
        """Decoder attention: "eager" (matmul + softmax, the reference's order of operations) or "sdpa"
        (Paddle's scaled_dot_product_attention: flash / memory-efficient kernels on a GPU in bf16, a math
        fallback on CPU). Both apply the same causal + padding mask. ValueError for other names."""
        if name not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
        for layer in self.model.layers:
            layer.self_attn.attn_implementation = name

    def set_recompute(self, enabled: bool) -> None:
        """Activation recompute per decoder layer in training forwards (Paddle's fleet recompute utility)."""
        self.model.recompute = bool(enabled)

    # ---- vision ------------------------------------------------------------------------------------------
    def get_image_embeds(self, pixel_values, image_grid_thw) -> paddle.Tensor:
        """Vision tower + merger: [n_patches, C*t*p*p] -> [n_patches / merge^2, hidden]."""
        return self.visual(pixel_values, image_grid_thw)

    # ---- positions ---------------------------------------------------------------------------------------
    def get_rope_index(self, input_ids, image_grid_thw=None, attention_mask=None):
        """3-D rotary positions [3, B, T] and rope_deltas [B, 1] (as in the reference).

        Text tokens advance all three axes together; an image's tokens take (t, row, col) of their merged
        grid cell offset by the text before them; text after an image continues from the image's max + 1.
        Padding positions get 1, like the reference (they are masked anyway).
        """
        ids = _as_numpy_int(input_ids)
        b, t = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else _as_numpy_int(attention_mask)
        grids = _as_numpy_int(image_grid_thw)
        has_images = bool((ids == self.config.image_token_id).any())
        if has_images and grids is None:
            raise ValueError("input_ids hold image tokens: image_grid_thw is needed for their rotary positions "
                             "(also when image_embeds are precomputed)")
        if not has_images:
            if attention_mask is None:
                pos = np.broadcast_to(np.arange(t), (3, b, t)).copy()
                deltas = np.zeros((b, 1), np.int64)
            else:
                p = np.cumsum(mask, -1) - 1
                p[mask == 0] = 1
                pos = np.broadcast_to(p, (3, b, t)).copy()
                deltas = p.max(-1, keepdims=True) + 1 - t
            return paddle.to_tensor(pos, dtype="int64"), paddle.to_tensor(deltas, dtype="int64")
        grids = grids.reshape(-1, 3)
        m = self.config.vision_config.spatial_merge_size
        pos = np.ones((3, b, t), np.int64)
        deltas = np.zeros((b, 1), np.int64)
        image_index = 0
        for i in range(b):
            toks = ids[i][mask[i] == 1]
            starts = np.nonzero(toks == self.config.vision_start_token_id)[0]
            n_images = int((toks[starts[starts + 1 < len(toks)] + 1] == self.config.image_token_id).sum())
            chunks, st, nxt = [], 0, 0
            for _ in range(n_images):
                ed = st + int(np.argmax(toks[st:] == self.config.image_token_id))
                gt, gh, gw = grids[image_index]
                image_index += 1
                gh, gw = gh // m, gw // m
                text_len = ed - st
                chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + nxt)
                tt, hh, ww = np.meshgrid(self.image_time_positions(gt), np.arange(gh), np.arange(gw), indexing="ij")
                chunks.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + text_len + nxt)
                nxt = int(chunks[-1].max()) + 1
                st = ed + gt * gh * gw
            if st < len(toks):
                chunks.append(np.broadcast_to(np.arange(len(toks) - st), (3, len(toks) - st)) + nxt)
            llm = np.concatenate(chunks, axis=1)
            pos[:, i, mask[i] == 1] = llm
            deltas[i, 0] = llm.max() + 1 - t
        return paddle.to_tensor(pos), paddle.to_tensor(deltas)

    def image_time_positions(self, grid_t: int) -> np.ndarray:
        """Temporal rotary index of an image's frames [grid_t]: 0, 1, 2, ... in Qwen2-VL."""
        return np.arange(grid_t)

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                image_embeds=None, position_ids=None, past_key_values=None, use_cache=False, labels=None,
                rope_deltas=None, logits_to_keep: int = 0) -> Qwen2VLOutput:
        """One step of the decoder (prefill or decode).

        Prefill: input_ids [B, T] (left padded), attention_mask [B, T], pixel_values + image_grid_thw (or
        precomputed image_embeds). Positions come from get_rope_index and rope_deltas is returned.
        Decode: past_key_values from the previous output, attention_mask [B, T_past + T], and explicit
        position_ids [3, B, T] (= cache index + rope_deltas), or rope_deltas to derive them.
        logits_to_keep > 0 computes logits only for the last that many positions (saves the vocab matmul).
        """
        if input_ids is None:
            raise ValueError("input_ids is required")
        cfg = self.config
        embeds = self.model.embed_tokens(input_ids)
        is_image = input_ids == cfg.image_token_id
        # decode steps on a StaticKVCache come from generate(), which never emits image tokens: no check (a sync)
        n_image_tokens = 0 if isinstance(past_key_values, StaticKVCache) else int(is_image.astype("int64").sum())
        if n_image_tokens:
            if image_embeds is None:
                if pixel_values is None:
                    raise ValueError(f"input_ids hold {n_image_tokens} image tokens but neither pixel_values nor "
                                     f"image_embeds was given")
                image_embeds = self.get_image_embeds(pixel_values, image_grid_thw)
            if image_embeds.shape[0] != n_image_tokens:
                raise ValueError(f"image features and image tokens do not match: {image_embeds.shape[0]} features, "
                                 f"{n_image_tokens} tokens")
            # the k-th image token (row-major over the batch) takes the k-th image feature
            flat = is_image.reshape([-1])
            order = paddle.clip(paddle.cumsum(flat.astype("int64")) - 1, min=0)
            gathered = paddle.gather(image_embeds.astype(embeds.dtype), order).reshape(embeds.shape)
            embeds = paddle.where(is_image.unsqueeze(-1), gathered, embeds)

        if isinstance(past_key_values, StaticKVCache):
            past_len = past_key_values.length
        else:
            past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        b, t = input_ids.shape
        if position_ids is None:
            if past_len == 0:
                position_ids, rope_deltas = self.get_rope_index(input_ids, image_grid_thw, attention_mask)
            elif rope_deltas is not None:
                step = paddle.arange(past_len, past_len + t, dtype="int64").unsqueeze(0) + rope_deltas
                position_ids = step.unsqueeze(0).expand([3, b, t])
            else:
                raise ValueError("decode steps need position_ids [3, B, T] (cache index + rope_deltas) or "
                                 "rope_deltas from the prefill output")
        # [B, T] position_ids (text only: the same on the three rotary axes) are passed on as they are

        hidden, presents = self.model(embeds, position_ids, attention_mask, past_key_values, use_cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
            target = labels[:, 1:].reshape([-1, 1]).astype("int64")
            per_token = F.cross_entropy(logits[:, :-1].astype("float32").reshape([-1, logits.shape[-1]]), target,
                                        ignore_index=-100, reduction="none")
            # Paddle's reduction="mean" divides by all tokens, ignored ones included: average over kept ones
            loss = per_token.sum() / paddle.clip((target != -100).astype("float32").sum(), min=1.0)
        return Qwen2VLOutput(logits=logits, loss=loss, past_key_values=presents, rope_deltas=rope_deltas,
                             hidden_states=hidden)

    # ---- weights -----------------------------------------------------------------------------------------
    def linear_weight_names(self) -> set[str]:
        """Names of the `Linear` weights: [out, in] here and in HF files, [in, out] in Paddle-format (PaddleMIX)
        .pdparams files, whose layers are Paddle's nn.Linear."""
        return {f"{prefix}.weight" for prefix, layer in self.named_sublayers() if isinstance(layer, Linear)}

    def hf_state_dict(self) -> dict[str, np.ndarray]:
        """name -> float32 numpy array, in HF layout (which is this model's own)."""
        return {name: (p.astype("float32") if p.dtype != paddle.float32 else p).numpy()
                for name, p in self.state_dict().items()}

    def load_hf_tensors(self, tensors, layout: str = "hf", source: str = "checkpoint") -> None:
        """Assign (name, numpy array) pairs one by one; errors list missing / unexpected / mis-shaped keys."""
        params = self.state_dict()
        linear = self.linear_weight_names()
        tied = self.config.tie_word_embeddings
        seen, unexpected, mismatched = set(), [], []
        copies = []  # (source, parameter memory, transpose): run together on every core below
        for name, arr in tensors:
            name = _legacy_name(name)
            if name not in params:
                if not (tied and name == "lm_head.weight"):  # a tied head may be stored anyway; it is ignored
                    unexpected.append(name)
                continue
            target = params[name]
            shape = tuple(arr.shape)
            # Only Paddle-format files need a transposition: their linears (and an untied lm_head) are [in, out]
            transpose = layout == "paddle" and len(shape) == 2 and (
                name in linear or (name == "lm_head.weight" and shape != tuple(target.shape)))
            if (shape[::-1] if transpose else shape) != tuple(target.shape):
                mismatched.append(f"{name}: file {shape[::-1] if transpose else shape} vs model "
                                  f"{tuple(target.shape)}")
                continue
            view = W.cpu_float32_view(target) if isinstance(arr, W.TensorSource) else None
            if view is not None:  # straight from the file into the parameter's memory
                copies.append((arr, view, transpose))
            else:
                arr = arr.numpy() if isinstance(arr, W.TensorSource) else arr
                arr = arr.T if transpose else arr
                target.set_value(paddle.to_tensor(np.ascontiguousarray(arr), dtype="float32").astype(target.dtype))
            seen.add(name)
        missing = sorted(set(params) - seen)
        if not (missing or unexpected or mismatched):
            W.copy_many(copies)
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
        if problems:
            raise W.CheckpointError(f"weights in '{source}' do not fit the {self.config.model_type} config: "
                                    + "; ".join(problems))

    @classmethod
    def from_pretrained(cls, directory: str, dtype: str = "float32",
                        allow_pickle: bool = False) -> "Qwen2VLForConditionalGeneration":
        """Load a Hugging Face-format directory of this class's model_type (config.json + safetensors, single or
        sharded). ppiad.models.AutoModel.from_pretrained picks the class from config.json."""
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if not os.path.isdir(directory):
            raise W.CheckpointError(f"model directory not found: '{directory}'")
        config = cls.config_class.from_file(os.path.join(directory, "config.json"))
        layout, files = W.find_weights(directory, allow_pickle=allow_pickle)
        prev = paddle.get_default_dtype()
        # Create parameters directly in the target dtype and uninitialised: every one is overwritten from the
        # file (a missing one is an error below), and random initialisation of billions of weights takes
        # minutes on a CPU; even zero-filling them costs seconds.
        paddle.set_default_dtype(dtype)
        nn.initializer.set_global_initializer(_Uninitialized(), _Uninitialized())
        try:
            model = cls(config)
        finally:
            nn.initializer.set_global_initializer(None, None)
            paddle.set_default_dtype(prev)
        model.load_hf_tensors(W.iter_sources(layout, files), layout=layout, source=directory)
        model.eval()
        return model

    def save_pretrained(self, directory: str, max_shard_bytes: int | None = None) -> None:
        """Write config.json + model.safetensors (or shards + index) in HF layout, atomically per file."""
        os.makedirs(directory, exist_ok=True)
        tensors = self.hf_state_dict()
        bf16 = frozenset(n for n, p in self.state_dict().items() if p.dtype == paddle.bfloat16)
        W.save_sharded(directory, tensors, max_shard_bytes=max_shard_bytes, bf16_names=bf16)
        cfg = self.config.to_dict()
        cfg["torch_dtype"] = "bfloat16" if bf16 else "float32"
        atomic_write_json(os.path.join(directory, "config.json"), cfg)
