"""Validation during training: greedy evaluation of the current policy on a fixed held-out subset, the
best checkpoint by a chosen metric, and rollout samples for VisualDL.

The held-out images are `data.val` when its root is set, else `data.eval`; `train.eval_images` of them are
taken class-stratified (`stratified_subset`) once per run, so every evaluation sees the same images. The
evaluation is that of tools/eval.py (ppiad.eval: `ModelPredictor`, greedy, `eval.max_new_tokens`; metrics
from `ppiad.eval.metrics.evaluate`), on the adapters as they are (not merged).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ppiad.config import Config, ConfigError
from ppiad.utils import distributed

EVAL_KEYS = ("f1_macro", "auroc", "accuracy", "balanced_accuracy", "false_alarm_rate", "invalid_rate")
LOWER_IS_BETTER = ("false_alarm_rate", "invalid_rate")
BEST_DIR = "best"


def stratified_subset(samples: list, n: int) -> list:
    """n samples (all when n < 0 or n >= len) with each class in its share of `samples` (at least one of each
    class present when n >= 2), taken evenly spaced over each class sorted by path: a pure function of
    (samples, n), so every evaluation of a run and every run with the same data sees the same images."""
    samples = sorted(samples, key=lambda s: s.path)
    if n < 0 or n >= len(samples):
        return samples
    defect = [s for s in samples if s.is_defect]
    normal = [s for s in samples if not s.is_defect]
    k = int(round(n * len(defect) / len(samples)))
    if n >= 2 and defect and normal:
        k = min(max(k, 1), n - 1)
    k = min(k, len(defect))

    def spaced(items, m):
        if m <= 0:
            return []
        return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, m).round().astype(int))]

    return sorted(spaced(defect, k) + spaced(normal, n - k), key=lambda s: s.path)


def validation_samples(cfg: Config) -> list:
    """The fixed held-out subset of a run (ConfigError naming the keys when no held-out partition is set)."""
    from ppiad.data.registry import build_dataset

    part, key = (cfg.data.val, "data.val") if cfg.data.val.root else (cfg.data.eval, "data.eval")
    if not part.root:
        raise ConfigError("train.eval_every > 0 needs held-out images: set data.val.root (or data.eval.root)")
    samples = build_dataset(part, cfg.data.object_names)
    if not samples:
        raise ConfigError(f"{key}.root '{part.root}' (split '{part.split}') holds no images for train.eval_every")
    return stratified_subset(samples, cfg.train.eval_images)


def evaluate_policy(model, processor, samples: list, cfg: Config, env, references=None) -> dict:
    """Greedy evaluation of `model` (with its adapters) on `samples`, split over the processes and gathered;
    `references` (the trainer's k-shot pool, ppiad.data.references, or None) gives each image its k normal
    references, as in training:
    {f1_macro, auroc, accuracy, balanced_accuracy, false_alarm_rate, invalid_rate} (fractions; auroc None
    without scores or without both classes) and n (images evaluated)."""
    import paddle

    from ppiad.eval.metrics import evaluate, false_alarm_rate
    from ppiad.eval.predictor import ModelPredictor
    from ppiad.data.images import load_image
    from ppiad.eval.runner import _record, try_load

    predictor = ModelPredictor(model, processor, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed)
    # Every process takes every world_size-th image, none dropped; a process with one image fewer repeats its
    # last one (result discarded), so all make the same generate calls (stage 3 needs that).
    world, rank = max(env.world_size, 1), env.rank
    mine = list(samples[rank::world]) if world > 1 else list(samples)
    per_rank = -(-len(samples) // world)
    real = len(mine)
    mine += [mine[-1] if mine else samples[0]] * (per_rank - real)
    bit_depth = (cfg.data.val if cfg.data.val.root else cfg.data.eval).bit_depth
    records, bs = [], max(1, cfg.eval.batch_size)
    model.eval()
    for i in range(0, len(mine), bs):
        loaded = [(j, s, *try_load(s.path, bit_depth)) for j, s in enumerate(mine[i:i + bs], start=i)]
        ok = [(j, s, img) for j, s, img, err in loaded if img is not None]
        refs = None if references is None or not ok else [
            [load_image(p, bit_depth) for p in references.draw(s)] for _, s, _ in ok]
        preds = (predictor.predict([img for _, _, img in ok], [s.object_name for _, s, _ in ok], references=refs)
                 if ok else [])
        records += [_record(s, p) for (j, s, _), p in zip(ok, preds) if j < real]
        records += [_record(s, error=err) for j, s, img, err in loaded if img is None and j < real]
    if env.enabled:
        gathered: list = []
        paddle.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    overall = evaluate(records)["overall"]
    out = {k: overall.get(k) for k in EVAL_KEYS if k != "false_alarm_rate"}
    out["false_alarm_rate"] = false_alarm_rate(overall)
    out["n"] = overall["n"]
    return out


class BestKeeper:
    """Keeps the adapter of the best evaluation so far in <run_dir>/best (adapter files + best.json with the
    step and the metrics), replaced atomically (written next to it, then renamed). Resumes from best.json."""

    def __init__(self, run_dir: str, metric: str):
        self.dir = os.path.join(run_dir, BEST_DIR)
        self.metric = metric
        self.best = None
        info = os.path.join(self.dir, "best.json")
        if os.path.isfile(info):
            with open(info, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("metric") == metric:   # another metric: its best says nothing about this one
                self.best = saved["metrics"].get(metric)

    def better(self, value) -> bool:
        if value is None or not np.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.metric in LOWER_IS_BETTER else value > self.best

    def offer(self, step: int, metrics: dict, save_adapter) -> bool:
        """Save when metrics[metric] beats the best so far; `save_adapter(directory)` writes the adapter."""
        if not self.better(metrics.get(self.metric)):
            return False
        tmp = self.dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_adapter(tmp)
        with open(os.path.join(tmp, "best.json"), "w", encoding="utf-8") as f:
            json.dump({"step": int(step), "metric": self.metric, "metrics": metrics}, f, indent=2)
        old = self.dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(self.dir):
            os.replace(self.dir, old)
        os.replace(tmp, self.dir)
        shutil.rmtree(old, ignore_errors=True)
        self.best = metrics[self.metric]
        return True


def sample_text(mb: dict, group_size: int, prompt: int = 0) -> str:
    """Markdown of one prompt's rollouts: object, truth, then each completion with its rewards and advantage."""
    s = mb["samples"][prompt]
    rows = range(prompt * group_size, (prompt + 1) * group_size)
    lines = [f"**{s.object_name}** ({s.category}), truth: {s.label} ({s.defect_type}), image `{s.path}`", ""]
    for i in rows:
        rewards = ", ".join(f"{k} {float(v[i]):.3g}" for k, v in mb["per_reward"].items())
        lines.append(f"{i - rows.start + 1}. total {float(mb['total'][i]):.3g} ({rewards}), advantage "
                     f"{float(mb['advantages'][i]):+.3f}: `{mb['texts'][i]!r}`")
    return "\n".join(lines)
