"""The embedded default end to end: synthetic data, tiny stand-in, format warm start, GRPO, evaluation, inspection.

Each stage leaves its output where the config says (data roots, model.path, the run directory) and is skipped
when that output is already complete, so an interrupted demo continues where it stopped. Every such output
records what made it (the data trees in synthetic.json, the warm start in identity.json, the run directory in
demo_identity.json beside tools/train.py's identity.json, each evaluation folder in its own identity.json),
and `check_outputs` stops the demo (exit code 2, one line naming the differing keys) before anything runs
when an existing output was made with other settings: e.g. `-o seed=1` after a seed-0 run must get its own
data roots, model.path and run_name. Training, evaluation and inspection run through the real command-line
tools, exactly as a user would run them; the demo prints each command.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Sequence

from ppiad.config import Config
from ppiad.data.registry import build_dataset
from ppiad.eval.metrics import false_alarm_rate
from ppiad.rl.identity import NOT_IDENTITY
from ppiad.utils.identity import IdentityError, check_identity, differing_keys, flat_settings, write_identity
from ppiad.utils.io import atomic_write_json, read_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
                   "generation_config.json")


def run_dir(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, cfg.run_name)


# ---------------------------------------------------------------------------------------------------------
# What made each output
# ---------------------------------------------------------------------------------------------------------
# Settings that do not change the demo's results are those that do not change a training run's
# (ppiad.rl.identity.NOT_IDENTITY: where and how often outputs are saved, logged or evaluated, recompute, ...).
RUN_IDENTITY = "demo_identity.json"   # beside tools/train.py's own identity.json in the run directory


def data_identity(cfg: Config, which: str) -> dict:
    """What the synthetic tree `which` ("train" or "eval") is made from, keyed by config key."""
    from ppiad.data.synthetic import CATEGORIES

    d = cfg.demo
    count = "demo.train_images" if which == "train" else "demo.test_images"
    return {"seed": cfg.seed, count: d.train_images if which == "train" else d.test_images,
            "demo.defect_ratio": d.defect_ratio, "demo.image_size": d.image_size,
            "demo.categories": sorted(d.categories or CATEGORIES)}


def _stored_data_identity(root: str, which: str) -> dict:
    """data_identity read back from a tree's synthetic.json (the generator's arguments)."""
    meta = read_json(os.path.join(root, "synthetic.json"))
    count = "demo.train_images" if which == "train" else "demo.test_images"
    return {"seed": meta.get("seed", 0) - (0 if which == "train" else 1), count: meta.get("num_images"),
            "demo.defect_ratio": meta.get("defect_ratio"), "demo.image_size": meta.get("size"),
            "demo.categories": sorted(meta.get("categories") or [])}


def warmstart_identity(cfg: Config) -> dict:
    """What the warm-started stand-in at model.path is made from: its architecture, pixel limits, the warm
    start's settings and the training tree it saw."""
    d = cfg.demo
    shots = {"prompt.reference_images": cfg.prompt.reference_images} if cfg.prompt.reference_images else {}
    return {**data_identity(cfg, "train"), **shots, "demo.hidden_size": d.hidden_size, "demo.layers": d.layers,
            "demo.vision_embed_dim": d.vision_embed_dim, "model.min_pixels": cfg.model.min_pixels,
            "model.max_pixels": cfg.model.max_pixels, "demo.warmstart_steps": d.warmstart_steps,
            "demo.warmstart_batch_size": d.warmstart_batch_size, "demo.warmstart_lr": d.warmstart_lr}


def run_identity(cfg: Config) -> dict:
    """What the run directory's training checkpoints depend on: the warm start, both data trees and every
    model, LoRA, reward, GRPO and training setting (not where or how often things are saved or logged)."""
    ident = {**warmstart_identity(cfg), **data_identity(cfg, "eval")}
    for section in ("model", "lora", "rewards", "grpo", "train"):   # model.path: the warm start's settings say it
        ident.update(flat_settings(cfg[section], section, NOT_IDENTITY))
    return ident


def check_outputs(cfg: Config) -> None:
    """Stop (IdentityError, one line naming the differing keys) if an existing data tree, warm start or run
    directory of this config was made with other settings. Nothing is written."""
    for which, root, key in (("train", cfg.data.train.root, "data.train.root"),
                             ("eval", cfg.data.eval.root, "data.eval.root")):
        if os.path.isfile(os.path.join(root, "synthetic.json")):
            diff = differing_keys(_stored_data_identity(root, which), data_identity(cfg, which))
            if diff:
                raise IdentityError(f"'{root}' holds a synthetic tree made with other settings (differing: "
                                    f"{', '.join(diff)}); pass another {key} or delete that folder")
    check_identity(cfg.model.path, warmstart_identity(cfg), "a warm-started model",
                   "pass another model.path or delete that folder",
                   has_results=os.path.exists(os.path.join(cfg.model.path, "model.safetensors")))
    from ppiad.rl.checkpoint import CHECKPOINTS

    check_identity(run_dir(cfg), run_identity(cfg), "a demo run", "pass another run_name (or output_dir) or "
                   "delete that folder", has_results=os.path.isdir(os.path.join(run_dir(cfg), CHECKPOINTS)),
                   filename=RUN_IDENTITY, ignore=NOT_IDENTITY)   # an older demo recorded some of them


def prepare_data(cfg: Config, log: Callable = print) -> None:
    """Two synthetic MVTec-layout trees from different seeds: GRPO trains on one, evaluation uses the other."""
    from ppiad.data.synthetic import generate_synthetic

    d = cfg.demo
    for root, n, seed in ((cfg.data.train.root, d.train_images, cfg.seed),
                          (cfg.data.eval.root, d.test_images, cfg.seed + 1)):
        if os.path.exists(os.path.join(root, "synthetic.json")):
            log(f"[data] {root} exists, kept")
            continue
        generate_synthetic(root, num_images=n, defect_ratio=d.defect_ratio, size=d.image_size, seed=seed,
                           categories=list(d.categories) or None, overwrite=os.path.exists(root))
        log(f"[data] wrote {n} synthetic images (defect ratio {d.defect_ratio}) to {root}")


def prepare_model(cfg: Config, log: Callable = print) -> None:
    """Build the tiny random Qwen2-VL and warm-start it on the format only; the result is model.path."""
    from ppiad.demo.warmstart import warm_start
    from ppiad.models import AutoModel, AutoProcessor
    from ppiad.models.tiny import build_tiny_checkpoint

    target = cfg.model.path
    if os.path.exists(os.path.join(target, "model.safetensors")):
        log(f"[model] {target} exists, kept")
        return
    d = cfg.demo
    random_dir = os.path.join(run_dir(cfg), "tiny_random")
    pixels = d.image_size * d.image_size
    build_tiny_checkpoint(random_dir, seed=cfg.seed, hidden_size=d.hidden_size, layers=d.layers,
                          intermediate_size=2 * d.hidden_size, vision_embed_dim=d.vision_embed_dim,
                          vision_heads=4, min_pixels=min(pixels, cfg.model.min_pixels), max_pixels=pixels)
    model = AutoModel.from_pretrained(random_dir)
    processor = AutoProcessor.from_pretrained(random_dir, min_pixels=cfg.model.min_pixels,
                                                 max_pixels=cfg.model.max_pixels)
    n_params = sum(int(p.size) for p in model.parameters())
    log(f"[model] tiny Qwen2-VL stand-in: {n_params / 1e6:.2f}M parameters, hidden {d.hidden_size}, "
        f"{d.layers} layers; format-only warm start, {d.warmstart_steps} steps")
    samples = build_dataset(cfg.data.train, cfg.data.object_names)
    from ppiad.data.references import build_reference_pool

    references = build_reference_pool(cfg, "train", train_samples=samples)   # None at k = 0
    t0 = time.perf_counter()
    losses = warm_start(model, processor, samples, steps=d.warmstart_steps, batch_size=d.warmstart_batch_size,
                        learning_rate=d.warmstart_lr, seed=cfg.seed, log=lambda m: log(f"[model] {m}"),
                        references=references)
    tmp = target.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in PROCESSOR_FILES:
        shutil.copy(os.path.join(random_dir, name), tmp)
    write_identity(tmp, warmstart_identity(cfg))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # the model appears complete or not at all
    log(f"[model] warm start done in {time.perf_counter() - t0:.0f} s (final loss {losses[-1]:.3f}): {target}")


def run_tool(tool: str, config_path: str, overrides: Sequence[str], extra: Sequence[str] = (),
             log: Callable = print) -> None:
    """Run `ppiad <tool>` as a user would (same working directory, so relative paths in the config mean
    the same as in this process), echoing the command; a failure stops the demo. Works from a checkout and
    from an installed package alike (this ppiad is put first on the child's PYTHONPATH)."""
    cmd = [sys.executable, "-m", "ppiad", tool, "-c", config_path, *extra]
    if overrides:
        cmd += ["-o", *overrides]
    log("$ " + " ".join(_quote(c) for c in cmd))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"ppiad {tool} failed with exit code {result.returncode}")


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(ch in arg for ch in " \\|()[]{}") else arg


def headline(metrics: dict) -> dict:
    """The figures the demo reports: F1-macro, accuracy, defect recall, false-alarm rate, invalid rate."""
    o = metrics["overall"]
    return {"f1_macro": o["f1_macro"], "accuracy": o["accuracy"], "defect_recall": o["recall"]["defect"],
            "false_alarm_rate": false_alarm_rate(o), "invalid_rate": o["invalid_rate"],
            "auroc": o["auroc"], "n": o["n"]}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{100 * x:6.2f}"


def summary_table(rows: dict) -> str:
    keys = ("f1_macro", "accuracy", "defect_recall", "false_alarm_rate", "invalid_rate", "auroc")
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, h in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(h[k]) for k in keys) + " |")
    return "\n".join(lines)


def pick_inspection_images(cfg: Config) -> list:
    """A few held-out images for the drawn inspection, defects and normals from different categories."""
    samples = build_dataset(cfg.data.eval, cfg.data.object_names)
    defects = [s for s in samples if s.is_defect]
    normals = [s for s in samples if not s.is_defect]
    picked: list = []
    while len(picked) < cfg.demo.infer_images and (defects or normals):
        pool = (defects, normals)[len(picked) % 2] or defects or normals
        used = {s.category for s in picked}
        choice = next((s for s in pool if s.category not in used), pool[0])
        pool.remove(choice)
        picked.append(choice)
    return picked


def run_demo(cfg: Config, config_path: str, overrides: Sequence[str], log: Callable = print) -> dict:
    from ppiad.rl.checkpoint import find_latest

    t_start = time.perf_counter()
    check_outputs(cfg)   # before anything is written: a differing earlier run stops the demo here
    out = run_dir(cfg)
    os.makedirs(out, exist_ok=True)
    write_identity(out, run_identity(cfg), RUN_IDENTITY)
    prepare_data(cfg, log)
    prepare_model(cfg, log)

    eval_warm = os.path.join(out, "eval_warmstart")
    log("[eval] the warm-started model, before GRPO (its answers were trained to be random)")
    run_tool("eval", config_path, [*overrides, "model.adapter="], ["--output_dir", eval_warm, "--no_progress"], log)

    log("[train] GRPO with the format and focal rewards")
    run_tool("train", config_path, [*overrides, "train.resume=auto"], log=log)
    adapter = find_latest(out)
    if adapter is None:
        raise RuntimeError(f"training wrote no checkpoint under {out}")

    eval_grpo = os.path.join(out, "eval_grpo")
    log("[eval] after GRPO")
    run_tool("eval", config_path, [*overrides, f"model.adapter={adapter}"],
             ["--output_dir", eval_grpo, "--no_progress"], log)

    vis_dir = os.path.join(out, "vis")
    log("[infer] inspecting a few held-out images")
    inspect_dir = os.path.join(out, "inspect")
    os.makedirs(inspect_dir, exist_ok=True)
    from ppiad.data.references import build_reference_pool

    picked = pick_inspection_images(cfg)
    references = build_reference_pool(cfg, "eval", exclude=[s.path for s in build_dataset(cfg.data.eval,
                                                                                           cfg.data.object_names)])
    for s in picked:
        # A copy with a telling, unique name: the drawing is named after the image.
        image = os.path.join(inspect_dir, f"{s.category}_{s.defect_type}_{os.path.basename(s.path)}")
        shutil.copy(s.path, image)
        run_tool("infer", config_path, [*overrides, f"model.adapter={adapter}"],
                 ["--image", image, "--object", s.object_name, "--save_vis", vis_dir,
                  *[a for p in (references.draw(s) if references else []) for a in ("--reference", p)]], log)

    rows = {}
    for name, d in (("warm start (before GRPO)", eval_warm), ("after GRPO", eval_grpo)):
        with open(os.path.join(d, "metrics.json"), encoding="utf-8") as f:
            rows[name] = headline(json.load(f))
    summary = {"rows": rows, "adapter": adapter, "seconds": time.perf_counter() - t_start,
               "reports": {"warmstart": eval_warm, "grpo": eval_grpo}, "vis": vis_dir,
               "vdl": os.path.join(out, "vdl")}
    atomic_write_json(os.path.join(out, "demo_summary.json"), summary)
    log("")
    log(f"Held-out synthetic test set ({rows['after GRPO']['n']} images), percent:")
    log(summary_table(rows))
    log("")
    log(f"report and figure : {os.path.join(eval_grpo, 'report.md')}, {os.path.join(eval_grpo, 'report.png')}")
    log(f"before GRPO       : {os.path.join(eval_warm, 'report.md')}")
    log(f"visualisations    : {vis_dir}/")
    log(f"adapter           : {adapter}")
    log(f"VisualDL curves   : .venv/bin/visualdl --logdir {summary['vdl']} --host 127.0.0.1 --port 8040 "
        f"--language en --disable-telemetry   (then open http://127.0.0.1:8040)")
    log(f"total time        : {summary['seconds'] / 60:.1f} min")
    return summary
