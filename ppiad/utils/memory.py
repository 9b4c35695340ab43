"""Training memory per process: what is measured (`measure`) and what is predicted (`estimate`).

All figures are bytes held by Paddle tensors on one process (one GPU in a real run):
- params: weights resident between steps (stage 3 keeps only this process's slice of every parameter above
  `distributed.stage3_segment_size` elements; other modes hold every weight);
- grads: gradient buffers of the trainable (LoRA) parameters (stage 2: only this process's share's buffer
  stays allocated between steps);
- optimizer: AdamW state (two fp32 moments per trainable parameter, plus an fp32 master copy in bf16);
  stage 1 / 2 keep ~1/N of it (whole parameters assigned to processes; stage 2: Paddle's assignment, the
  largest share); stage 3 keeps the small LoRA parameters whole, so their state stays whole too;
- peak: the highest total during one optimizer step: the resident state plus the step's transient tensors
  (see `_transient_bytes` for what it counts and where the figures come from).
bench/memory.py measures all four on CPU (2 processes, sharding emulated) and prints them beside `estimate`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------------------- shapes
def parameter_shapes(mc) -> dict:
    """name -> shape of every Qwen2-VL parameter for a `Qwen2VLConfig` (the checkpoint's names; a tied
    head has no lm_head.weight). Matches `Qwen2VLForConditionalGeneration(mc).named_parameters()`."""
    v, shapes = mc.vision_config, {}
    e, hid = v.embed_dim, int(v.embed_dim * v.mlp_ratio)
    shapes["visual.patch_embed.proj.weight"] = [e, v.in_chans, v.temporal_patch_size, v.patch_size, v.patch_size]
    for i in range(v.depth):
        b = f"visual.blocks.{i}."
        for n in ("norm1", "norm2"):
            shapes[b + n + ".weight"], shapes[b + n + ".bias"] = [e], [e]
        shapes[b + "attn.qkv.weight"], shapes[b + "attn.qkv.bias"] = [3 * e, e], [3 * e]
        shapes[b + "attn.proj.weight"], shapes[b + "attn.proj.bias"] = [e, e], [e]
        shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = [hid, e], [hid]
        shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = [e, hid], [e]
    m = e * v.spatial_merge_size ** 2
    shapes["visual.merger.ln_q.weight"], shapes["visual.merger.ln_q.bias"] = [e], [e]
    shapes["visual.merger.mlp.0.weight"], shapes["visual.merger.mlp.0.bias"] = [m, m], [m]
    shapes["visual.merger.mlp.2.weight"], shapes["visual.merger.mlp.2.bias"] = [v.hidden_size, m], [v.hidden_size]
    h, d = mc.hidden_size, mc.head_dim
    q, kv = mc.num_attention_heads * d, mc.num_key_value_heads * d
    shapes["model.embed_tokens.weight"] = [mc.vocab_size, h]
    for i in range(mc.num_hidden_layers):
        b = f"model.layers.{i}."
        for n, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{b}self_attn.{n}.weight"], shapes[f"{b}self_attn.{n}.bias"] = [out, h], [out]
        shapes[b + "self_attn.o_proj.weight"] = [h, q]
        shapes[b + "mlp.gate_proj.weight"] = [mc.intermediate_size, h]
        shapes[b + "mlp.up_proj.weight"] = [mc.intermediate_size, h]
        shapes[b + "mlp.down_proj.weight"] = [h, mc.intermediate_size]
        shapes[b + "input_layernorm.weight"] = shapes[b + "post_attention_layernorm.weight"] = [h]
    shapes["model.norm.weight"] = [h]
    if not mc.tie_word_embeddings:
        shapes["lm_head.weight"] = [mc.vocab_size, h]
    return shapes


def lora_shapes(mc, r: int, target_modules) -> dict:
    """name -> shape of the LoRA tensors ppiad adds (decoder attention/MLP projections named in
    `target_modules`): lora_A [in, r], lora_B [r, out]."""
    base = parameter_shapes(mc)
    out = {}
    for i in range(mc.num_hidden_layers):
        for t in target_modules:
            for part in ("self_attn", "mlp"):
                w = base.get(f"model.layers.{i}.{part}.{t}.weight")
                if w is not None:
                    out[f"model.layers.{i}.{part}.{t}.lora_A"] = [w[1], r]  # weights are [out, in]
                    out[f"model.layers.{i}.{part}.{t}.lora_B"] = [r, w[0]]
    return out


def qwen2_vl_config(name: str):
    """The published Qwen2-VL-2B/7B-Instruct architectures (values of their config.json files)."""
    from ppiad.models.qwen2_vl import Qwen2VLConfig

    vision = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"}
    sizes = {
        "2B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    }
    if name not in sizes:
        raise ValueError(f"unknown Qwen2-VL size {name!r}; known: {', '.join(sizes)}")
    d = dict(sizes[name])
    return Qwen2VLConfig.from_dict({**d, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                                    "vision_config": {**vision, "hidden_size": d["hidden_size"]}},
                                   source=f"Qwen2-VL-{name}")


# ------------------------------------------------------------------------------------------------- estimate
@dataclass
class Workload:
    """What one optimizer step processes on one process."""
    prompts: int             # prompts per micro-batch (train.prompts_per_device)
    generations: int         # G
    prompt_tokens: int       # tokens per prompt, image tokens included
    completion_tokens: int   # new tokens per completion (max_new_tokens: the worst case)
    image_patches: int       # vision patches per image (before the 2x2 merge)


def _numel(shape) -> int:
    return int(np.prod(shape))


def estimate(cfg, world_size: int, *, model_config=None, prompt_tokens: int | None = None,
             completion_tokens: int | None = None, image_patches: int | None = None,
             gpu: bool | None = None) -> dict:
    """Predicted bytes per process for training `cfg` on `world_size` processes: {"params", "grads",
    "optimizer", "peak"} (ints) plus "transient" (peak minus the resident three).

    model_config: a `Qwen2VLConfig` (default: cfg.model.path's config.json); prompt_tokens (default
    cfg.model.max_prompt_length), completion_tokens (default grpo.max_new_tokens) and image_patches (default:
    the patches of a max_pixels image) describe the step. gpu: plan for GPUs (None = this machine's
    device): Paddle's alignment and, with model.attn_implementation=sdpa, fused attention. Dtypes:
    cfg.model.dtype for weights and activations; adapters, their gradients and optimizer state in fp32 (bf16:
    fp32 master weights and gradients). Raises ValueError for an unknown dtype."""
    from ppiad.models.qwen2_vl import Qwen2VLConfig

    mc = model_config or Qwen2VLConfig.from_file(os.path.join(cfg.model.path, "config.json"))
    vc = mc.vision_config
    if image_patches is None:
        image_patches = int(cfg.model.max_pixels) // (vc.patch_size ** 2)
    work = Workload(cfg.train.prompts_per_device, cfg.grpo.num_generations,
                    int(prompt_tokens or cfg.model.max_prompt_length),
                    int(completion_tokens or cfg.grpo.max_new_tokens), int(image_patches))
    if cfg.model.dtype not in DTYPE_BYTES:
        raise ValueError(f"config key 'model.dtype': unknown dtype {cfg.model.dtype!r}")
    wb = DTYPE_BYTES[cfg.model.dtype]
    mode = cfg.distributed.sharding if world_size > 1 else "none"
    seg = cfg.distributed.stage3_segment_size
    gpu = _on_gpu(gpu)
    n = world_size
    params = 0
    for shape in parameter_shapes(mc).values():
        k = _numel(shape)
        if mode == "stage3" and k > seg:
            params += _stage3_slice(k, wb, n, gpu) * wb
        else:
            params += k * wb
    lora_named = lora_shapes(mc, cfg.lora.r, cfg.lora.target_modules)
    if cfg.lora.plus_ratio != 1.0:            # LoRA+ hands the optimizer two groups: every lora_A, then every lora_B
        lora_named = dict(sorted(lora_named.items(), key=lambda kv: kv[0].endswith("lora_B")))
    lora_sizes = [_numel(s) for s in lora_named.values()]   # in the optimizer's order (stage 2 assigns by it)
    lora = sum(lora_sizes)
    adapters = lora * 4                       # fp32 adapters (bf16: the optimizer's fp32 masters, below)
    grads = lora * 4                          # fp32 gradients (master_grad in bf16)
    if mode == "stage3":                      # one gradient buffer, each tensor padded to the alignment
        grads = sum(_aligned(k * 4, gpu) for k in lora_sizes)
    per_element = 4 * 2 + (4 if wb == 2 else 0)   # AdamW's two fp32 moments (+ the fp32 master in bf16)
    optimizer = lora * per_element
    stage2_buffer = 0
    if mode == "stage1":
        optimizer = optimizer // n
    elif mode == "stage2":
        owned, stage2_buffer = _stage2_shares(lora_sizes, n, gpu)
        optimizer = owned * per_element
        grads = stage2_buffer * 4
    resident = params + adapters + grads + optimizer
    # sdpa keeps no score matrix only with a GPU's fused kernels (on CPU Paddle falls back to the math path)
    fused = cfg.model.attn_implementation == "sdpa" and gpu
    transient = _transient_bytes(mc, work, wb, cfg.train.recompute, cfg.grpo.beta != 0.0, scores=not fused)
    if mode == "stage3":
        # Weights gathered whole during the update: one decoder layer's split weights while backward passes it,
        # two with recompute (the recomputed forward gathers the layer again and keeps that copy as saved
        # tensors until the layer's backward is done). Measured: see docs/performance.md.
        shapes = parameter_shapes(mc)
        layer = max(sum(_numel(s) * wb for name, s in shapes.items()
                        if name.startswith(f"model.layers.{i}.") and _numel(s) > seg)
                    for i in range(mc.num_hidden_layers))
        transient += layer * (2 if cfg.train.recompute else 1)
    if mode == "stage2":
        # backward refills the other processes' gradient buffers (freed again once reduced to their owner)
        transient += (n - 1) * stage2_buffer * 4
    return {"params": params + adapters, "grads": grads, "optimizer": optimizer, "transient": transient,
            "peak": resident + transient}


def _stage2_shares(sizes, n: int, gpu: bool) -> tuple[int, int]:
    """Stage 2's split of the adapters (`GroupShardedOptimizerStage2`): each tensor in turn goes to the process
    that owns the fewest elements so far. Returns (elements the largest share owns: its AdamW state, elements
    of each process's gradient buffer: the largest share with every tensor padded to the alignment, at most
    Paddle's default bucket of 2**23; larger shares keep their rest as plain gradients, not counted here)."""
    owned, padded = [0] * n, [0] * n
    for k in sizes:
        r = owned.index(min(owned))
        owned[r] += k
        padded[r] += _aligned(k * 4, gpu) // 4
    return max(owned), min(max(padded), 2 ** 23)


def _on_gpu(gpu: bool | None) -> bool:
    if gpu is not None:
        return gpu
    import paddle

    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def _aligned(nbytes: int, gpu: bool) -> int:
    """Paddle's stage-3 buffer alignment: 256 bytes on a GPU, 4,096 on the CPU (emulation)."""
    a = 256 if gpu else 4096
    return int(math.ceil(nbytes / a) * a)


def _stage3_slice(numel: int, elem_bytes: int, n: int, gpu: bool) -> int:
    """Elements of one process's slice of a split parameter: Paddle pads each to the alignment and to a
    multiple of n, then gives each process 1/n."""
    padded = _aligned(numel * elem_bytes, gpu) // elem_bytes
    padded += (-padded) % n
    return padded // n


# Bytes autograd keeps per element in ppiad's decoder forward, per layer (fp32), measured on CPU
# (`bench/memory.py --coefficients`): Paddle's allocator growth over a teacher-forced policy forward
# (completion_logprobs, LoRA on q/v), least squares over 10 forwards (tiny and medium stand-ins x 5
# prompt/completion lengths), max error 0.07 %. They match the tensor
# inventory: e.g. 1.25 per attention element = one fp32 score + one bool mask entry; 2 per logit = the concat
# and the log-softmax input.
PER_HIDDEN, PER_INTERMEDIATE, PER_SCORE, PER_KV, PER_LOGIT = 13.6, 3.7, 1.25, 2.25, 2.0


def _layer_activations(mc, rows: int, tokens: int, keys: int, wb: int, scores: bool = True) -> float:
    """Bytes one decoder layer keeps for backward for `rows` x `tokens` queries over `keys` keys.
    scores=False: a fused attention kernel that keeps no score matrix (flash attention on a GPU)."""
    h, d = mc.hidden_size, mc.head_dim
    return (wb * (PER_HIDDEN * rows * tokens * h + PER_INTERMEDIATE * rows * tokens * mc.intermediate_size
                  + PER_KV * rows * mc.num_key_value_heads * keys * d)
            + (4 * PER_SCORE * rows * mc.num_attention_heads * tokens * keys if scores else 0))


def _transient_bytes(mc, w: Workload, wb: int, recompute: bool, reference: bool, scores: bool = True) -> int:
    """Bytes a step needs above the resident state: the largest of its phases (the update's policy forward
    + backward; the rollout's KV cache; the reference pass), plus the rollouts kept for the update.

    The update runs two passes: the B prompts once (P tokens) and the N = B*G completions on their repeated
    cache (C tokens over P + C keys). Without recompute every layer keeps its activations
    (`_layer_activations`) and the peak adds one fp32 copy of the largest attention-score tensor. With
    recompute each layer keeps its input and its KV cache, and backward holds one recomputed layer of each
    pass at a time (measured on CPU: within 3 % on the medium stand-in, conservative on the tiny one)."""
    b, n, p, c = w.prompts, w.prompts * w.generations, w.prompt_tokens, w.completion_tokens
    h, kv, d, L, V = mc.hidden_size, mc.num_key_value_heads, mc.head_dim, mc.num_hidden_layers, mc.vocab_size
    passes = ((b, p, p), (n, c, p + c))
    logits = PER_LOGIT * 4 * n * c * V
    if recompute:
        kept = sum(wb * (rows * t * h + PER_KV * rows * kv * s * d) for rows, t, s in passes) * L + logits
        update = kept + sum(_layer_activations(mc, *ps, wb, scores) for ps in passes)
    else:
        kept = L * sum(_layer_activations(mc, *ps, wb, scores) for ps in passes) + logits
        update = kept + (max(4 * rows * mc.num_attention_heads * t * s for rows, t, s in passes) if scores else 0)
    cache = 2 * L * n * kv * (p + c) * d * wb                       # generation's KV cache (all G samples)
    rollout = cache + 2 * cache / L + 3 * 4 * n * V                 # + one layer's concat copy + step logits
    ref = (3 * 4 * n * c * V + cache) if reference else 0           # no-grad logits, log-softmax, cache
    vc = mc.vision_config
    kept_rollouts = b * (w.image_patches * vc.in_chans * vc.temporal_patch_size * vc.patch_size ** 2 * 4
                         + w.image_patches // vc.spatial_merge_size ** 2 * h * wb) + 6 * 4 * n * c
    return int(max(update, rollout, ref) + kept_rollouts)


# ------------------------------------------------------------------------------------------------- measure
def _bytes(t) -> int:
    if t is None or not t._is_initialized():
        return 0
    return int(np.prod(t.shape)) * DTYPE_BYTES.get(str(t.dtype).replace("paddle.", ""), 4)


def _inner_optimizers(optimizer):
    seen, opt = [], optimizer
    while opt is not None and id(opt) not in {id(o) for o in seen}:
        seen.append(opt)
        opt = getattr(opt, "_inner_opt", None) or (getattr(opt, "_optim", None)
                                                   if getattr(opt, "_optim", None) is not opt else None)
    return seen


def measure(model, wrapped, optimizer) -> dict:
    """Bytes this process holds now in parameters, trainable-parameter gradients and optimizer state."""
    from ppiad.utils.distributed import unwrap

    core = unwrap(model)
    params = 0
    for p in core.parameters():
        if getattr(p, "status", None) == "part" and getattr(p, "fw_storage", None) is not None:
            params += _bytes(p.fw_storage)
        else:
            params += _bytes(p)
    storages = getattr(wrapped, "_grad_storages", None)   # stage 3 {dtype: storage}; stage 2 {dtype: {rank: ..}}
    if storages:
        flat = [s for v in storages.values() for s in (v.values() if isinstance(v, dict) else [v])]
        grads = sum(_bytes(s.buffer) for s in flat)
    else:
        grads = sum(_bytes(p.grad) for p in core.parameters() if not p.stop_gradient and p.grad is not None)
    opt_bytes, seen = 0, set()
    for opt in _inner_optimizers(optimizer):
        for per_param in getattr(opt, "_accumulators", {}).values():
            for t in per_param.values():
                if id(t) not in seen:
                    seen.add(id(t))
                    opt_bytes += _bytes(t) if int(np.prod(t.shape)) > 1 else 0   # beta-power scalars left out
        for t in getattr(opt, "_master_weights", {}).values():
            if id(t) not in seen:
                seen.add(id(t))
                opt_bytes += _bytes(t)
    return {"params": params, "grads": grads, "optimizer": opt_bytes}
