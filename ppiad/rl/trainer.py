"""GRPO training of the LoRA adapters: `GRPOTrainer(cfg).train()`.

One optimizer step, on every process (rank) with its own share of the prompts:
1. rollouts, for each of `grad_accum_steps` micro-batches of `prompts_per_device` prompts: G completions per
   prompt sampled from the current policy (`generation.generate`), rewards (`rewards.compute_rewards`); with
   `grpo.dynamic_sampling` groups without reward spread are replaced by further draws (`_select_groups`);
   then group advantages with the focal weights on their correctness part (`grpo.weighted_advantages`,
   divided per `grpo.scale_rewards`), the reference log-probs (same network, adapters disabled, no gradient);
2. the update, for each micro-batch: policy log-probs with gradient (teacher forcing, LoRA dropout on with
   masks seeded per micro-batch, logits / grpo.temperature as in the rollout),
   `grpo.grpo_loss`, backward; the loss is divided by the step's tokens / completions / completions x
   max_new_tokens (`grpo.loss_type`) over all micro-batches and processes, so the accumulated gradient equals
   that of one big batch;
3. gradient clip, AdamW on the LoRA parameters only, learning-rate schedule step.
With `grpo.num_iterations` = k > 1 the rollouts of step 1 are reused for k optimizer steps (the clipped
ratio then matters); checkpoints wait for the end of such a block, so resuming stays exact.

Determinism (what makes resume exact): the data order of epoch e is a permutation seeded by (seed, e) and the
position follows from the step number; each step reseeds every RNG from (seed, step, rank), so sampling and
dropout do not depend on what ran before in the process. A checkpoint holds the adapters, the AdamW state
and the scheduler, so a resumed run computes the same next step as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import paddle

from ppiad.config import Config, ConfigError, require, save_config
from ppiad.rl import checkpoint as ckpt
from ppiad.utils import distributed
from ppiad.utils.seed import derive_seed, get_rng_state, seed_everything, seeded


class TrainingDiverged(RuntimeError):
    """train.max_bad_steps optimizer steps in a row had a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # linear ramp that reaches the peak on the last warm-up step
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"config key 'train.lr_schedule' has invalid value {schedule!r}; valid: constant, linear, "
                      f"cosine")


def build_scheduler(cfg: Config, total_steps: int) -> paddle.optimizer.lr.LambdaDecay:
    warmup = int(math.ceil(cfg.train.warmup_ratio * total_steps))
    return paddle.optimizer.lr.LambdaDecay(
        cfg.train.learning_rate, lambda s: lr_factor(s, total_steps, warmup, cfg.train.lr_schedule))


# ---------------------------------------------------------------------------------------------- data plan
@dataclass(frozen=True)
class DataPlan:
    """Which prompts each optimizer step of this rank uses: a pure function of (seed, epoch, step)."""
    samples: list
    seed: int
    rank: int
    world_size: int
    prompts_per_step: int      # prompts_per_device * grad_accum_steps (this rank)
    steps_per_epoch: int       # optimizer steps per epoch (each rollout block counts num_iterations steps)
    num_iterations: int

    def rollouts_per_epoch(self) -> int:
        return self.steps_per_epoch // self.num_iterations

    def epoch_order(self, epoch: int) -> list:
        perm = np.random.default_rng(derive_seed(self.seed, "data", epoch) % (2 ** 63)).permutation(
            len(self.samples))
        ordered = [self.samples[i] for i in perm]
        return distributed.shard_samples(ordered, self.rank, self.world_size)

    def position(self, step: int) -> dict:
        block = step // self.num_iterations
        epoch, index = divmod(block, self.rollouts_per_epoch())
        return {"epoch": int(epoch), "index": int(index * self.prompts_per_step)}

    def prompts(self, step: int) -> list:
        pos = self.position(step)
        order = self.epoch_order(pos["epoch"])
        return order[pos["index"]:pos["index"] + self.prompts_per_step]


_MAX_REPLACEMENTS = 20   # failed draws in a row before an unreadable training set stops the run


def _drop_missing(samples: list) -> tuple[list, list]:
    """(samples whose image file exists, paths of those that do not). Raises ConfigError if none exist."""
    kept = [s for s in samples if os.path.isfile(s.path)]
    missing = [s.path for s in samples if not os.path.isfile(s.path)]
    if samples and not kept:
        raise ConfigError(f"none of the {len(samples)} training images exist on disk (first: '{missing[0]}'); "
                          f"check data.train.root")
    return kept, missing


def one_class_warning(samples: list) -> str:
    """A warning when the training set holds only one class (no defect or no normal images), else ''.
    GRPO still runs, but the accuracy and focal rewards then never see the other answer."""
    defects = sum(1 for s in samples if s.is_defect)
    if samples and defects in (0, len(samples)):
        missing = "defect" if defects == 0 else "normal"
        return (f"warning: the training set holds no {missing} images ({len(samples)} images, all "
                f"{'normal' if defects == 0 else 'defect'}): the model never sees a {missing} example; check "
                f"data.train.root / split / categories")
    return ""


def _shown_path(path: str, root: str) -> str:
    """`path` relative to the dataset root (category and split included), or whole if outside it."""
    if root:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        if not rel.startswith(os.pardir):
            return rel
    return path


def check_rollout_sampling(g) -> None:
    """The `grpo` sampling keys, checked before any model or data is loaded, naming the key at fault."""
    for key, ok, rule in (("temperature", g.temperature > 0, "> 0"), ("top_p", 0 < g.top_p <= 1, "in (0, 1]"),
                          ("min_p", 0 <= g.min_p < 1, "in [0, 1)"), ("top_k", g.top_k >= 0, ">= 0")):
        if not ok:
            raise ConfigError(f"config key 'grpo.{key}' must be {rule}, got {getattr(g, key)!r}")


def check_grpo_objective(g) -> tuple[str, float]:
    """The loss keys, checked before anything is loaded -> (scale_rewards resolved, epsilon_high resolved).

    scale_rewards auto = none with loss_type dr_grpo (Dr. GRPO drops the std division), else group;
    epsilon_high -1 = epsilon. ConfigError naming the key otherwise."""
    if g.epsilon <= 0:
        raise ConfigError(f"config key 'grpo.epsilon' must be > 0, got {g.epsilon!r}")
    eps_high = g.epsilon if g.epsilon_high == -1.0 else g.epsilon_high
    if eps_high <= 0:
        raise ConfigError(f"config key 'grpo.epsilon_high' must be > 0 or -1 (= grpo.epsilon), got {g.epsilon_high!r}")
    if g.dynamic_sampling and g.max_resample_factor < 1:
        raise ConfigError(f"config key 'grpo.max_resample_factor' must be >= 1, got {g.max_resample_factor!r}")
    if g.max_new_tokens < 1:
        raise ConfigError(f"config key 'grpo.max_new_tokens' must be >= 1, got {g.max_new_tokens!r}")
    scale = g.scale_rewards if g.scale_rewards != "auto" else ("none" if g.loss_type == "dr_grpo" else "group")
    return scale, float(eps_high)


def make_plan(cfg: Config, samples: list, env: distributed.DistEnv) -> tuple[DataPlan, int]:
    """The data plan and the total number of optimizer steps."""
    t, k = cfg.train, cfg.grpo.num_iterations
    if t.prompts_per_device < 1 or t.grad_accum_steps < 1:
        raise ConfigError("config keys 'train.prompts_per_device' and 'train.grad_accum_steps' must be >= 1")
    if k < 1:
        raise ConfigError("config key 'grpo.num_iterations' must be >= 1")
    per_step = t.prompts_per_device * t.grad_accum_steps
    per_rank = len(samples) // env.world_size
    rollouts = per_rank // per_step
    if rollouts == 0:
        raise ConfigError(f"the training partition has {len(samples)} images; one optimizer step needs "
                          f"train.prompts_per_device x train.grad_accum_steps x processes = {per_step} x "
                          f"{env.world_size} = {per_step * env.world_size}")
    plan = DataPlan(samples, cfg.seed, env.rank, env.world_size, per_step, rollouts * k, k)
    total = t.max_steps if t.max_steps > 0 else t.epochs * plan.steps_per_epoch
    if total < 1:
        raise ConfigError("nothing to train: set train.epochs >= 1 or train.max_steps >= 1")
    return plan, total


# ---------------------------------------------------------------------------------------------- helpers
def apply_memory_settings(model, cfg: Config) -> None:
    """model.attn_implementation and train.recompute on a model that offers them (Qwen2-VL does); a model
    without them accepts only the defaults (ConfigError naming the key otherwise)."""
    for method, key, value, default in (
            ("set_attn_implementation", "model.attn_implementation", cfg.model.attn_implementation, "eager"),
            ("set_recompute", "train.recompute", cfg.train.recompute, False)):
        setter = getattr(model, method, None)
        if setter is not None:
            setter(value)
        elif value != default:
            raise ConfigError(f"config key '{key}': {type(model).__name__} does not support {value!r}")


def token_normalizer(local_tokens: float, env: distributed.DistEnv) -> float:
    """Token averaging's divisor on this process: the completion tokens of the whole optimizer step summed over
    ALL processes (one all-reduce), divided by the number of processes.

    Every wrapper (data parallel, sharding) averages the processes' gradients, so the combined gradient is
    sum(per-token loss over every token of the step, all processes) / (their count): the gradient of one
    process running all the prompts, whatever each process's own token count. At least 1/world_size."""
    n = float(local_tokens)
    if env.enabled:
        t = paddle.to_tensor([n], dtype="float64")
        paddle.distributed.all_reduce(t)
        n = float(t) / env.world_size
    return max(n, 1.0 / env.world_size)


class _Logits(dict):
    """The training forward's output as a dict: DataParallel finds the tensors to hook only in tensors,
    lists and dicts (not in the model's dataclass output)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class _TrainForward(paddle.nn.Layer):
    """The layer handed to DataParallel / fleet: the model's forward, returning only the logits."""

    def __init__(self, core):
        super().__init__()
        self.core = core

    def forward(self, **kwargs):
        return _Logits(logits=self.core(**kwargs).logits)


class _ForwardVia:
    """The user's model for attributes (config, get_rope_index, ...) but calls go through the wrapper, so
    DataParallel / fleet see the training forward and synchronise the gradients."""

    def __init__(self, core, wrapper):
        self._core, self._wrapper = core, wrapper

    def __getattr__(self, name):
        return getattr(self._core, name)

    def __call__(self, *args, **kwargs):
        return self._wrapper(*args, **kwargs)


def adapter_digest(model) -> str:
    """sha256 over the LoRA tensors: equal on every rank when data parallel works."""
    from ppiad.models.lora import lora_state_dict

    h = hashlib.sha256()
    for name, t in lora_state_dict(model).items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()


def _bf16_on_gpu(cfg: Config) -> bool:
    gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    return cfg.model.dtype == "bfloat16" and gpu


# ---------------------------------------------------------------------------------------------- trainer
class GRPOTrainer:
    """GRPO on LoRA adapters of a Qwen2-VL checkpoint. `model`, `processor` and `samples` may be given
    (tests, notebooks); otherwise they come from cfg.model / cfg.data.train."""

    def __init__(self, cfg: Config, *, model=None, processor=None, samples: Optional[list] = None,
                 stop=None):
        self.cfg = cfg
        self.run_dir = os.path.join(cfg.output_dir, cfg.run_name)
        self._model, self._processor, self._samples = model, processor, samples
        self._stop = stop  # a GracefulStop-like object; tests use it to stop early
        self.references = None  # the k-shot ReferencePool (setup builds it when prompt.reference_images > 0)

    # -- setup ---------------------------------------------------------------------------------------------
    def _load_samples(self) -> list:
        if self._samples is not None:
            return list(self._samples)
        from ppiad.data.registry import build_dataset

        require(self.cfg, "data.train.root", "the training dataset root directory")
        samples = build_dataset(self.cfg.data.train, self.cfg.data.object_names)
        if not samples:
            raise ConfigError(f"the training partition (data.train.root='{self.cfg.data.train.root}', split "
                              f"'{self.cfg.data.train.split}') holds no images")
        return samples

    def _load_model(self):
        cfg = self.cfg
        if self._model is not None:
            return self._model
        from ppiad.models import AutoModel

        path = require(cfg, "model.path", "the Qwen2-VL / Qwen2.5-VL checkpoint directory to train")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"model.path '{path}' is not a Hugging Face-format checkpoint directory "
                              f"(no config.json there); set model.path")
        dtype = "bfloat16" if _bf16_on_gpu(cfg) else "float32"
        return AutoModel.from_pretrained(path, dtype=dtype, allow_pickle=cfg.model.allow_pickle)

    def _load_processor(self):
        if self._processor is not None:
            return self._processor
        from ppiad.models import AutoProcessor

        return AutoProcessor.from_config(self.cfg)

    def _add_adapters(self, model) -> None:
        from ppiad.models.lora import apply_lora, load_adapter, lora_layers

        cfg = self.cfg
        if not cfg.lora.enabled:
            raise ConfigError("training needs lora.enabled=true: the reference policy is the model with its "
                              "adapters switched off, and only the adapters are trained")
        if not lora_layers(model):
            apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        if cfg.model.adapter:  # start from an existing adapter (the reference stays the adapter-free base)
            if not os.path.exists(cfg.model.adapter):
                raise ConfigError(f"model.adapter '{cfg.model.adapter}' does not exist")
            load_adapter(model, cfg.model.adapter)
        # With adapters inside the vision tower, image features differ between policy and reference and
        # need gradients, so they cannot be shared from the rollout: recompute them in each forward.
        self.share_image_embeds = not any(name.startswith("visual.") for name in lora_layers(model))

    # -- one step ------------------------------------------------------------------------------------------
    def _sample(self, step: int, micro: int, batch: list, draw: int = 0) -> dict:
        """Sample and score G completions for each prompt of `batch` (no gradient). `draw` > 0: a dynamic-sampling
        redraw (its own generation seed)."""
        from ppiad.models.generation import generate
        from ppiad.rl.grpo import truncated_rows
        from ppiad.rl.rewards import compute_rewards

        cfg, g, proc = self.cfg, self.cfg.grpo, self.processor
        t0 = time.perf_counter()
        batch = list(batch)
        images, refs = [], None if self.references is None else []
        for i in range(len(batch)):
            batch[i], image, ref_images = self._load_or_replace(batch[i], (step, micro, draw, self.env.rank, i))
            images.append(image)
            if refs is not None:
                refs.append(ref_images)
        inputs = proc.build_inputs(images, [s.object_name for s in batch], references=refs)
        seed = (derive_seed(cfg.seed, "rollout", step, micro, self.env.rank) if draw == 0 else
                derive_seed(cfg.seed, "rollout-redraw", step, draw, micro, self.env.rank))
        with self._autocast():
            res = generate(self.core, inputs, num_samples=g.num_generations, max_new_tokens=g.max_new_tokens,
                           do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, min_p=g.min_p,
                           eos_token_ids=proc.eos_token_ids, tokenizer=proc.tokenizer,
                           answer_token_ids=self.answer_tokens, seed=seed, force_answer_score=False)
        token_p = res.answer_scores.numpy()
        total, per_reward, weights, weighted = compute_rewards(cfg.rewards, res.texts, batch, g.num_generations,
                                                               token_p=token_p, class_factors=self.class_factors)
        return {"samples": list(batch), "images": images, "refs": refs, "inputs": inputs, "sequences": res.sequences,
                "mask": res.completion_mask, "texts": list(res.texts),
                "image_embeds": res.image_embeds if self.share_image_embeds else None,
                "token_p": np.asarray(token_p, dtype=np.float64), "total": np.asarray(total, dtype=np.float64),
                "per_reward": {k: np.asarray(v, dtype=np.float64) for k, v in per_reward.items()},
                "weights": np.asarray(weights, dtype=np.float64), "weighted": np.asarray(weighted, dtype=np.float64),
                "truncated": truncated_rows(res.sequences, res.completion_mask, g.max_new_tokens,
                                            proc.eos_token_ids),
                "seconds_rollout": time.perf_counter() - t0}

    def _load_or_replace(self, sample, where: tuple):
        """(sample, image, reference images or None) for one prompt. A training image (or one of its k-shot
        references) that fails to load is logged with its path, counted in `self.unreadable` and replaced by
        another training image drawn from a seed of (cfg.seed, `where`, attempt): the same on every process and
        after a resume, so batch shapes and resumed runs stay exact. Raises ConfigError after
        _MAX_REPLACEMENTS failed draws in a row (a dataset mostly unreadable)."""
        from PIL import Image

        from ppiad.data.images import ImageLoadError, load_image

        bit_depth = self.cfg.data.train.bit_depth
        first = sample
        for attempt in range(_MAX_REPLACEMENTS + 1):
            if attempt:
                seed = derive_seed(self.cfg.seed, "replace-unreadable", *where, attempt)
                rng = np.random.default_rng(seed % (2 ** 63))
                sample = self.samples[int(rng.integers(len(self.samples)))]
            paths = [sample.path] + (list(self.references.draw(sample)) if self.references is not None else [])
            loaded, bad = [], next((p for p in paths if p in self.unreadable), None)
            for p in paths if bad is None else []:
                try:
                    loaded.append(load_image(p, bit_depth))
                except (ImageLoadError, Image.DecompressionBombError) as exc:
                    bad, self.unreadable[p] = p, str(exc)
                    self.log.info(f"warning: unreadable training image '{p}' skipped ({exc}); "
                                  f"{len(self.unreadable)} unreadable so far; its prompt is replaced by another "
                                  f"training image")
                    break
            if bad is None:
                if sample is not first:
                    self.log.info(f"prompt '{first.path}' replaced by '{sample.path}'")
                return sample, loaded[0], (loaded[1:] if self.references is not None else None)
        raise ConfigError(f"{_MAX_REPLACEMENTS + 1} training images in a row failed to load (last: "
                          f"'{bad}': {self.unreadable.get(bad)}); check data.train.root")

    def _select_groups(self, step: int) -> tuple[list, dict]:
        """The step's rollouts as micro-batches of `prompts_per_device` prompts, and the sampling stats.

        Without dynamic sampling: the plan's prompts, one `_sample` per micro-batch. With it (DAPO), groups
        whose rewards are all equal are set aside and further prompts drawn (at random from this rank's share
        of the training partition, none twice in a step, seeded by (seed, step, draw, rank), so a resumed run
        draws the same ones; the regular data order is untouched) until the step has `prompts_per_step` informative groups or
        `max_resample_factor` x prompts_per_step prompts were drawn; the rest is filled with set-aside groups
        (advantages 0: they add only the KL term). The number of draws is decided over all processes (one
        all-reduce per draw), so every process runs the same number of generation rounds and micro-batches.
        """
        from ppiad.rl.grpo import zero_spread_groups

        cfg, g = self.cfg, self.cfg.grpo
        n, target = cfg.train.prompts_per_device, self.plan.prompts_per_step
        batch = self.plan.prompts(step)
        rounds = [self._sample(step, m, batch[m * n:(m + 1) * n]) for m in range(cfg.train.grad_accum_steps)]
        drawn = target
        if g.dynamic_sampling:
            cap = max(target, g.max_resample_factor * target)
            pool = self.plan.epoch_order(self.plan.position(step)["epoch"])
            draw = 0
            while True:
                informative = sum(int((~zero_spread_groups(r["total"], g.num_generations)).sum()) for r in rounds)
                missing = min(target - informative, cap - drawn) if informative < target else 0
                missing = self._max_over_ranks(max(missing, 0))
                if missing <= 0:
                    break
                draw += 1
                used = {s.path for r in rounds for s in r["samples"]}
                free = [s for s in pool if s.path not in used]   # no image twice in one step
                if not free:
                    break   # the same on every process: their shares have equal sizes and equal draws
                rng = np.random.default_rng(derive_seed(cfg.seed, "redraw", step, draw, self.env.rank) % (2 ** 63))
                extra = [free[i] for i in rng.choice(len(free), size=min(missing, len(free)), replace=False)]
                for m in range(0, len(extra), n):
                    rounds.append(self._sample(step, m // n, extra[m:m + n], draw=draw))
                drawn += len(extra)
        stats = self._sampling_stats(rounds)
        stats["sampling/prompts_drawn"] = float(drawn)
        if not g.dynamic_sampling:
            return rounds, stats
        groups = [(ri, j) for ri, r in enumerate(rounds) for j in range(len(r["samples"]))]
        flat = {(ri, j) for ri, r in enumerate(rounds)
                for j in np.flatnonzero(zero_spread_groups(r["total"], g.num_generations))}
        keep = ([x for x in groups if x not in flat] + [x for x in groups if x in flat])[:target]
        stats["sampling/informative_groups"] = float(sum(x not in flat for x in keep))
        return [self._regroup(rounds, keep[m:m + n]) for m in range(0, target, n)], stats

    def _regroup(self, rounds: list, picks: list) -> dict:
        """A micro-batch made of the groups `picks` [(round index, prompt index)] of `rounds`."""
        G, pad = self.cfg.grpo.num_generations, int(self.processor.eos_token_ids[0])
        width = max(int(rounds[ri]["sequences"].shape[1]) for ri, _ in picks)

        def rows(ri, j, key):
            return np.asarray(rounds[ri][key])[j * G:(j + 1) * G]

        def padded(ri, j, key, value):
            x = rounds[ri][key].numpy()[j * G:(j + 1) * G]
            return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)

        samples = [rounds[ri]["samples"][j] for ri, j in picks]
        images = [rounds[ri]["images"][j] for ri, j in picks]
        refs = None if rounds[0]["refs"] is None else [rounds[ri]["refs"][j] for ri, j in picks]
        out = {"samples": samples, "images": images, "refs": refs,
               "inputs": self.processor.build_inputs(images, [s.object_name for s in samples], references=refs),
               "sequences": paddle.to_tensor(np.concatenate([padded(ri, j, "sequences", pad) for ri, j in picks])),
               "mask": paddle.to_tensor(np.concatenate([padded(ri, j, "mask", 0) for ri, j in picks])
                                        .astype("float32")),
               "texts": [t for ri, j in picks for t in rounds[ri]["texts"][j * G:(j + 1) * G]],
               "image_embeds": None,  # recomputed from the pixels of the new batch
               "per_reward": {k: np.concatenate([rounds[ri]["per_reward"][k][j * G:(j + 1) * G] for ri, j in picks])
                              for k in rounds[picks[0][0]]["per_reward"]},
               "seconds_rollout": 0.0}
        for key in ("token_p", "total", "weights", "weighted", "truncated"):
            out[key] = np.concatenate([rows(ri, j, key) for ri, j in picks])
        return out

    def _sampling_stats(self, rounds: list) -> dict:
        """Rollout statistics over every group drawn in the step (all rewards, lengths, zero-spread share)."""
        from ppiad.rl.grpo import zero_spread_groups

        G = self.cfg.grpo.num_generations
        cat = lambda key: np.concatenate([r[key] for r in rounds])  # noqa: E731
        total, lengths = cat("total"), np.concatenate([r["mask"].numpy().sum(axis=1) for r in rounds])
        groups = total.reshape(-1, G)
        per_reward = {k: np.concatenate([r["per_reward"][k] for r in rounds]) for k in rounds[0]["per_reward"]}
        stats = {
            "reward/total": float(total.mean()),
            "reward/total_std": float(total.std()),
            "reward/group_std": float(groups.std(axis=1, ddof=1).mean()) if G > 1 else 0.0,
            "frac_reward_zero_std": float(zero_spread_groups(total, G).mean()),
            "accuracy": float(per_reward["accuracy"].mean()),
            "format_rate": float(per_reward["format"].mean()),
            "advantage_weight": float(cat("weights").mean()),
            "completion_length": float(lengths.mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/truncated_share": float(cat("truncated").mean()),
            "seconds_rollout": float(sum(r["seconds_rollout"] for r in rounds)),
        }
        for name, values in per_reward.items():
            stats[f"reward/{name}"] = float(values.mean())
            stats[f"reward/{name}_std"] = float(values.std())
        token_p = cat("token_p")
        samples = [s for r in rounds for s in r["samples"]]
        stats.update(answer_p_by_class(token_p, samples, G))
        return stats

    def _max_over_ranks(self, value: int) -> int:
        if self.env.enabled:
            t = paddle.to_tensor([float(value)])
            paddle.distributed.all_reduce(t, op=paddle.distributed.ReduceOp.MAX)
            value = int(float(t))
        return value

    def _step_reward_std(self, buffer: list) -> Optional[float]:
        """scale_rewards=batch: the unbiased std of every reward of the step, over all processes."""
        if self.scale_rewards != "batch":
            return None
        r = np.concatenate([mb["total"] for mb in buffer])
        sums = np.array([r.size, r.sum(), (r * r).sum()], dtype=np.float64)
        if self.env.enabled:
            t = paddle.to_tensor(sums, dtype="float64")
            paddle.distributed.all_reduce(t)
            sums = t.numpy()
        n, s1, s2 = sums
        return float(math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1))) if n > 1 else 0.0

    def _prepare(self, step: int, micro: int, mb: dict, std_of_batch: Optional[float]) -> dict:
        """Advantages, the loss mask, the reference (and with k > 1 the old) log-probs of one micro-batch."""
        from ppiad.models.generation import completion_logprobs
        from ppiad.models.lora import adapters_disabled
        from ppiad.rl.grpo import weighted_advantages

        cfg, g, core = self.cfg, self.cfg.grpo, self.core
        t1 = time.perf_counter()
        adv = weighted_advantages(mb["total"], mb["weights"], g.num_generations, self.scale_rewards, g.std_eps,
                                  weighted_part=mb["weighted"], std_of_batch=std_of_batch)
        loss_mask = mb["mask"]
        if g.mask_truncated_completions:
            loss_mask = mb["mask"] * paddle.to_tensor((~mb["truncated"]).astype("float32")).reshape([-1, 1])
        ref = None
        if g.beta != 0.0:  # with beta = 0 the loss has no KL term: skip the reference pass (~20% of a step)
            core.eval()
            with paddle.no_grad(), adapters_disabled(core), self._autocast():
                ref = completion_logprobs(core, mb["inputs"], mb["sequences"], mb["mask"], g.num_generations,
                                          image_embeds=mb["image_embeds"], temperature=g.temperature).detach()
        # The update's LoRA dropout masks are drawn from this seed for each of the block's k updates, so the
        # ratio measures the change of the parameters only. With k > 1 the old log-probs are recomputed in the
        # update's own mode, masks and temperature (the rollout ran without dropout): ratio == 1 exactly at
        # the block's first update. With k = 1 the loss uses logp.detach(), also exactly 1.
        dropout_seed = derive_seed(cfg.seed, "dropout", step, micro, self.env.rank)
        old = None
        if g.num_iterations > 1:
            core.train()
            with paddle.no_grad(), seeded(dropout_seed), self._autocast():
                old = completion_logprobs(core, mb["inputs"], mb["sequences"], mb["mask"], g.num_generations,
                                          image_embeds=mb["image_embeds"], temperature=g.temperature).detach()
        return {**mb, "loss_mask": loss_mask, "old_logp": old, "ref_logp": ref, "dropout_seed": dropout_seed,
                "advantages": adv, "seconds_reference": time.perf_counter() - t1}

    def _rollout_step(self, step: int) -> tuple[list, dict]:
        """Rollouts (with dynamic sampling, if on), advantages and reference log-probs of one rollout block."""
        rounds, stats = self._select_groups(step)
        std_of_batch = self._step_reward_std(rounds)
        buffer = [self._prepare(step, m, mb, std_of_batch) for m, mb in enumerate(rounds)]
        stats["seconds_reference"] = sum(mb["seconds_reference"] for mb in buffer)
        adv = np.concatenate([mb["advantages"] for mb in buffer])
        stats["advantage/abs_mean"] = float(np.abs(adv).mean())
        return buffer, stats

    def _update(self, buffer: list) -> dict:
        """Policy forward + GRPO loss + backward for every micro-batch, then the optimizer step."""
        from ppiad.models.generation import completion_logprobs
        from ppiad.rl.grpo import grpo_loss

        g = self.cfg.grpo
        t0 = time.perf_counter()
        self.core.train()
        normalizer = self._loss_normalizer(buffer)
        agg: dict = {}
        entropy_sum, entropy_tokens = 0.0, 0.0
        for i, mb in enumerate(buffer):
            last = i == len(buffer) - 1
            # DataParallel: all-reduce the gradients once, after the last micro-batch
            defer = not last and hasattr(self.wrapped, "no_sync")
            sync = self.wrapped.no_sync() if defer else contextlib.nullcontext()
            with sync:
                with self._autocast(), seeded(mb["dropout_seed"]):
                    logp, entropy = completion_logprobs(self.forward_model, mb["inputs"], mb["sequences"],
                                                        mb["mask"], g.num_generations,
                                                        image_embeds=mb["image_embeds"], temperature=g.temperature,
                                                        return_entropy=True)
                loss, st = grpo_loss(logp, mb["old_logp"], mb["ref_logp"], mb["advantages"], mb["loss_mask"],
                                     epsilon=g.epsilon, beta=g.beta, loss_type=g.loss_type,
                                     normalizer=normalizer, epsilon_high=self.epsilon_high)
                loss.backward()
            entropy_sum += float((entropy * mb["mask"]).sum())
            entropy_tokens += float(mb["mask"].sum())
            st["loss"] = float(loss)
            for k, v in st.items():
                agg[k] = agg.get(k, 0.0) + (v if k == "loss" else v / len(buffer))
        agg["entropy"] = entropy_sum / max(entropy_tokens, 1.0)
        # Combine the gradients over the processes first, so that the clip and the logged norm are global
        # (over all processes and over both LoRA+ parameter groups) under every sharding setting.
        held = distributed.combine_gradients(self.trainable, self.env, self.wrapped)
        grad_norm = distributed.clip_grad_norm(held, self.cfg.train.max_grad_norm, self.env)
        finite = self._all_ranks(math.isfinite(agg.get("loss", 0.0)) and math.isfinite(grad_norm))
        if finite:  # else: skip the update (the schedule still advances with the step count)
            self.optimizer.step()
        self.optimizer.clear_grad()
        distributed.release_gathered(self.wrapped)  # stage 3: frozen weights backward gathered go back to 1/N
        self.scheduler.step()
        agg["grad_norm"] = grad_norm
        agg["skipped"] = 0.0 if finite else 1.0
        agg["seconds_update"] = time.perf_counter() - t0
        return agg

    def _param_groups(self):
        """The adapters as AdamW parameter groups. LoRA+ (Hayou et al. 2024): lora_B learns `lora.plus_ratio`
        times faster than lora_A (a group's learning_rate is a factor on the schedule's); 1 = plain LoRA."""
        ratio = self.cfg.lora.plus_ratio
        if ratio == 1.0:
            return self.trainable
        from ppiad.models.lora import lora_layers

        b_ids = {id(layer.lora_B) for layer in lora_layers(self.core).values()}
        return [{"params": [p for p in self.trainable if id(p) not in b_ids]},
                {"params": [p for p in self.trainable if id(p) in b_ids], "learning_rate": ratio}]

    def _loss_normalizer(self, buffer: list) -> float:
        """The loss's divisor for the whole step: tokens (bnpo), completions (grpo) or completions x
        max_new_tokens (dr_grpo), summed over the micro-batches and the processes (`token_normalizer`)."""
        from ppiad.rl.grpo import loss_normalizer_units

        g = self.cfg.grpo
        units = sum(loss_normalizer_units(mb["loss_mask"], g.loss_type, g.max_new_tokens) for mb in buffer)
        return token_normalizer(units, self.env)

    def _autocast(self):
        if self.bf16:   # GPU only; untested here (no GPU)
            return paddle.amp.auto_cast(enable=True, dtype="bfloat16", level="O2")
        return contextlib.nullcontext()

    # -- the loop ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from ppiad.models.generation import AnswerTokens
        from ppiad.models.lora import lora_parameters
        from ppiad.rl.rewards import factors_from_config
        from ppiad.utils.logging import RunLogger

        cfg = self.cfg
        self.env = distributed.init(cfg.distributed.sharding)
        self.bf16 = _bf16_on_gpu(cfg)
        check_rollout_sampling(cfg.grpo)
        self.scale_rewards, self.epsilon_high = check_grpo_objective(cfg.grpo)
        if cfg.train.max_bad_steps < 1:
            raise ConfigError(f"config key 'train.max_bad_steps' must be >= 1, got {cfg.train.max_bad_steps}")
        self.skipped_steps, self.bad_streak = 0, 0
        seed_everything(cfg.seed)  # the same on every rank: identical LoRA initialisation
        self.samples, missing = _drop_missing(self._load_samples())
        self.unreadable: dict[str, str] = {}   # path -> reason, for images that failed to decode when drawn
        from ppiad.data.references import build_reference_pool

        # k-shot prompts: each training image gets k normal references of its category (never itself)
        self.references = build_reference_pool(cfg, "train", train_samples=self.samples)
        from ppiad.data.leakage import guard_run, partition_paths

        # leakage guard: training images (or references) identical to evaluation images stop the run; the same
        # for the held-out images validated on during training (data.val), when given
        train_paths = partition_paths(cfg, "train", self.samples)
        guard_run(cfg, train_paths, partition_paths(cfg, "eval"), self.references)
        if cfg.data.val.root:
            guard_run(cfg, train_paths, partition_paths(cfg, "val"), self.references)
        self.class_factors = factors_from_config(cfg.rewards.focal, self.samples)
        self.plan, self.total_steps = make_plan(cfg, self.samples, self.env)
        self.processor = self._load_processor()
        self.answer_tokens = AnswerTokens.from_tokenizer(self.processor.tokenizer)
        self.core = self._load_model()
        apply_memory_settings(self.core, cfg)
        self._add_adapters(self.core)
        self.trainable = lora_parameters(self.core)
        self.scheduler = build_scheduler(cfg, self.total_steps)
        # No grad_clip in the optimizer: Paddle clips each parameter group alone (LoRA+ makes two) and its
        # sharding wrappers replace the clip; `_update` clips globally itself (distributed.clip_grad_norm).
        optimizer = paddle.optimizer.AdamW(learning_rate=self.scheduler, parameters=self._param_groups(),
                                           beta1=cfg.train.adam_beta1, beta2=cfg.train.adam_beta2,
                                           epsilon=cfg.train.adam_epsilon,
                                           weight_decay=cfg.train.weight_decay, multi_precision=self.bf16)
        if self.bf16:
            # Paddle's own mixed precision, as its trainers run bf16 (GPU only; untested here, no GPU): O2 keeps
            # the weights in bf16, the optimizer holds fp32 master weights of the adapters (multi_precision;
            # saved under stable names, rl.checkpoint) and master_grad gives fp32 gradients for the clip and
            # the update.
            self.core, optimizer = paddle.amp.decorate(models=self.core, optimizers=optimizer, level="O2",
                                                       dtype="bfloat16", master_weight=True, master_grad=True)
        if self.env.enabled:
            self.wrapped, self.optimizer = distributed.wrap(_TrainForward(self.core), optimizer, self.env,
                                                            segment_size=cfg.distributed.stage3_segment_size)
        else:
            self.wrapped, self.optimizer = self.core, optimizer
        self.forward_model = self.core if self.wrapped is self.core else _ForwardVia(self.core, self.wrapped)
        self.sharded_optimizer = self.env.enabled and cfg.distributed.sharding != "none"
        self.param_names = ckpt.param_name_map(self.core)
        self.start_step, self.resumed_from = 0, None
        resume = self._resume_path()
        self.log = RunLogger(self.run_dir, rank=self.env.rank, total_steps=self.total_steps)
        if self.env.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        if cfg.model.dtype == "bfloat16" and not self.bf16:
            self.log.info("model.dtype=bfloat16 needs a GPU (Paddle's CPU kernels have no bf16 matmul): "
                          "training in float32")
        self.val_samples, self.best = [], None
        if cfg.train.eval_every > 0:
            from ppiad.rl.validation import BestKeeper, validation_samples

            self.val_samples = validation_samples(cfg)
            self.best = BestKeeper(self.run_dir, cfg.train.save_best_metric) if cfg.train.save_best else None
        elif cfg.train.save_best:
            raise ConfigError("train.save_best needs train.eval_every > 0 (the evaluations pick the best)")
        one_class = one_class_warning(self.samples)
        if one_class:
            self.log.info(one_class)
        if missing:
            self.log.info(f"warning: {len(missing)} training image(s) listed but missing on disk, left out of "
                          f"training: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if resume:
            self._resume(resume)
        elif cfg.train.resume == "auto":
            self.log.info(f"train.resume=auto: no checkpoint in {self.run_dir}, starting from step 0")
        first = [_shown_path(s.path, cfg.data.train.root) for s in self.plan.prompts(self.start_step)[:2]]
        self.log.info(f"first prompts of this rank: {first}")
        if self.references is not None:
            self.log.info(f"k-shot prompts: {self.references.k} reference image(s) per prompt from "
                          f"{self.references.describe()}")
        self.log.info(f"training {len(self.samples)} images ({self.class_factors}), {self.env.world_size} "
                      f"process(es), sharding={cfg.distributed.sharding}, {self.total_steps} steps "
                      f"({self.plan.steps_per_epoch} per epoch), {sum(int(np.prod(p.shape)) for p in self.trainable)} "
                      f"trainable parameters, run dir {self.run_dir}")

    def _resume_path(self) -> Optional[str]:
        r = self.cfg.train.resume
        if not r:
            return None
        if r == "auto":
            return ckpt.find_latest(self.run_dir)  # None = nothing yet: a fresh start
        if not os.path.isfile(os.path.join(r, ckpt.TRAINER_STATE)):
            raise ConfigError(f"train.resume '{r}' is not a checkpoint directory (no {ckpt.TRAINER_STATE}); "
                              f"use a <run>/checkpoints/step_XXXXXX directory or 'auto'")
        return r

    def _resume(self, path: str) -> None:
        from ppiad.models.lora import load_adapter

        load_adapter(self.core, path)
        state = ckpt.load_checkpoint(path, optimizer=self.optimizer, lr_scheduler=self.scheduler,
                                     param_names=self.param_names, rank=self.env.rank,
                                     world_size=self.env.world_size)
        if state.world_size != self.env.world_size:
            self.log.info(f"warning: checkpoint was written by {state.world_size} process(es), now "
                          f"{self.env.world_size}: the data order differs from the original run")
        self.start_step, self.resumed_from = state.step, path
        self.log.info(f"resumed from {path} at step {state.step}")

    def _base_fingerprint(self) -> Optional[str]:
        """The base model's fingerprint (rank 0, computed once), recorded in every checkpoint."""
        if self.env.rank != 0:
            return None
        if getattr(self, "_base_fp", None) is None:
            from ppiad.utils.identity import model_fingerprint

            self._base_fp = model_fingerprint(self.cfg.model.path)
        return self._base_fp

    def _save(self, step: int, metrics: dict) -> str:
        from ppiad.models.lora import lora_state_dict, save_adapter

        bad = [n for n, t in lora_state_dict(self.core).items() if not bool(paddle.isfinite(t).all())]
        if bad:  # checked on every rank before any file is written (save_adapter checks again)
            raise FloatingPointError(f"not saving the step-{step} checkpoint: {len(bad)} adapter tensor(s) hold "
                                     f"NaN or inf values, e.g. {bad[0]}")

        path = ckpt.save_checkpoint(
            self.run_dir, step, trainable_state=lambda d: save_adapter(self.core, d), optimizer=self.optimizer,
            lr_scheduler=self.scheduler, rng=get_rng_state(), data_position=self.plan.position(step),
            config=self.cfg, metrics=metrics, param_names=self.param_names, rank=self.env.rank,
            world_size=self.env.world_size, sharded_optimizer=self.sharded_optimizer,
            barrier=lambda: distributed.barrier(self.env), base_model=self._base_fingerprint())
        self.log.info(f"checkpoint {path}")
        return path

    def _validate(self, step: int) -> dict:
        """Greedy evaluation on the run's held-out subset -> VisualDL eval/*; with train.save_best the adapter
        of the best evaluation so far goes to <run>/best (rl.validation)."""
        from ppiad.models.lora import save_adapter
        from ppiad.rl.validation import evaluate_policy

        t0 = time.perf_counter()
        with self._autocast():
            result = evaluate_policy(self.core, self.processor, self.val_samples, self.cfg, self.env,
                                     references=self.references)
        self.core.train()
        self.log.scalars(step, {**result, "seconds": time.perf_counter() - t0}, prefix="eval")
        shown = ", ".join(f"{k} {v:.3f}" for k, v in result.items() if v is not None)
        self.log.info(f"step {step}: held-out ({len(self.val_samples)} images) {shown}")
        if self.best is not None and self.env.is_main and self.best.offer(step, result,
                                                                          lambda d: save_adapter(self.core, d)):
            self.log.info(f"step {step}: best {self.best.metric} so far ({result[self.best.metric]:.4f}), adapter "
                          f"in {self.best.dir}")
        return result

    def _log_samples(self, step: int, mb: dict) -> None:
        """The first prompt's image and its rollouts (completions, rewards, advantages) to VisualDL."""
        from ppiad.rl.validation import sample_text

        self.log.text(step, "samples/rollouts", sample_text(mb, self.cfg.grpo.num_generations))
        self.log.image(step, "samples/image", mb["images"][0])

    def _all_ranks(self, ok: bool) -> bool:
        """True only if `ok` holds on every rank (they must take the same branch)."""
        if self.env.enabled:
            t = paddle.to_tensor([1.0 if ok else 0.0])
            paddle.distributed.all_reduce(t, op=paddle.distributed.ReduceOp.MIN)
            ok = bool(float(t) > 0)
        return ok

    def _check_bad_step(self, step: int, upd: dict) -> str:
        """Count a skipped (non-finite) step; after train.max_bad_steps in a row, the message to stop with."""
        if not upd.pop("skipped"):
            self.bad_streak = 0
            return ""
        self.skipped_steps += 1
        self.bad_streak += 1
        self.log.info(f"step {step}: loss {upd.get('loss')} / gradient norm {upd.get('grad_norm')} not finite: "
                      f"update skipped ({self.bad_streak} in a row, {self.skipped_steps} in this run)")
        limit = self.cfg.train.max_bad_steps
        if self.bad_streak < limit:
            return ""
        return (f"training stopped at step {step}: {self.bad_streak} steps in a row had a NaN/inf loss or gradient "
                f"(train.max_bad_steps={limit}); nothing was saved from them, the last checkpoint in "
                f"{os.path.join(self.run_dir, ckpt.CHECKPOINTS)} is intact. Lower train.learning_rate, or check "
                f"the data and model.dtype")

    def _stop_requested(self, stop) -> bool:
        flag = bool(stop is not None and stop.requested)
        if self.env.enabled:  # all ranks must agree, or one would wait forever in the next collective
            t = paddle.to_tensor([1.0 if flag else 0.0])
            paddle.distributed.all_reduce(t, op=paddle.distributed.ReduceOp.MAX)
            flag = bool(float(t) > 0)
        return flag

    def train(self) -> dict:
        """Run to train.max_steps / train.epochs (or a stop signal); returns a summary dict."""
        from ppiad.utils.signals import GracefulStop

        self.setup()
        cfg, k = self.cfg, self.cfg.grpo.num_iterations
        # a resumed run that has nothing left to do (already at train.max_steps) reports the checkpoint it holds
        last_saved, metrics, step, buffer = self.resumed_from, {}, self.start_step, None
        stopped, stop_signal = False, ""
        with (self._stop if self._stop is not None else GracefulStop()) as stop:
            while step < self.total_steps:
                t0 = time.perf_counter()
                seed_everything(derive_seed(cfg.seed, "step", step, self.env.rank))
                roll_stats = {}
                if step % k == 0 or buffer is None:
                    buffer, roll_stats = self._rollout_step(step)
                lr = self.optimizer.get_lr()
                upd = self._update(buffer)
                step += 1
                diverged = self._check_bad_step(step, upd)
                metrics = {**roll_stats, **upd, "lr": lr, "skipped_steps": self.skipped_steps,
                           "unreadable_images": len(self.unreadable),
                           "seconds_per_step": time.perf_counter() - t0}
                metrics = distributed.all_reduce_mean(metrics, self.env)
                if step % cfg.train.log_every == 0 or step == self.total_steps or diverged:
                    self.log.scalars(step, metrics)
                if diverged:
                    self.log.close()
                    raise TrainingDiverged(diverged)
                self.log.advance(1, {"loss": metrics["loss"], "reward": metrics.get("reward/total", float("nan"))})
                at_block_end = step % k == 0
                stop_now = self._stop_requested(stop)
                if roll_stats and cfg.train.log_samples_every > 0 and step % cfg.train.log_samples_every == 0:
                    self._log_samples(step, buffer[0])
                if cfg.train.eval_every > 0 and (step % cfg.train.eval_every == 0 or step == self.total_steps):
                    self._validate(step)
                if at_block_end and (step % cfg.train.save_every == 0 or step == self.total_steps or stop_now):
                    last_saved = self._save(step, metrics)
                if stop_now and at_block_end:
                    stopped, stop_signal = True, getattr(stop, "signal_name", "")
                    self.log.info(f"stopped by {getattr(stop, 'signal_name', '') or 'request'} at step {step}")
                    break
        if step > self.start_step and (last_saved is None or not last_saved.endswith(ckpt.step_dir_name(step))):
            last_saved = self._save(step, metrics)  # e.g. max_steps not a multiple of num_iterations
        digest = adapter_digest(self.core)
        self.log.info(f"done at step {step}; adapter sha256 {digest}; last checkpoint {last_saved}")
        self.log.close()
        return {"step": step, "run_dir": self.run_dir, "checkpoint": last_saved, "metrics": metrics,
                "adapter_sha256": digest, "stopped": stopped, "signal": stop_signal, "rank": self.env.rank}


def answer_p_by_class(token_p, batch: list, group_size: int) -> dict:
    """Mean P(A) over the rollouts of the batch's defect and of its normal images: is the policy learning to
    discriminate? The gap between the two opens as it does (accuracy alone hides it while the prior moves).
    NaN for a class absent from the batch or without scored answers: every rank logs the same keys, and the
    logger drops non-finite values."""
    token_p = np.asarray(token_p, dtype=np.float64)
    is_defect = np.repeat([s.is_defect for s in batch], group_size)
    out = {}
    for name, rows in (("defect", is_defect), ("normal", ~is_defect)):
        vals = token_p[rows & ~np.isnan(token_p)]
        out[f"answer_p/{name}"] = float(vals.mean()) if vals.size else float("nan")
    return out
