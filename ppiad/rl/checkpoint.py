"""Training checkpoints: everything needed to continue a run as if it had never stopped.

Layout (one directory per saved optimizer step; old ones are kept, delete them by hand if disk is short):

    <run_dir>/checkpoints/step_000100/
        adapter_model.safetensors   trainable (LoRA) tensors, loadable on their own for evaluation
        adapter_config.json         how the adapters were built (r, alpha, targets)
        optimizer.pdopt             AdamW moments (paddle.save), keys use structured parameter names
        optimizer_rank<k>.pdopt     instead of the above when the optimizer state is sharded (stage1+)
        trainer_state.json          step, data position, RNG state, LR scheduler, last metrics
        config.yaml                 the resolved config of the run
    <run_dir>/checkpoints/latest    name of the newest complete checkpoint directory

A checkpoint is written into a hidden temporary directory, fsynced, then renamed into place, and only then
does `latest` (itself written atomically) point at it: a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import paddle

from ppiad.utils.io import atomic_write_json, atomic_write_text

CHECKPOINTS = "checkpoints"
LATEST = "latest"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.pdopt"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """What `trainer_state.json` holds, plus the directory it came from."""
    step: int
    data_position: dict
    rng: dict
    lr_scheduler: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    world_size: int = 1
    sharded_optimizer: bool = False
    path: str = ""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _structured_optimizer_state(opt_state: Mapping, param_names: Mapping[str, str] | None, to_structured: bool):
    """Rename optimizer-state keys between Paddle's run-specific names (`linear_3.w_0_moment1_0`) and stable
    structured names (`model.layers.0.self_attn.q_proj.lora_A_moment1_0`), so a resumed process whose
    layers were numbered differently still finds its moments. The fp32 master weights of a bf16 run
    (`multi_precision`, under the "master_weights" key, one entry per parameter name) are renamed too, so a
    bf16 resume restores the exact masters instead of re-deriving them from the rounded bf16 weights."""
    if not param_names:
        return dict(opt_state)
    mapping = dict(param_names) if to_structured else {v: k for k, v in param_names.items()}
    prefixes = sorted(mapping, key=len, reverse=True)  # longest first: linear_1 must not match linear_10
    out = {}
    for key, value in opt_state.items():
        if key == "master_weights" and isinstance(value, Mapping):
            out[key] = {mapping.get(name, name): tensor for name, tensor in value.items()}
            continue
        new_key = key
        for prefix in prefixes:
            if key.startswith(prefix + "_"):
                new_key = mapping[prefix] + key[len(prefix):]
                break
        out[new_key] = value
    return out


def param_name_map(model: paddle.nn.Layer) -> dict:
    """Paddle's internal parameter name -> structured name (`visual.blocks.0...`), for every parameter."""
    return {p.name: name for name, p in model.named_parameters()}


def save_checkpoint(run_dir: str, step: int, *, trainable_state: Mapping[str, Any] | Callable[[str], None],
                    optimizer=None, lr_scheduler=None, rng: dict | None = None, data_position: dict | None = None,
                    config: Mapping | None = None, metrics: dict | None = None,
                    adapter_config: dict | None = None, param_names: Mapping[str, str] | None = None,
                    rank: int = 0, world_size: int = 1, sharded_optimizer: bool = False,
                    barrier: Callable[[], None] | None = None, base_model: str | None = None) -> str:
    """Write `<run_dir>/checkpoints/step_<step>/` atomically and point `latest` at it; returns its path.

    trainable_state: a name -> tensor/array mapping written as safetensors, or a callable that writes the
    adapter files into the directory it is given (e.g. `lambda d: save_adapter(model, d)`).
    With several processes every rank calls this; rank 0 writes everything except, when the optimizer
    state is sharded, each rank's own optimizer shard. `barrier` synchronises the ranks around the write.
    `base_model`: the base model's fingerprint (ppiad.utils.identity.model_fingerprint), recorded as
    `base_model_fingerprint` in trainer_state.json so loading the adapter onto another base can be flagged.
    """
    ckpt_root = os.path.join(run_dir, CHECKPOINTS)
    final = os.path.join(ckpt_root, step_dir_name(step))
    tmp = os.path.join(ckpt_root, f".tmp-{step_dir_name(step)}")
    sync = barrier or (lambda: None)

    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        if os.path.exists(tmp):  # left over from a crash during a previous save
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    sync()
    if optimizer is not None and (rank == 0 or sharded_optimizer):
        name = f"optimizer_rank{rank}.pdopt" if sharded_optimizer else OPTIMIZER
        state = _structured_optimizer_state(optimizer.state_dict(), param_names, to_structured=True)
        paddle.save(state, os.path.join(tmp, name))
    sync()
    if rank == 0:
        if callable(trainable_state):
            trainable_state(tmp)
        else:
            _write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), trainable_state)
        if adapter_config is not None:
            atomic_write_json(os.path.join(tmp, ADAPTER_CONFIG), adapter_config)
        state = {
            "step": int(step),
            "data_position": data_position or {},
            "rng": rng or {},
            "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else {},
            "metrics": metrics or {},
            "world_size": int(world_size),
            "sharded_optimizer": bool(sharded_optimizer),
        }
        if base_model:
            state["base_model_fingerprint"] = base_model
        atomic_write_json(os.path.join(tmp, TRAINER_STATE), state)
        if config is not None:
            from ppiad.config import Config, save_config
            save_config(config if isinstance(config, Config) else Config(config), os.path.join(tmp, CONFIG))
        _fsync_tree(tmp)
        if os.path.exists(final):  # saving the same step again (e.g. a resumed run stopped at once)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
        atomic_write_text(os.path.join(ckpt_root, LATEST), step_dir_name(step) + "\n")
    sync()
    return final


def _write_safetensors(path: str, tensors: Mapping[str, Any]) -> None:
    from safetensors.numpy import save_file

    arrays = {}
    for name, t in tensors.items():
        arr = t.numpy() if isinstance(t, paddle.Tensor) else np.asarray(t)
        arrays[name] = np.ascontiguousarray(arr)
    save_file(arrays, path, metadata={"format": "np"})


def read_adapter_tensors(ckpt_dir: str) -> dict:
    """The trainable tensors of a checkpoint as name -> numpy array."""
    from safetensors.numpy import load_file

    path = os.path.join(ckpt_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{ckpt_dir}' has no {ADAPTER_WEIGHTS}")
    return load_file(path)


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, TRAINER_STATE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str) -> str | None:
    """The newest complete checkpoint of a run (what `train.resume=auto` resumes), or None."""
    root = os.path.join(run_dir, CHECKPOINTS)
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if _STEP_DIR.match(name) and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            return path
    ckpts = list_checkpoints(run_dir)  # pointer missing or stale: fall back to the highest step
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str, *, optimizer=None, lr_scheduler=None, param_names: Mapping[str, str] | None = None,
                    restore_rng: bool = True, rank: int = 0, world_size: int = 1) -> TrainerState:
    """Read a checkpoint directory; restore the optimizer, LR scheduler and RNG state when given/asked.

    Adapter tensors are left to the caller (`load_adapter(model, path)` or `read_adapter_tensors`)."""
    state_file = os.path.join(path, TRAINER_STATE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"not a checkpoint directory (no {TRAINER_STATE}): '{path}'")
    with open(state_file, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{state_file}: not valid JSON: {exc}") from exc
    try:
        state = TrainerState(step=int(raw["step"]), data_position=raw.get("data_position", {}),
                             rng=raw.get("rng", {}), lr_scheduler=raw.get("lr_scheduler", {}),
                             metrics=raw.get("metrics", {}), world_size=int(raw.get("world_size", 1)),
                             sharded_optimizer=bool(raw.get("sharded_optimizer", False)), path=path)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{state_file}: missing or bad field: {exc}") from exc

    if optimizer is not None:
        if state.sharded_optimizer:
            if world_size != state.world_size:
                raise ValueError(f"checkpoint '{path}' holds optimizer state sharded over {state.world_size} "
                                 f"processes; resume with the same number of processes (now {world_size})")
            opt_file = os.path.join(path, f"optimizer_rank{rank}.pdopt")
        else:
            opt_file = os.path.join(path, OPTIMIZER)
        if not os.path.isfile(opt_file):
            raise FileNotFoundError(f"checkpoint '{path}' has no optimizer state file {os.path.basename(opt_file)}")
        opt_state = _structured_optimizer_state(paddle.load(opt_file), param_names, to_structured=False)
        optimizer.set_state_dict(opt_state)
    if lr_scheduler is not None and state.lr_scheduler:
        lr_scheduler.set_state_dict(state.lr_scheduler)
    if restore_rng and state.rng:
        from ppiad.utils.seed import set_rng_state
        set_rng_state(state.rng)
    return state
