"""Qwen2.5-VL in plain Paddle: what differs from Qwen2-VL, on top of ppiad/models/qwen2_vl.py.

The architecture follows transformers 4.51.3's `modeling_qwen2_5_vl.py` (the reference the parity test checks us
against); the code is our own. Parameter names equal the Hugging Face checkpoint's, so a
`Qwen/Qwen2.5-VL-{3B,7B}-Instruct` directory loads without conversion.

Shared unchanged with Qwen2-VL (imported, not copied): the Qwen2 decoder (q/k/v/o projections, so LoRA on q and v
works as for Qwen2-VL), its multimodal rotary positions, the LM head (tied or untied), the patch embedding, the
vision attention with its 2-D rotary, weight loading/saving and the generation interface.

What Qwen2.5-VL changes (Qwen2.5-VL technical report, arXiv:2502.13923, section 2.1; config.json):
- vision blocks use RMSNorm and a SwiGLU MLP with biases (`gate_proj`, `up_proj`, `down_proj`, act `silu`)
  instead of LayerNorm and a GELU MLP; the patch merger's `ln_q` is an RMSNorm too;
- window attention: most blocks attend only within windows of `window_size` pixels (112 px = 4 x 4 merged
  tokens = 8 x 8 patches); the blocks in `fullatt_block_indexes` attend over the whole image. The patches are
  reordered window by window (merge groups kept together) before the first block and the merged tokens are put
  back into raster order after the merger;
- vision config names: `hidden_size` is the tower's width and `out_hidden_size` the merger's output (Qwen2-VL:
  `embed_dim` and `hidden_size`);
- multimodal rotary: the temporal index of a vision token is `frame * seconds_per_grid * tokens_per_second`;
  for a still image `seconds_per_grid` is 0, so every image token has time index 0 (ppiad takes no video).

Precision: fp32 on CPU (tested); bf16 needs a GPU and is untested here, as for Qwen2-VL.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppiad.models.linear import Linear
from ppiad.models.qwen2_vl import (PatchEmbed, PatchMerger, Qwen2VLConfig, Qwen2VLForConditionalGeneration, RMSNorm,
                                   VisionAttention, _as_numpy_int, vision_rotary_cos_sin, vision_rotary_freqs,
                                   vision_rotary_tables)

QWEN2_5_VL_MODEL_TYPE = "qwen2_5_vl"
QWEN2_5_VL_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


@dataclass
class Qwen2_5_VLVisionConfig:
    """The vision tower's config.json block. Defaults: Qwen2.5-VL-7B-Instruct's."""
    depth: int = 32
    hidden_size: int = 1280          # the tower's width
    intermediate_size: int = 3420    # SwiGLU width
    out_hidden_size: int = 3584      # output width of the patch merger = the decoder's hidden size
    num_heads: int = 16
    in_chans: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "silu"
    window_size: int = 112           # pixels per window side
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: float = 2     # temporal rotary positions per second of video

    @property
    def embed_dim(self) -> int:  # the name the shared PatchEmbed reads
        return self.hidden_size


@dataclass
class Qwen2_5_VLConfig(Qwen2VLConfig):
    """Decoder fields as Qwen2VLConfig; the vision block is Qwen2_5_VLVisionConfig."""
    model_type = QWEN2_5_VL_MODEL_TYPE
    architecture = QWEN2_5_VL_ARCHITECTURE
    vision_config_class = Qwen2_5_VLVisionConfig

    vision_config: Qwen2_5_VLVisionConfig = field(default_factory=Qwen2_5_VLVisionConfig)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Qwen2_5_VLConfig":
        from ppiad.models.weights import CheckpointError

        cfg = super().from_dict(d, source)
        v = cfg.vision_config
        unit = v.patch_size * v.spatial_merge_size
        if v.window_size % unit:
            raise CheckpointError(f"{source}: vision_config.window_size {v.window_size} must be a multiple of "
                                  f"patch_size * spatial_merge_size = {unit}")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= int(i) < v.depth]
        if bad:
            raise CheckpointError(f"{source}: vision_config.fullatt_block_indexes {bad} are outside the "
                                  f"{v.depth} vision blocks")
        if v.out_hidden_size != cfg.hidden_size:
            raise CheckpointError(f"{source}: vision_config.out_hidden_size {v.out_hidden_size} must equal the "
                                  f"decoder's hidden_size {cfg.hidden_size}")
        return cfg


# ----------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------
class VisionSwiGLU(nn.Layer):
    """down_proj(act(gate_proj(x)) * up_proj(x)), all three with biases (the vision blocks' MLP)."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act != "silu":
            raise ValueError(f"unsupported Qwen2.5-VL vision hidden_act {act!r} (expected 'silu')")
        self.gate_proj = Linear(dim, hidden)
        self.up_proj = Linear(dim, hidden)
        self.down_proj = Linear(hidden, dim)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2_5_VisionBlock(nn.Layer):
    def __init__(self, cfg: Qwen2_5_VLVisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionSwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class Qwen2_5_VLPatchMerger(PatchMerger):
    """Qwen2-VL's merger with an RMSNorm as ln_q."""

    def __init__(self, out_dim: int, context_dim: int, merge: int):
        super().__init__(out_dim, context_dim, merge)
        self.ln_q = RMSNorm(context_dim, 1e-6)


def window_index(grid_thw: np.ndarray, window_size: int, patch_size: int, merge: int) -> tuple[np.ndarray, list]:
    """Window order of the merged tokens and the window boundaries in patches.

    grid_thw int [n_images, 3] in patches. Each frame's grid of merged tokens (h/m x w/m) is cut into windows of
    `window_size / (patch_size * m)` merged tokens a side, starting top-left; the last row/column of windows is
    cut short where the grid does not tile evenly. Returns (order int64 [n_merged]: merged-token indices of all
    images, window by window, row-major inside a window; cu [n_windows + 1]: cumulative patch counts, the
    attention segments of the windowed blocks). Matches the reference's `get_window_index`.
    """
    win = window_size // patch_size // merge
    unit = merge * merge
    order, cu, offset = [], [0], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // win), -(-gw // win)
        padded = np.full((t, nh * win, nw * win), -1, np.int64)
        padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        windows = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(-1, win * win)
        for row in windows:
            kept = row[row >= 0]
            if len(kept):
                order.append(kept + offset)
                cu.append(cu[-1] + len(kept) * unit)
        offset += t * gh * gw
    return np.concatenate(order), cu


class Qwen2_5_VisionTransformer(nn.Layer):
    """Patch embedding -> window reordering -> blocks (windowed, full at fullatt_block_indexes) -> merger ->
    raster order. Input pixel_values [n_patches, C*t*p*p] in the processor's order, grid_thw [n_images, 3];
    output [n_patches / merge^2, out_hidden_size] in the processor's (raster, merge-group) order."""

    def __init__(self, cfg: Qwen2_5_VLVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.LayerList([Qwen2_5_VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = Qwen2_5_VLPatchMerger(cfg.out_hidden_size, cfg.hidden_size, cfg.spatial_merge_size)
        rot_dim = cfg.hidden_size // cfg.num_heads // 2
        self.rot_inv_freq = 1.0 / (10000.0 ** (np.arange(0, rot_dim, 2, dtype=np.float32) / rot_dim))
        self.full_attention = frozenset(int(i) for i in cfg.fullatt_block_indexes)

    def forward(self, pixel_values, grid_thw) -> paddle.Tensor:
        cfg = self.cfg
        grid = _as_numpy_int(grid_thw).reshape(-1, 3)
        unit = cfg.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values)  # [N, E]
        n = x.shape[0]
        frames = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
        cu_full = [0] + np.cumsum(frames).tolist()  # one full-attention segment per frame
        if cu_full[-1] != n:
            raise ValueError(f"pixel_values has {n} patches but image_grid_thw describes {cu_full[-1]}")
        order, cu_windows = window_index(grid, cfg.window_size, cfg.patch_size, cfg.spatial_merge_size)
        # reorder whole merge groups (unit consecutive patches), so the merger still sees its groups intact
        freqs = vision_rotary_freqs(grid, cfg.spatial_merge_size, self.rot_inv_freq)
        freqs = freqs.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        cos, sin = vision_rotary_tables(*vision_rotary_cos_sin(freqs), cfg.num_heads)   # VisionAttention's layout
        order_t = paddle.to_tensor(order)
        x = paddle.gather(x.reshape([n // unit, -1]), order_t).reshape([n, -1])
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_full if i in self.full_attention else cu_windows, cos, sin)
        merged = self.merger(x)  # [N / unit, out] in window order
        return paddle.gather(merged, paddle.to_tensor(np.argsort(order)))


# ----------------------------------------------------------------------------------------------------------
# The full model
# ----------------------------------------------------------------------------------------------------------
class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: Qwen2-VL's decoder, head, forward, generation interface and weight IO with the Qwen2.5 vision
    tower. Parameter names: `visual.*`, `model.*`, `lm_head.weight` (absent when tie_word_embeddings)."""
    config_class = Qwen2_5_VLConfig
    vision_tower_class = Qwen2_5_VisionTransformer

    def image_time_positions(self, grid_t: int, seconds_per_grid: float = 0.0) -> np.ndarray:
        """Temporal rotary index of a vision input's frames [grid_t]: frame * seconds_per_grid *
        tokens_per_second, truncated to an integer (as the reference does). Still images: seconds_per_grid 0,
        so all zeros; a video would pass its seconds per temporal patch (ppiad has no video input)."""
        tps = self.config.vision_config.tokens_per_second
        return (np.arange(grid_t) * seconds_per_grid * tps).astype(np.int64)
