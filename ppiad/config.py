"""Configuration: one typed schema, YAML files on top of it, `-o key.sub=value` overrides on top of those.

The schema below is the single source of truth. Every tool loads its config through `load_config`, so an
unknown key or a value of the wrong type stops every tool the same way, with the key and the valid choices
in the message. `docs/configuration.md` is generated from this schema (`python -m ppiad.config --markdown`)
and a test keeps it current.
"""
from __future__ import annotations

import copy
import difflib
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


@dataclass(frozen=True)
class Field:
    default: Any
    type: type  # one of: str, int, float, bool, list, dict
    help: str
    choices: tuple | None = None
    item_type: type | None = None  # element type of a list
    min: float | None = None    # inclusive lower bound of a number
    max: float | None = None    # inclusive upper bound
    above: float | None = None  # exclusive lower bound
    below: float | None = None  # exclusive upper bound

    def range_text(self) -> str:
        """The allowed range as text, e.g. '>= 1' or '>= 0 and < 1'; '' when unbounded."""
        parts = [f"{op} {v:g}" for op, v in ((">=", self.min), (">", self.above), ("<=", self.max),
                                                  ("<", self.below)) if v is not None]
        return " and ".join(parts)

    def in_range(self, value) -> bool:
        return ((self.min is None or value >= self.min) and (self.above is None or value > self.above)
                and (self.max is None or value <= self.max) and (self.below is None or value < self.below))


DATASET_CHOICES = ("mvtec", "visa", "folder")
SPLIT_CHOICES = ("all", "train", "test")


def _partition(dataset: str, help_prefix: str) -> dict:
    return {
        "dataset": Field(dataset, str, f"{help_prefix}: dataset layout", DATASET_CHOICES),
        "root": Field("", str, f"{help_prefix}: dataset root directory (required by the tools that use it)"),
        "split": Field("all", str, f"{help_prefix}: partition of the dataset", SPLIT_CHOICES),
        "categories": Field([], list, f"{help_prefix}: categories to keep (empty = all)", item_type=str),
        "missing_files": Field("keep", str, f"{help_prefix}: index rows whose image is missing on disk (VisA): "
                               "keep = listed and reported unreadable, drop = left out, error = stop",
                               ("keep", "drop", "error")),
        "bit_depth": Field("auto", str, f"{help_prefix}: bits of data in 16-bit image files without a PNG sBIT "
                           "chunk (industrial cameras write 10/12-bit data in 16-bit files); auto = 16",
                           ("auto", "8", "10", "12", "14", "16")),
        "normal_dirs": Field(["good"], list, f"{help_prefix}: folder datasets: sub-directories of a category "
                             "that hold normal images", item_type=str),
        "exclude_dirs": Field([], list, f"{help_prefix}: folder datasets: sub-directories of a category to skip "
                              "(mask folders such as ground_truth are skipped anyway)", item_type=str),
        "reference_root": Field("", str, f"{help_prefix}: k-shot prompts (prompt.reference_images > 0): folder of "
                                "normal reference images, <reference_root>/<category>/*.png; empty = the "
                                "training partition's normal images of the category"),
    }


SCHEMA: dict = {
    "run_name": Field("run", str, "name of the run; outputs go to <output_dir>/<run_name>"),
    "output_dir": Field("output", str, "parent directory of all run outputs"),
    "seed": Field(42, int, "global random seed"),
    "data": {
        "train": _partition("mvtec", "training data"),
        "eval": _partition("visa", "evaluation data"),
        "val": _partition("visa", "validation data evaluated during training (train.eval_every); empty root = "
                          "data.eval"),
        "object_names": Field({}, dict, "category -> object name used in the prompt "
                              "(default: the category name with underscores as spaces)"),
        "num_workers": Field(0, int, "image-loading worker threads (0 = load in the main thread)", min=0),
        "allow_overlap": Field(False, bool, "let training / evaluation run although the training and evaluation "
                               "images (or the references) share files of identical content (leakage guard)"),
    },
    "prompt": {
        "reference_images": Field(0, int, "k-shot: normal images of the same category put before the query image "
                                  "(0 = LR-IAD's one-image prompt; docs/method.md)", min=0),
    },
    "model": {
        "path": Field("", str, "local Hugging Face-format Qwen2-VL or Qwen2.5-VL checkpoint directory (required; "
                              "config.json's model_type picks the class)"),
        "dtype": Field("float32", str, "weight / compute dtype; bfloat16 needs a GPU", ("float32", "bfloat16")),
        "attn_implementation": Field("eager", str, "decoder attention: eager (matmul + softmax) or sdpa (Paddle's "
                                     "scaled_dot_product_attention: flash / memory-efficient kernels on GPU in "
                                     "bf16, untested here; a math fallback on CPU)", ("eager", "sdpa")),
        "allow_pickle": Field(False, bool, "allow loading pickle-based .pdparams weights (unpickling runs code)"),
        "min_pixels": Field(3136, int, "minimum image size in pixels after smart resize", min=1),
        "max_pixels": Field(401408, int, "maximum image size in pixels after smart resize (401,408 = paper)", min=1),
        "max_prompt_length": Field(1024, int, "maximum prompt length in tokens (image tokens included)", min=1),
        "adapter": Field("", str, "LoRA adapter checkpoint (directory or .safetensors) to load; empty = none"),
    },
    "lora": {
        "enabled": Field(True, bool, "train LoRA adapters (the base model stays frozen)"),
        "r": Field(4, int, "LoRA rank", min=1),
        "alpha": Field(16, int, "LoRA alpha (scaling = alpha / r)", min=1),
        "plus_ratio": Field(1.0, float, "LoRA+: lora_B's learning rate = this x train.learning_rate, lora_A's = "
                            "train.learning_rate (Hayou et al. 2024 use 16 with Adam); 1 = plain LoRA", above=0),
        "dropout": Field(0.1, float, "LoRA dropout", min=0, below=1),
        "target_modules": Field(["q_proj", "v_proj"], list, "decoder projections that get adapters",
                                item_type=str),
    },
    "rewards": {
        "format_weight": Field(1.0, float, "weight of the format reward (0 = off)", min=0),
        "accuracy_weight": Field(0.0, float, "weight of the plain 0/1 accuracy reward (0 = off)", min=0),
        "focal_weight": Field(1.0, float, "weight of the focal reward (0 = off)", min=0),
        "focal": {
            "alpha": Field(1.0, float, "focal reward scale alpha", min=0),
            "gamma": Field(2.0, float, "focal exponent gamma: larger focuses harder on hard samples", min=0),
            "p_source": Field("group", str, "where p (probability of the correct answer) comes from",
                              ("group", "token")),
            "class_factors": Field("auto", str, "per-class factor f: auto = inverse training frequency "
                                   "normalised to mean 1; sqrt_inverse = its square root, normalised to mean 1; "
                                   "uniform = 1; manual = factor_defect/factor_normal",
                                   ("auto", "sqrt_inverse", "uniform", "manual")),
            "factor_defect": Field(1.0, float, "f for the defect class when class_factors = manual", min=0),
            "factor_normal": Field(1.0, float, "f for the normal class when class_factors = manual", min=0),
            "mode": Field("advantage_weight", str, "reward = focal reward added to the reward before group "
                          "normalisation (paper-literal; std normalisation cancels f and gamma); "
                          "advantage_weight = correctness in the reward, alpha*f*(2(1-p))^gamma scales each "
                          "sample's advantage after normalisation (docs/method.md)",
                          ("reward", "advantage_weight")),
        },
    },
    "grpo": {
        "num_generations": Field(4, int, "completions sampled per prompt (G)", min=2),
        "beta": Field(0.04, float, "KL coefficient to the adapter-free reference policy; 0 skips the reference "
                      "pass (no KL term, none logged)", min=0),
        "epsilon": Field(0.2, float, "clipping range of the probability ratio"),
        "num_iterations": Field(1, int, "policy updates per rollout batch", min=1),
        "scale_rewards": Field("auto", str, "divisor of the group-centred rewards: group = the group's std "
                               "(the paper's), batch = the std of all rewards of the optimizer step, none = no "
                               "division (Dr. GRPO); auto = none with loss_type dr_grpo, else group",
                               ("auto", "group", "batch", "none")),
        "std_eps": Field(1e-4, float, "epsilon added to the group std", min=0),
        "loss_type": Field("bnpo", str, "reduction over completion tokens: bnpo = sum over all completion tokens "
                           "of the step / their number (DAPO; TRL's default); grpo = mean per completion, then mean "
                           "(original GRPO); dr_grpo = sum / (completions x max_new_tokens) (Dr. GRPO)",
                           ("grpo", "bnpo", "dr_grpo")),
        "epsilon_high": Field(-1.0, float, "upper clipping range of the ratio, 1 + epsilon_high (DAPO's clip-higher, "
                              "e.g. 0.28); -1 = grpo.epsilon"),
        "mask_truncated_completions": Field(False, bool, "completions that reach max_new_tokens without a stop "
                                            "token add no loss (DAPO's overlong filtering)"),
        "dynamic_sampling": Field(False, bool, "drop groups whose rewards are all equal (no signal) and draw further "
                                  "prompts from the data stream until the step has its batch of informative groups "
                                  "(DAPO)"),
        "max_resample_factor": Field(3, int, "dynamic sampling: at most this many times the step's prompts are "
                                     "drawn; a step that still lacks informative groups trains on those it has", min=1),
        "temperature": Field(1.0, float, "rollout sampling temperature"),
        "top_p": Field(1.0, float, "rollout nucleus sampling threshold"),
        "top_k": Field(0, int, "rollout top-k (0 = off)"),
        "min_p": Field(0.0, float, "rollout min-p: drop tokens below min_p x the top token's probability "
                                   "(0 = off)"),
        "max_new_tokens": Field(256, int, "maximum completion length in rollouts", min=1),
    },
    "train": {
        "epochs": Field(1, int, "passes over the training partition", min=0),
        "max_steps": Field(-1, int, "stop after this many optimizer steps (-1 = epochs decide)", min=-1),
        "prompts_per_device": Field(1, int, "prompts per device per micro-step", min=1),
        "grad_accum_steps": Field(2, int, "micro-steps per optimizer step", min=1),
        "learning_rate": Field(1e-5, float, "peak learning rate of AdamW", min=0),
        "weight_decay": Field(0.0, float, "AdamW weight decay", min=0),
        "adam_beta1": Field(0.9, float, "AdamW decay rate of the gradient average", min=0, below=1),
        "adam_beta2": Field(0.999, float, "AdamW decay rate of the squared-gradient average: lower = the step size "
                                          "follows the recent gradient scale sooner", min=0, below=1),
        "adam_epsilon": Field(1e-8, float, "AdamW epsilon", above=0),
        "warmup_ratio": Field(0.0, float, "share of steps with linear warm-up", min=0, max=1),
        "lr_schedule": Field("constant", str, "learning-rate schedule after warm-up",
                             ("constant", "linear", "cosine")),
        "recompute": Field(False, bool, "recompute each decoder layer's activations in backward instead of "
                           "keeping them (less activation memory, ~1/3 more compute)"),
        "max_grad_norm": Field(1.0, float, "global gradient-norm clip (0 = off)", min=0),
        "max_bad_steps": Field(5, int, "a step whose loss or gradient is NaN/inf is skipped (no update, counted "
                                       "in train/skipped_steps); this many in a row stop training (>= 1)", min=1),
        "save_every": Field(100, int, "checkpoint every N optimizer steps", min=1),
        "log_every": Field(1, int, "log scalars every N optimizer steps", min=1),
        "resume": Field("", str, "checkpoint directory to resume from, or 'auto' for the latest of this run"),
        "eval_every": Field(0, int, "evaluate on held-out images every N optimizer steps (greedy, ppiad.eval; "
                            "VisualDL eval/*); 0 = off", min=0),
        "eval_images": Field(60, int, "held-out images of those evaluations: a fixed class-stratified subset of "
                             "data.val (when its root is set) or data.eval; -1 = all", min=-1),
        "save_best": Field(False, bool, "keep the checkpoint with the best train.save_best_metric in "
                           "<run>/checkpoints/best (needs train.eval_every)"),
        "save_best_metric": Field("f1_macro", str, "metric that picks the best checkpoint (higher is better; "
                                  "false_alarm_rate and invalid_rate: lower)",
                                  ("f1_macro", "auroc", "accuracy", "balanced_accuracy", "false_alarm_rate",
                                   "invalid_rate")),
        "log_samples_every": Field(0, int, "every N steps the first prompt's rollouts (image, object, completions, "
                                   "rewards, advantages) go to VisualDL as text and image; 0 = off", min=0),
    },
    "runtime": {
        "cpu_threads": Field(0, int, "CPU threads of Paddle's math library (MKL/OpenMP) per process; 0 = "
                             "OMP_NUM_THREADS if set, else the physical cores divided among the processes of a "
                             "paddle.distributed.launch run on this machine"),
    },
    "distributed": {
        "sharding": Field("none", str, "parameter/optimizer sharding; stage2/stage3 need GPUs (they run on CPU "
                          "only as a test emulation, PPIAD_EMULATE_SHARDING_ON_CPU=1)",
                          ("none", "stage1", "stage2", "stage3")),
        "stage3_segment_size": Field(2 ** 20, int, "stage3: parameters with more elements than this are split over "
                                     "the processes (Paddle's segment_size); the LoRA adapters must stay below it",
                                     min=1),
    },
    "eval": {
        "batch_size": Field(8, int, "images per generation batch", min=1),
        "max_new_tokens": Field(256, int, "maximum completion length", min=1),
        "do_sample": Field(False, bool, "sample instead of greedy decoding"),
        "temperature": Field(1.0, float, "sampling temperature when do_sample"),
        "calibrate": Field(False, bool, "also report figures at a P(A) threshold meeting target_fpr"),
        "target_fpr": Field(0.05, float, "target false-alarm rate on normal images for calibration", min=0, max=1),
        "max_images": Field(-1, int, "evaluate at most this many images (-1 = all)", min=-1),
        "threshold": Field(-1.0, float, "fixed P(A) threshold: verdict defect when P(A) >= threshold (e.g. the "
                           "'calibrated.threshold' of an eval on held-out normals); -1 = the model's A/B answer"),
    },
    "demo": {
        "train_images": Field(1000, int, "synthetic training images the demo generates (at data.train.root)", min=1),
        "test_images": Field(300, int, "held-out synthetic images, another seed (at data.eval.root)", min=1),
        "defect_ratio": Field(0.11, float, "share of defect images in both synthetic trees (VisA-like)", min=0, max=1),
        "categories": Field([], list, "synthetic categories to generate (empty = all five: fabric, wood, "
                            "metal_plate, washer, pill)", item_type=str),
        "image_size": Field(112, int, "side of the synthetic images in pixels", min=1),
        "hidden_size": Field(128, int, "tiny stand-in: decoder hidden size", min=1),
        "layers": Field(4, int, "tiny stand-in: decoder layers", min=1),
        "vision_embed_dim": Field(64, int, "tiny stand-in: vision tower width", min=1),
        "warmstart_steps": Field(120, int, "format-only supervised warm-start steps", min=0),
        "warmstart_batch_size": Field(8, int, "images per warm-start step", min=1),
        "warmstart_lr": Field(2e-3, float, "warm-start learning rate (all weights of the tiny model)", min=0),
        "infer_images": Field(4, int, "held-out images the demo inspects with tools/infer.py --save_vis", min=0),
    },
}


class Config(dict):
    """A nested dict with attribute access: cfg.model.path == cfg["model"]["path"]."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def to_dict(self) -> dict:
        return {k: (v.to_dict() if isinstance(v, Config) else copy.deepcopy(v)) for k, v in self.items()}

    def get_path(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node


def defaults(schema: dict = SCHEMA) -> Config:
    return Config({k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default) for k, v in schema.items()})


# keys that were renamed: using the old one stops with the new one's name and how the values map
RENAMED = {
    "grpo.loss_averaging": "grpo.loss_type (token -> bnpo, sequence -> grpo)",
    "grpo.advantage_norm": "grpo.scale_rewards (std -> group, mean_only -> none)",
}


def _unknown_key(key: str, level: dict) -> ConfigError:
    if key in RENAMED:
        return ConfigError(f"config key '{key}' was renamed: use {RENAMED[key]}")
    valid = sorted(level)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid)}")


def _coerce(key: str, field: Field, value: Any) -> Any:
    """Check `value` against `field`, converting only where no information is lost (int -> float)."""
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}' expects {expected}, got {value!r} ({type(value).__name__})")

    t = field.type
    if t is bool:
        if not isinstance(value, bool):
            raise fail("a bool (true/false)")
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an int")
    elif t is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no decimal point) as a string
            try:
                value = float(value)
            except ValueError:
                raise fail("a float") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a float")
        value = float(value)
    elif t is str:
        if value is None:
            value = ""
        if isinstance(value, int) and not isinstance(value, bool) and field.choices and str(value) in field.choices:
            value = str(value)   # YAML reads `bit_depth: 12` as a number
        if not isinstance(value, str):
            raise fail("a string")
    elif t is list:
        if not isinstance(value, list):
            raise fail("a list")
        if field.item_type is not None:
            value = [_coerce(f"{key}[{i}]", Field(None, field.item_type, ""), v) for i, v in enumerate(value)]
    elif t is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise fail("a mapping")
    if field.choices is not None and value not in field.choices:
        raise ConfigError(f"config key '{key}' has invalid value {value!r}; valid choices: "
                          f"{', '.join(map(str, field.choices))}")
    if t in (int, float) and not field.in_range(value):
        raise ConfigError(f"config key '{key}' must be {field.range_text()}, got {value!r}")
    return value


def _merge(cfg: Config, data: dict, schema: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key(dotted, schema)
        spec = schema[key]
        if isinstance(spec, dict):
            _merge(cfg[key], value if value is not None else {}, spec, dotted + ".")
        else:
            cfg[key] = _coerce(dotted, spec, value)


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    """Read a YAML config; `_base_: other.yaml` (or a list) is merged underneath, relative to this file."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config file '{path}' includes itself through _base_")
    if not os.path.isfile(path):
        shipped = ", ".join(sorted(f"configs/{n}" for n in os.listdir(SHIPPED_CONFIGS) if n.endswith(".yaml")))
        raise ConfigError(f"config file not found: '{path}' (shipped with ppiad: {shipped})")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    bases = data.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _deep_update(merged, _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,)))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def _field_at(dotted: str) -> Field:
    node: Any = SCHEMA
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise _unknown_key(".".join(parts[: i + 1]), node if isinstance(node, dict) else {})
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(f"config key '{dotted}' is a section; set one of its keys: {', '.join(sorted(node))}")
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key.sub=value` override into (dotted key, typed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    field = _field_at(key)
    if field.type is str:
        return key, _coerce(key, field, raw)  # keep paths like 0001 exactly as typed
    if field.type is list and not raw.strip().startswith("["):
        items = [s.strip() for s in raw.split(",") if s.strip()]
        parsed: Any = [yaml.safe_load(s) if field.item_type is not str else s for s in items]
    else:
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{text}': cannot parse value: {exc}") from exc
    return key, _coerce(key, field, parsed)


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    for text in overrides or ():
        key, value = parse_override(text)
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def resolve_config_path(path: str) -> str:
    """`path` itself when it is a file; else, for a relative `configs/<name>.yaml`, the config of that name
    shipped inside the package (so `ppiad demo` and `-c configs/lriad_mvtec.yaml` work from any folder after
    `pip install`); else `path` unchanged (the reader then names it as missing)."""
    head, _, name = path.replace(os.sep, "/").partition("/")
    if os.path.isfile(path) or os.path.isabs(path) or head != "configs" or "/" in name:
        return path
    shipped = os.path.join(SHIPPED_CONFIGS, name)
    return shipped if os.path.isfile(shipped) else path


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file (with its _base_ chain), then `key=value` overrides. A missing relative
    `configs/<name>.yaml` is read from the configs shipped with ppiad (resolve_config_path)."""
    cfg = defaults()
    if path:
        _merge(cfg, _read_yaml(resolve_config_path(path)), SCHEMA)
    return apply_overrides(cfg, overrides)


def require(cfg: Config, dotted: str, what: str) -> Any:
    """Return a required setting, or stop with a message saying which key to set."""
    value = cfg.get_path(dotted)
    if value in ("", None, []):
        raise ConfigError(f"config key '{dotted}' is not set: {what}. Set it in the YAML file or with "
                          f"-o {dotted}=...")
    return value


def save_config(cfg: Config, path: str) -> None:
    from ppiad.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def schema_markdown(schema: dict = SCHEMA, prefix: str = "") -> str:
    """The configuration reference table (docs/configuration.md is this, between its markers)."""
    rows = []
    if not prefix:
        rows += ["| key | type | default | choices / range | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, spec in schema.items():
        dotted = f"{prefix}{key}"
        if isinstance(spec, dict):
            rows.append(schema_markdown(spec, dotted + "."))
            continue
        tname = spec.type.__name__ + (f"[{spec.item_type.__name__}]" if spec.item_type else "")
        choices = ", ".join(map(str, spec.choices)) if spec.choices else spec.range_text()
        rows.append(f"| `{dotted}` | {tname} | `{spec.default!r}` | {choices} | {spec.help} |")
    return "\n".join(rows)


DOC_BEGIN, DOC_END = "<!-- schema:begin -->", "<!-- schema:end -->"


def update_doc(path: str) -> None:
    """Rewrite the generated table between the markers of docs/configuration.md."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    from ppiad.utils.io import atomic_write_text

    atomic_write_text(path, f"{head}{DOC_BEGIN}\n{schema_markdown()}\n{DOC_END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(schema_markdown())
    elif sys.argv[1:2] == ["--update-doc"] and len(sys.argv) == 3:
        update_doc(sys.argv[2])
    else:
        print("usage: python -m ppiad.config --markdown | --update-doc docs/configuration.md", file=sys.stderr)
        sys.exit(2)
