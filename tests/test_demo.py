"""The demo pipeline end to end on a minimal budget (the full run is `make demo`), and its pieces."""
import json
import os
import random
import subprocess
import sys

from ppiad.config import load_config
from ppiad.demo.pipeline import headline, pick_inspection_images, prepare_data
from ppiad.demo.warmstart import format_only_completion
from ppiad.prompt import parse_completion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_overrides(tmp):
    return [f"output_dir={tmp}/output", f"data.train.root={tmp}/data/train", f"data.eval.root={tmp}/data/heldout",
            f"model.path={tmp}/model_warmstart", "demo.train_images=24", "demo.test_images=10",
            "demo.hidden_size=32", "demo.layers=1", "demo.vision_embed_dim=32", "demo.warmstart_steps=2",
            "demo.warmstart_batch_size=2", "demo.infer_images=2", "train.max_steps=2", "train.save_every=1",
            "train.prompts_per_device=1", "grpo.max_new_tokens=6", "eval.max_new_tokens=6", "eval.batch_size=8"]


def test_warmstart_targets_are_formatted_and_carry_no_label():
    rng = random.Random(0)
    completions = [format_only_completion("metal plate", rng) for _ in range(400)]
    parsed = [parse_completion(c) for c in completions]
    assert all(p.strict for p in parsed)
    share_a = sum(p.answer == "A" for p in parsed) / len(parsed)
    assert 0.4 < share_a < 0.6  # the answer is a coin flip: nothing to learn about the image here
    assert len({p.think for p in parsed}) == 1  # one generic sentence, the same whatever the image


def test_inspection_images_mix_defects_and_normals(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), small_overrides(tmp_path) + ["demo.infer_images=4", "demo.test_images=60"])
    prepare_data(cfg, log=lambda m: None)
    picked = pick_inspection_images(cfg)
    assert len(picked) == 4
    assert [s.is_defect for s in picked] == [True, False, True, False]
    assert len({s.category for s in picked}) >= 3


def test_demo_generates_only_the_configured_categories(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      small_overrides(tmp_path) + ["demo.categories=[fabric, pill]"])
    prepare_data(cfg, log=lambda m: None)
    for root in (cfg.data.train.root, cfg.data.eval.root):
        assert sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) == ["fabric", "pill"]


def test_headline_false_alarm_rate():
    metrics = {"overall": {"confusion": [[8, 2], [1, 3]], "f1_macro": 0.7, "accuracy": 11 / 14,
                           "recall": {"defect": 0.75, "normal": 0.8}, "invalid_rate": 0.0, "auroc": None, "n": 14}}
    h = headline(metrics)
    assert h["false_alarm_rate"] == 0.2 and h["defect_recall"] == 0.75


def test_demo_runs_end_to_end(tmp_path):
    cmd = [sys.executable, "tools/demo.py", "-o", *small_overrides(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "output" / "demo"
    summary = json.loads((out / "demo_summary.json").read_text())
    for row in summary["rows"].values():
        assert 0.0 <= row["f1_macro"] <= 1.0 and row["n"] == 10
    for name in ("eval_warmstart", "eval_grpo"):
        lines = (out / name / "predictions.jsonl").read_text().strip().splitlines()
        assert len(lines) == 10
        assert (out / name / "report.png").exists()
    assert len([f for f in os.listdir(out / "vis") if f.endswith(".png")]) == 2
    assert os.listdir(out / "vdl")
    assert "after GRPO" in result.stdout and "visualdl --logdir" in result.stdout

    # A second run finds every stage done and redoes no training step.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "exists, kept" in again.stdout
