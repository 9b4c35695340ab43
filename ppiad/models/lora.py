"""LoRA adapters (Hu et al. 2021) on the decoder's projections.

`apply_lora` swaps every matching `Linear` for a `LoRALinear` in place (sharing the frozen weight) and freezes
everything except `lora_A` / `lora_B`. ppiad keeps using the original model object afterwards: parameter names
stay those of the Hugging Face checkpoint (plus `.lora_A` / `.lora_B`), and `generate()` / the trainer need no
wrapper.

Why not paddleformers' `peft.LoRAModel` (used until issue 15): its `LoRALinear` is Paddle's nn.Linear with
the weight in [in, out], and ppiad's layers keep the checkpoint's [out, in] (ppiad.models.linear); its own
save/load also lost `lora_B` (docs/models.md). The layer below computes what it computed, with the same
initialisation scheme (A Kaiming-uniform with a = sqrt(5), B zeros) and the same parameter names; for one seed
A's values differ from paddleformers', which drew a throw-away weight first.

Adapter file layout (`save_adapter`): a directory with
- `adapter_model.safetensors`: for each adapted layer `<name>` (e.g. `model.layers.0.self_attn.q_proj`)
  the keys `base_model.model.<name>.lora_A.weight` [r, in] and `base_model.model.<name>.lora_B.weight`
  [out, r], float32, in torch orientation (the layout of Hugging Face PEFT adapters);
- `adapter_config.json`: PEFT's LoraConfig fields (`peft_type`, `task_type`, `r`, `lora_alpha`, `lora_dropout`,
  `target_modules`, `bias`, `fan_in_fan_out`); `target_modules` is a list of layer names, or, once a target is a
  regex, one regex string over full layer names, as PEFT reads it (`peft_target_modules`).
So `peft.PeftModel.from_pretrained(transformers_qwen2_vl, DIR)` loads a ppiad adapter as it is and computes the same
logits (tests/test_export.py). Adapters of earlier ppiad versions (a list mixing names and regexes, a `format`
key) still load here. The layer output is `W x + (alpha / r) * B A x`, as in PEFT.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import paddle
from paddle import nn

from ppiad.models.linear import Linear

from ppiad.utils.io import atomic_path, atomic_write_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_KEY_PREFIX = "base_model.model."


class LoRALinear(Linear):
    """`Linear` plus a low-rank update: y = x W^T + b + (alpha / r) * (dropout(x) A) B.

    Shapes: weight [out, in] and bias [out] are the replaced layer's own tensors (frozen); lora_A [in, r]
    (Kaiming-uniform, a = sqrt(5), as PEFT), lora_B [r, out] (zeros, so the output starts unchanged), both in the
    weight's dtype and trainable. Files store them transposed, as PEFT does (`save_adapter`).
    `disable_lora` switches the update off (the reference policy); `merge()` folds it into the weight.
    """

    def __init__(self, base: Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0):
        nn.Layer.__init__(self)
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"lora.r must be a positive int, got {r!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else None
        dtype = str(base.weight.dtype).replace("paddle.", "")
        self.lora_A = self.create_parameter(
            [self.in_features, r], dtype=dtype,
            default_initializer=nn.initializer.KaimingUniform(negative_slope=math.sqrt(5), nonlinearity="leaky_relu"))
        self.lora_B = self.create_parameter([r, self.out_features], dtype=dtype,
                                            default_initializer=nn.initializer.Constant(0.0))
        self.merged = False
        self.disable_lora = False
        self.train() if base.training else self.eval()  # the model's mode, as the layer it replaces

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = super().forward(x)
        if self.disable_lora or self.merged:
            return y
        h = x if self.lora_dropout is None else self.lora_dropout(x)
        return y + (h @ self.lora_A @ self.lora_B) * self.scaling

    def merge(self) -> None:
        """W += (alpha / r) (A B)^T, once."""
        if not self.merged:
            self.weight.set_value(self.weight + (self.lora_A @ self.lora_B * self.scaling).T)
            self.merged = True

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}"


def target_regexes(target_modules: Sequence[str]) -> list[str]:
    """Full-name regexes for the decoder projections named in `target_modules` (e.g. q_proj, v_proj).

    Anchored on `model.layers.<i>.self_attn.` / `.mlp.` so the vision tower (`visual.blocks.*.attn.qkv`)
    never matches.
    A target containing a dot is taken as a regex over full layer names instead, for stand-ins whose vision
    tower must adapt too (the demo's random tiny model adapts `visual.blocks.<i>.attn.qkv` and friends).
    """
    names = "|".join(re.escape(t) for t in target_modules if "." not in t)
    regexes = [rf"model\.layers\.\d+\.(self_attn|mlp)\.({names})"] if names else []
    return regexes + [t for t in target_modules if "." in t]


def lora_layers(model: paddle.nn.Layer) -> "OrderedDict[str, paddle.nn.Layer]":
    """Name -> LoRALinear for every adapted layer, in model order."""
    return OrderedDict((n, l) for n, l in model.named_sublayers() if isinstance(l, LoRALinear))


def apply_lora(model: paddle.nn.Layer, r: int, alpha: float, dropout: float,
               target_modules: Sequence[str] | str = ("q_proj", "v_proj")) -> paddle.nn.Layer:
    """Add LoRA adapters (B = 0, so the output is unchanged) and freeze all other weights. In place;
    returns `model` for convenience."""
    if isinstance(target_modules, str):  # PEFT's form: one regex over full layer names
        target_modules = [target_modules]
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"lora.r must be a positive int, got {r!r}")
    if not target_modules:
        raise ValueError("lora.target_modules is empty")
    regexes = target_regexes(target_modules)
    matched = [(n, l) for n, l in model.named_sublayers() if any(re.fullmatch(rx, n) for rx in regexes)]
    if not matched:
        raise ValueError(f"lora.target_modules {list(target_modules)} match no layer named "
                         f"model.layers.<i>.self_attn|mlp.<target> in {type(model).__name__}")
    wrong = [f"{n} ({type(l).__name__})" for n, l in matched if not isinstance(l, Linear)]
    if wrong:
        raise TypeError(f"lora.target_modules match layers that are not ppiad.models.linear.Linear: "
                        f"{_short(wrong)}")
    for name, layer in matched:
        parent = model
        *path, last = name.split(".")
        for part in path:
            parent = getattr(parent, part)
        setattr(parent, last, LoRALinear(layer, r, alpha, float(dropout)))
    for name, param in model.named_parameters():  # only the adapters train
        param.stop_gradient = not name.endswith((".lora_A", ".lora_B"))
    # Plain attribute (not a sublayer): what save_adapter writes into adapter_config.json.
    object.__setattr__(model, "_ppiad_lora", {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout),
                                              "target_modules": list(target_modules)})
    return model


def lora_parameters(model: paddle.nn.Layer) -> list:
    """The trainable adapter parameters (lora_A, lora_B of each layer), in model order."""
    params = []
    for layer in lora_layers(model).values():
        params += [layer.lora_A, layer.lora_B]
    return params


def lora_state_dict(model: paddle.nn.Layer) -> "OrderedDict[str, paddle.Tensor]":
    """`<layer>.lora_A` / `<layer>.lora_B` -> tensor in Paddle orientation ([in, r], [r, out])."""
    out = OrderedDict()
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A
        out[f"{name}.lora_B"] = layer.lora_B
    return out


@contextmanager
def adapters_disabled(model: paddle.nn.Layer) -> Iterator[paddle.nn.Layer]:
    """Within the block the model computes the base (reference) policy: same weights, adapters off.
    The previous state of each layer is restored on exit, also after an exception."""
    layers = lora_layers(model)
    if getattr(model, "_ppiad_lora_merged", False) or any(l.merged for l in layers.values()):
        raise RuntimeError("adapters_disabled: the adapters are merged into the weights; a merged model "
                           "cannot compute the reference policy")
    previous = {n: l.disable_lora for n, l in layers.items()}
    try:
        for layer in layers.values():
            layer.disable_lora = True
        yield model
    finally:
        for name, layer in layers.items():
            layer.disable_lora = previous[name]


def merge_adapter(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """Fold (alpha / r) * A B into each adapted weight and put plain nn.Linear layers back (inference speed;
    `save_pretrained` then writes a checkpoint of the base architecture). There is no reference policy
    afterwards: `adapters_disabled` refuses a merged model.

    Only into float32 weights (ValueError otherwise): in bf16 (8 significant bits) an update much smaller than
    the weight rounds away, e.g. about 40 % of the entries of a trained rank-4 update at |B| ~ 1e-3 on a
    7B-sized layer (tests/test_bf16.py). Evaluate a bf16 model with its adapters unmerged instead."""
    layers = lora_layers(model)
    low = sorted({str(layer.weight.dtype) for layer in layers.values() if layer.weight.dtype != paddle.float32})
    if low:
        raise ValueError(f"merge_adapter: the adapted weights are {', '.join(low)}, not float32; merging would "
                         f"round small updates away: keep the adapters unmerged")
    for name, layer in layers.items():
        layer.merge()
        parent = model
        *path, last = name.split(".")
        for part in path:
            parent = getattr(parent, part)
        plain = Linear.sharing(layer.weight, layer.bias)
        plain.training = layer.training
        setattr(parent, last, plain)
    object.__setattr__(model, "_ppiad_lora_merged", True)
    return model


def peft_target_modules(target_modules: Sequence[str] | str) -> list[str] | str:
    """`target_modules` as Hugging Face PEFT reads it: a list of plain names is matched by PEFT as name
    suffixes, exactly as `target_regexes` anchors them on the decoder; once a regex (a target with a dot) is
    involved, PEFT needs ONE regex string matched against full layer names, so every target becomes part of
    an alternation of the full-name regexes."""
    if isinstance(target_modules, str):
        return target_modules
    if all("." not in t for t in target_modules):
        return list(target_modules)
    if len(target_modules) == 1:
        return target_modules[0]
    return "|".join(f"(?:{rx})" for rx in target_regexes(target_modules))


def _config_of(model) -> dict:
    """adapter_config.json in Hugging Face PEFT's LoraConfig fields, so `PeftModel.from_pretrained` reads it."""
    layers = lora_layers(model)
    info = dict(getattr(model, "_ppiad_lora", {}))
    if not info:  # adapters added by other means: read what the layers know
        first = next(iter(layers.values()))
        info = {"r": first.r, "lora_alpha": first.lora_alpha, "lora_dropout": 0.0,
                "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers})}
    info["target_modules"] = peft_target_modules(info["target_modules"])
    return {"peft_type": "LORA", "task_type": None, **info, "bias": "none", "fan_in_fan_out": False}


def save_adapter(model: paddle.nn.Layer, directory: str) -> str:
    """Write adapter_model.safetensors + adapter_config.json into `directory` (each file atomically)."""
    from safetensors.numpy import save_file

    layers = lora_layers(model)
    if getattr(model, "_ppiad_lora_merged", False):
        raise RuntimeError("save_adapter: the adapters are merged into the weights; save before merge_adapter")
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA adapters (call apply_lora first)")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_KEY_PREFIX}{name}.lora_A.weight"] = _to_numpy(layer.lora_A).T.copy()
        tensors[f"{_KEY_PREFIX}{name}.lora_B.weight"] = _to_numpy(layer.lora_B).T.copy()
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:  # a NaN/inf adapter would silently turn every later answer into garbage
        raise FloatingPointError(f"save_adapter: not writing {directory}: {len(bad)} adapter tensor(s) hold NaN "
                                 f"or inf values: {_short(bad)}")
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, ADAPTER_WEIGHTS)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    atomic_write_json(os.path.join(directory, ADAPTER_CONFIG), _config_of(model))
    return directory


def _to_numpy(t: paddle.Tensor) -> np.ndarray:
    return t.detach().astype("float32").numpy()


def _resolve(path: str) -> tuple[str, str | None]:
    if os.path.basename(path) == "latest" and os.path.isfile(path):
        # A trainer's checkpoints/latest pointer: a one-line file naming the newest checkpoint directory.
        with open(path, encoding="utf-8") as f:
            path = os.path.join(os.path.dirname(path), f.read().strip())
    if os.path.isdir(path):
        weights = os.path.join(path, ADAPTER_WEIGHTS)
        config = os.path.join(path, ADAPTER_CONFIG)
    else:
        weights = path
        config = os.path.join(os.path.dirname(path), ADAPTER_CONFIG)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"LoRA adapter weights not found: '{weights}'")
    return weights, config if os.path.isfile(config) else None


def load_adapter(model: paddle.nn.Layer, path: str) -> paddle.nn.Layer:
    """Load adapter weights from a directory or a .safetensors file into `model`.

    If the model has no adapters yet they are added first, with r / alpha / targets from the adapter's
    config (dropout 0: loading is for evaluation or resuming; pass through apply_lora to train). A key
    mismatch raises an error listing the missing and unexpected names."""
    from safetensors.numpy import load_file

    weights, config_path = _resolve(path)
    cfg = None
    if config_path:
        with open(config_path, encoding="utf-8") as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"'{config_path}' is not valid JSON: {exc}") from exc
    if not lora_layers(model):
        if cfg is None:
            raise ValueError(f"'{path}': no {ADAPTER_CONFIG} beside the weights, and the model has no "
                             "adapters to load them into (call apply_lora first)")
        apply_lora(model, int(cfg["r"]), cfg["lora_alpha"], 0.0, cfg.get("target_modules", ["q_proj", "v_proj"]))
    layers = lora_layers(model)
    first = next(iter(layers.values()))
    if cfg is not None and (int(cfg["r"]) != first.r or float(cfg["lora_alpha"]) != float(first.lora_alpha)):
        raise ValueError(f"'{config_path}': adapter has r={cfg['r']}, lora_alpha={cfg['lora_alpha']} but the "
                         f"model's adapters have r={first.r}, lora_alpha={first.lora_alpha}")
    try:
        tensors = load_file(weights)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"'{weights}' is not a readable safetensors file: {exc}") from exc
    expected = {}
    for name, layer in layers.items():
        expected[f"{_KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A
        expected[f"{_KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"'{weights}' does not fit the model: missing keys {_short(missing)}, "
                         f"unexpected keys {_short(unexpected)}")
    for key, param in expected.items():
        value = tensors[key].T
        if list(value.shape) != list(param.shape):
            raise ValueError(f"'{weights}': {key} has shape {list(tensors[key].shape)}, the model expects "
                             f"{list(param.shape)[::-1]}")
        param.set_value(paddle.to_tensor(np.ascontiguousarray(value)).astype(param.dtype))
    return model


def _short(names: list[str], n: int = 4) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
