"""The demo pipeline on its minimal budget with 1-shot prompts (issue 17: `make demo -o prompt.reference_images=1`):
warm start, both evaluations, GRPO and tools/infer.py --reference all run with one normal reference per prompt."""
import json
import os
import subprocess
import sys

from tests.test_demo import ROOT, small_overrides


def test_demo_runs_end_to_end_one_shot(tmp_path):
    cmd = [sys.executable, "tools/demo.py", "-o", *small_overrides(tmp_path), "prompt.reference_images=1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "output" / "demo"
    train_root = str(tmp_path / "data" / "train")
    for name in ("eval_warmstart", "eval_grpo"):
        recs = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert len(recs) == 10
        assert all(len(r["references"]) == 1 and r["references"][0].startswith(train_root) for r in recs)
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["reference_images"] == 1 and metrics["reference_pool"]["pool"] == "normal images of data.train"
    assert len([f for f in os.listdir(out / "vis") if f.endswith(".png")]) == 2   # infer ran with --reference
    assert "k-shot prompts: 1 reference image(s) per prompt" in result.stdout + result.stderr
