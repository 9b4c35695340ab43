"""Multi-process training with `python -m paddle.distributed.launch`: detection, init, data split, wrapping.

Sharding settings (`distributed.sharding`):
- none:   paddle.DataParallel when there is more than one process (gradients all-reduced in backward).
- stage1: fleet sharding stage 1, optimizer state split over the processes (hybrid_configs sharding_degree =
          world size). Works on CPU (gloo) and GPU.
- stage2: what Paddle's `group_sharded_parallel(level="os_g")` builds (`GroupShardedOptimizerStage2` +
          `GroupShardedStage2`): optimizer state and gradients sharded. Each trainable parameter has one owner
          process; backward reduces (sums) its gradient to the owner and frees it elsewhere, the owner updates it
          and broadcasts the new value. `combine_gradients` turns the owner's sum into the mean (and stops
          Paddle dividing by N again), `clip_grad_norm` sums the squares over the processes.
- stage3:   Paddle's `GroupShardedStage3`: every parameter with more than `distributed.stage3_segment_size`
          elements (the frozen base) is split over the processes; a layer's pre-forward hook all-gathers it and
          its post-forward hook frees it again. With LoRA the adapters are small and stay whole.
What each saves for LoRA training: the adapters, their gradients and AdamW state are a few MB, so stage 1/2
save next to nothing; only stage 3 cuts the dominant cost, the frozen base weights, to ~1/N per process.

Stage 3 rules ppiad follows (Paddle frees a gathered weight when its layer's call returns):
- every weight is used inside its own layer's call (or listed in that layer's `extra_parameters`);
- every forward runs collectives, so all processes must make the same forward calls: `generate` keeps
  stepping until all processes are done (`collective_forward` tells it to);
- `sync_comm=True`: the layer order differs between the vision tower, prefill and decode passes, so Paddle's
  prefetch of the "next" layer (from the first recorded order) would gather the wrong weights;
- backward gathers split weights again but Paddle frees only trainable ones: `release_gathered` frees the
  frozen ones after each optimizer step, so between steps a process holds ~1/N of the frozen base.

CPU emulation (tests only): with `PPIAD_EMULATE_SHARDING_ON_CPU=1` stages 2 and 3 run on CPU with gloo. The
only changes are Paddle's device checks, bypassed here for the duration of the constructor calls: stage 3's
"CUDA / XPU only" assertion; for stage 2 the same assertion in `GroupShardedOptimizerStage2`, its device id
read from `paddle.get_device()` ("cpu" has no ":<id>"), and the move of its parameter buffer to the GPU
(`ParamStorage.add_rank_params(convert_gpu=False)`: the path Paddle takes for buffers that stay on the CPU).
`group_sharded_parallel`'s own device assertion is avoided by building the two classes it builds, with its
defaults, directly. It proves the logic (hooks, reductions, gathers, collectives, memory), not GPU behaviour.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import paddle

T = TypeVar("T")
SHARDING_CHOICES = ("none", "stage1", "stage2", "stage3")
EMULATE_ENV = "PPIAD_EMULATE_SHARDING_ON_CPU"
DEFAULT_SEGMENT_SIZE = 2 ** 20


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    sharding: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world() -> tuple[int, int]:
    """(rank, world size) from the environment `paddle.distributed.launch` sets; (0, 1) when run directly."""
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1)
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)
    return rank, world


def _has_accelerator() -> bool:
    gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    return gpu or paddle.is_compiled_with_xpu()


def emulating() -> bool:
    """True when `PPIAD_EMULATE_SHARDING_ON_CPU=1` asks for stage 2/3 on CPU (tests only) and there is no GPU."""
    return os.environ.get(EMULATE_ENV, "") == "1" and not _has_accelerator()


def _check_device(sharding: str) -> None:
    if sharding in ("stage2", "stage3") and not _has_accelerator() and not emulating():
        raise RuntimeError(f"sharding {sharding} needs GPUs; use stage1 or none on CPU "
                           f"({EMULATE_ENV}=1 emulates stage2/stage3 on CPU for tests)")


def init(sharding: str = "none") -> DistEnv:
    """Initialise the process group when launched with several processes; a no-op for a single process."""
    if sharding not in SHARDING_CHOICES:
        raise ValueError(f"distributed.sharding must be one of {', '.join(SHARDING_CHOICES)}, got {sharding!r}")
    rank, world = launched_world()
    if world <= 1:
        return DistEnv(0, 1, sharding)
    _check_device(sharding)
    if sharding == "stage1":
        from paddle.distributed import fleet
        strategy = fleet.DistributedStrategy()
        strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": world}
        fleet.init(is_collective=True, strategy=strategy)
    else:
        paddle.distributed.init_parallel_env()
    return DistEnv(paddle.distributed.get_rank(), paddle.distributed.get_world_size(), sharding)


def shard_samples(samples: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share: every world_size-th item from `rank` on, the tail dropped so all ranks get the same
    count (unequal counts would leave one rank waiting forever in a collective)."""
    if world_size <= 1:
        return list(samples)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    usable = len(samples) - len(samples) % world_size
    return list(samples[rank:usable:world_size])


def wrap(model: paddle.nn.Layer, optimizer, env: DistEnv, segment_size: int = DEFAULT_SEGMENT_SIZE):
    """Return (model, optimizer) prepared for `env`; unchanged for a single process.

    The returned model may be a wrapper: use `unwrap(model)` for anything but the training forward pass.
    `segment_size` (stage 3): parameters with more elements than this are split over the processes; trainable
    parameters must stay below it (ppiad keeps the adapters whole; ValueError otherwise). The optimizer must
    not carry a `grad_clip`: ppiad clips itself (`clip_grad_norm`), after the gradients are combined."""
    if not env.enabled:
        return model, optimizer
    if getattr(optimizer, "_grad_clip", None) is not None:
        raise ValueError("distributed.wrap: pass an optimizer without grad_clip; clip with clip_grad_norm after "
                         "combine_gradients (Paddle's sharding wrappers clip per rank or per parameter group)")
    if env.sharding == "none":
        return paddle.DataParallel(model, find_unused_parameters=False), optimizer
    if env.sharding == "stage1":
        from paddle.distributed import fleet
        return fleet.distributed_model(model), fleet.distributed_optimizer(optimizer)
    _check_device(env.sharding)
    if env.sharding == "stage2":
        return _wrap_stage2(model, optimizer)
    return _wrap_stage3(model, optimizer, segment_size)


def _wrap_stage2(model: paddle.nn.Layer, optimizer):
    """What `group_sharded_parallel(model, optimizer, level="os_g")` builds, with its defaults (8 MB gradient
    buckets, no offload), on this process's device."""
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_optimizer_stage2 as s2opt
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_stage2 as s2
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_storage as storage

    device = paddle.get_device().split(":")[0]
    patches = contextlib.ExitStack()
    if emulating():  # Paddle's device checks in the two constructors, bypassed for their duration (see top)
        from unittest import mock
        patches.enter_context(mock.patch.object(s2opt.core, "is_compiled_with_cuda", lambda: True))
        patches.enter_context(mock.patch.object(s2opt.paddle, "get_device", lambda: "cpu:0"))
        to_cpu = functools.partialmethod(storage.ParamStorage.add_rank_params, convert_gpu=False)
        patches.enter_context(mock.patch.object(storage.ParamStorage, "add_rank_params", to_cpu))
    with patches:
        optimizer = s2opt.GroupShardedOptimizerStage2(params=optimizer._parameter_list, optim=optimizer,
                                                      device=device)
        wrapped = s2.GroupShardedStage2(model, optimizer, device=device)
    return wrapped, optimizer


def _stage2_owned(wrapped, params: Sequence) -> list:
    """The parameters of `params` whose gradient and update this process owns under stage 2."""
    owner = wrapped._sharding_optimizers[0].param2rank
    return [p for p in params if owner[p.name] == wrapped._rank]


def _wrap_stage3(model: paddle.nn.Layer, optimizer, segment_size: int):
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_stage3 as s3

    if segment_size < 1:
        raise ValueError(f"distributed.stage3_segment_size must be >= 1, got {segment_size}")
    too_big = [p.name for p in model.parameters() if not p.stop_gradient and p._numel() > segment_size]
    if too_big:
        raise ValueError(f"distributed.stage3_segment_size={segment_size} is smaller than trainable parameter(s) "
                         f"{', '.join(too_big[:3])}: ppiad keeps the adapters whole under stage 3; raise it")
    device = paddle.get_device().split(":")[0]
    patch = contextlib.nullcontext()
    if emulating():  # the only change emulation makes: Paddle's "CUDA / XPU only" assertion is bypassed
        from unittest import mock
        patch = mock.patch.object(s3.core, "is_compiled_with_cuda", lambda: True)
    with patch:
        wrapped = s3.GroupShardedStage3(model, optimizer=optimizer, segment_size=segment_size, sync_comm=True,
                                        device=device)
    for layer in model.sublayers(include_self=True):
        object.__setattr__(layer, "_ppiad_collective_forward", True)
    _release_frozen_after_backward(wrapped, model)
    return wrapped, optimizer


def _release_frozen_after_backward(wrapped, model: paddle.nn.Layer) -> None:
    """Backward gathers a layer's split weights again (Paddle's post-forward PyLayer) but frees only trainable
    ones, so a LoRA base would be gathered whole layer by layer until the step ends. A gradient hook on each
    input of such a layer frees its frozen split weights as soon as backward has passed through the layer
    (the input's gradient is complete); `release_gathered` after the step catches layers whose inputs need no
    gradient."""
    def hook_for(params):
        def release(_grad):
            _release(wrapped, params)
        return release

    def pre_hook(layer, inputs):
        if not paddle.is_grad_enabled():
            return None
        params = [p for p in wrapped._trainable_params.get(id(layer), []) if p.stop_gradient]
        for x in inputs:
            if isinstance(x, paddle.Tensor) and not x.stop_gradient:
                x.register_hook(hook_for(params))
        return None

    for layer in model.sublayers(include_self=True):
        if any(p.stop_gradient for p in wrapped._trainable_params.get(id(layer), [])):
            layer.register_forward_pre_hook(pre_hook)


def collective_forward(model) -> bool:
    """True when every forward of `model` runs collectives (stage 3): all processes must then make the same
    forward calls, e.g. keep decoding until every process is done."""
    return bool(getattr(unwrap(model), "_ppiad_collective_forward", False))


def split_parameters(model: paddle.nn.Layer) -> list:
    """The parameters stage 3 split over the processes (empty otherwise)."""
    return [p for p in unwrap(model).parameters() if getattr(p, "status", None) in ("part", "all")
            and hasattr(p, "fw_storage")]


def resident_split_parameters(model: paddle.nn.Layer) -> list:
    """Split parameters currently held whole (gathered) by this process."""
    return [p for p in split_parameters(model) if p.status == "all"]


@paddle.no_grad()
def release_gathered(wrapped) -> int:
    """Free every split parameter that stage 3 gathered and did not free again (backward gathers each layer's
    weights, but Paddle's hook frees only trainable ones, so a LoRA base would stay whole). Keeps this
    process's slice, as Paddle's own post-forward hook does. Returns the number released; 0 without stage 3."""
    from paddle.distributed.fleet.meta_parallel.sharding import group_sharded_stage3 as s3

    if not isinstance(wrapped, s3.GroupShardedStage3):
        return 0
    released = _release(wrapped, split_parameters(wrapped))
    full = wrapped._task_flow.full_param
    for name in list(full):  # buffers prefetched for parameters that were never used
        del full[name]
    return released


@paddle.no_grad()
def _release(wrapped, params) -> int:
    """Back to this process's slice for every gathered parameter of `params` (as Paddle's post-forward hook)."""
    full = wrapped._task_flow.full_param
    released = 0
    for p in params:
        if p.status != "all":
            continue
        if p.name not in full:
            raise RuntimeError(f"stage 3: parameter {p.name} is gathered but its full buffer is unknown")
        start, end = wrapped._param2buffer[p.name][wrapped._rank]
        p._clear_data()
        p.fw_storage = full[p.name][0]._slice(start, end).detach().clone()
        p.status, p.use_count = "part", 0
        del full[p.name]
        released += 1
    return released


@paddle.no_grad()
def combine_gradients(params: Sequence, env: DistEnv, wrapped=None) -> list:
    """Average the gradients of `params` over the processes before they are clipped, so that the clip and the
    logged norm see the combined gradient. Returns the parameters whose combined gradient this process holds:
    all of `params`, except under stage 2 (pass the stage-2 wrapper as `wrapped`), where backward already
    summed each gradient on the one process that owns the parameter: there each owner divides its sums by N
    and Paddle's step is told not to divide again; the other processes hold none of them.
    Data parallel already averaged in backward. Under stage 1 / 3 the wrapper's own reduction in
    `optimizer.step()` then averages equal values (no change)."""
    if not env.enabled or env.sharding == "none":
        return list(params)
    if env.sharding == "stage2":
        if not hasattr(wrapped, "_sharding_optimizers"):
            raise ValueError("combine_gradients under sharding stage2 needs the stage-2 wrapper (wrapped=...)")
        owned = _stage2_owned(wrapped, params)
        for p in owned:
            if p.grad is None:
                p.grad = paddle.zeros_like(p)
            p.grad.scale_(1.0 / env.world_size)
        wrapped.scale_in_opt = False   # else GroupShardedStage2's step scales the gradients by 1/N once more
        return owned
    for p in params:
        g = p.grad
        if g is None:
            g = paddle.zeros_like(p)
            p.grad = g
        paddle.distributed.all_reduce(g)
        g.scale_(1.0 / env.world_size)
    return list(params)


@paddle.no_grad()
def clip_grad_norm(params: Sequence, max_norm: float, env: DistEnv | None = None) -> float:
    """Clip the gradients of `params` together to global L2 norm `max_norm` (0 = no clipping) and return the
    norm before clipping (float, over all of them: one global norm also across LoRA+ parameter groups).
    Scale factor max_norm / max(norm, max_norm), as Paddle's ClipGradByGlobalNorm. Call after
    `combine_gradients`, with the parameters it returns; under stage 2 (`env`) each process holds a disjoint
    share of the gradients and the squared norms are summed over the processes (every process must call)."""
    grads = [p.grad for p in params if p.grad is not None]
    split = env is not None and env.enabled and env.sharding == "stage2"
    if not grads and not split:
        return 0.0
    sq = paddle.add_n([(g.astype("float32") ** 2).sum() for g in grads]) if grads else paddle.zeros([])
    if split:
        paddle.distributed.all_reduce(sq)
    norm = float(paddle.sqrt(sq))
    if max_norm > 0 and norm > max_norm and math.isfinite(norm):
        scale = max_norm / norm
        for g in grads:
            g.scale_(scale)
    return norm


def unwrap(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """The user's layer inside DataParallel / fleet / group-sharded wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_layers", None) or getattr(model, "_layer", None)
        if inner is None or not isinstance(inner, paddle.nn.Layer):
            break
        model = inner
    return model


def barrier(env: DistEnv) -> None:
    if env.enabled:
        paddle.distributed.barrier()


def all_reduce_mean(values: dict, env: DistEnv) -> dict:
    """Average float scalars over the ranks (for logging), one collective for the whole dict."""
    if not env.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = paddle.to_tensor([float(values[k]) for k in keys], dtype="float64")
    paddle.distributed.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.numpy().tolist())}
