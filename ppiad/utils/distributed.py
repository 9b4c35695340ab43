"""Multi-process training with `python -m paddle.distributed.launch`: detection, init, data split, wrapping.

Sharding settings (`distributed.sharding`):
- none:   paddle.DataParallel when there is more than one process (gradients all-reduced in backward).
- stage1: fleet sharding stage 1, optimizer state split over the processes (hybrid_configs sharding_degree =
          world size). Works on CPU (gloo) and GPU.
- stage2/stage3: `group_sharded_parallel(level="os_g" | "p_g_os")`: gradients (and parameters) sharded too.
          Paddle implements these for GPU/XPU only; they are untested here (no GPU) and refused on CPU.
With LoRA the trainable state is tiny, so `none` or `stage1` is what a CPU or small-GPU run wants; stage2/3
matter only for full fine-tuning of a large model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import paddle

T = TypeVar("T")
SHARDING_CHOICES = ("none", "stage1", "stage2", "stage3")


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


def init(sharding: str = "none") -> DistEnv:
    """Initialise the process group when launched with several processes; a no-op for a single process."""
    if sharding not in SHARDING_CHOICES:
        raise ValueError(f"distributed.sharding must be one of {', '.join(SHARDING_CHOICES)}, got {sharding!r}")
    rank, world = launched_world()
    if world <= 1:
        return DistEnv(0, 1, sharding)
    if sharding in ("stage2", "stage3") and not _has_accelerator():
        raise RuntimeError(f"sharding {sharding} needs GPUs; use stage1 or none on CPU")
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


def wrap(model: paddle.nn.Layer, optimizer, env: DistEnv):
    """Return (model, optimizer) prepared for `env`; unchanged for a single process.

    The returned model may be a wrapper: use `unwrap(model)` for anything but the training forward pass."""
    if not env.enabled:
        return model, optimizer
    if env.sharding == "none":
        return paddle.DataParallel(model, find_unused_parameters=False), optimizer
    if env.sharding == "stage1":
        from paddle.distributed import fleet
        return fleet.distributed_model(model), fleet.distributed_optimizer(optimizer)
    if not _has_accelerator():
        raise RuntimeError(f"sharding {env.sharding} needs GPUs; use stage1 or none on CPU")
    # Untested here (no GPU on the development machines); follows Paddle's documented API.
    from paddle.distributed.sharding import group_sharded_parallel
    level = "os_g" if env.sharding == "stage2" else "p_g_os"
    model, optimizer, _ = group_sharded_parallel(model, optimizer, level=level)
    return model, optimizer


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
