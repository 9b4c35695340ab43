"""tools/eval.py and tools/infer.py end to end with the tiny Qwen2-VL checkpoint on a small synthetic tree."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ppiad.config import load_config
from ppiad.utils.io import read_jsonl

from tests.conftest import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ppiad.data.synthetic import generate_synthetic
    from ppiad.models.tiny import build_tiny_checkpoint

    base = tmp_path_factory.mktemp("e2e")
    ckpt = build_tiny_checkpoint(str(base / "tiny"), seed=0)
    generate_synthetic(str(base / "synth"), num_images=N_IMAGES, defect_ratio=0.25, size=112, seed=1,
                       categories=["fabric", "washer"])
    cfg = base / "cfg.yaml"
    cfg.write_text(f"run_name: e2e\noutput_dir: {base / 'output'}\nmodel:\n  path: {ckpt}\n"
                   f"data:\n  eval:\n    dataset: mvtec\n    root: {base / 'synth'}\n    split: all\n"
                   f"eval:\n  batch_size: 4\n  max_new_tokens: 6\n")
    return base, str(cfg)


def _tool(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class Counting:
    def __init__(self, inner):
        self.inner, self.images = inner, 0

    def predict(self, images, object_names):
        self.images += len(images)
        return self.inner.predict(images, object_names)


def test_eval_tool_subprocess_writes_report(setup):
    base, cfg = setup
    proc = _tool(["tools/eval.py", "-c", cfg, "--calibrate", "--no_progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = base / "output" / "e2e" / "eval_mvtec_all_tiny_base"  # the default output directory
    recs = read_jsonl(str(out / "predictions.jsonl"))
    assert len(recs) == N_IMAGES and all(r["error"] is None for r in recs)
    assert all(0.0 <= r["score"] <= 1.0 for r in recs)  # every image has P(A), even with invalid answers
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["n"] == N_IMAGES and metrics["meta"]["adapter"] == "base model"
    assert metrics["meta"]["model"].endswith("tiny") and metrics["meta"]["partition"] == "all"
    assert "calibrated" in metrics and "accuracy" in proc.stdout and "report:" in proc.stdout
    assert load_config(str(out / "config.yaml")).eval.max_new_tokens == 6


def test_eval_resume_and_adapter_in_process(setup):
    """Second run recomputes nothing; a saved LoRA adapter is loaded, merged and named in the report."""
    import paddle

    from ppiad.eval.predictor import ModelPredictor
    from ppiad.models.lora import apply_lora, save_adapter
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    base, cfg = setup
    eval_tool = load_tool("eval")
    out = str(base / "resume")
    counters = []

    def factory(c):
        counters.append(Counting(ModelPredictor.from_config(c)))
        return counters[-1]

    assert eval_tool.main(["-c", cfg, "--output_dir", out, "--no_progress"], predictor_factory=factory) == 0
    assert eval_tool.main(["-c", cfg, "--output_dir", out, "--no_progress"], predictor_factory=factory) == 0
    assert [c.images for c in counters] == [N_IMAGES, 0]

    model = Qwen2VLForConditionalGeneration.from_pretrained(load_config(cfg).model.path)
    apply_lora(model, r=2, alpha=4, dropout=0.0)
    for p in model.parameters():
        if not p.stop_gradient:  # non-zero B so the adapter changes the model
            p.set_value(paddle.full(p.shape, 0.01, p.dtype))
    adapter = save_adapter(model, str(base / "adapter"))
    out2 = str(base / "with_adapter")
    assert eval_tool.main(["-c", cfg, "-o", f"model.adapter={adapter}", "--output_dir", out2, "--no_progress"],
                          predictor_factory=factory) == 0
    meta = json.load(open(os.path.join(out2, "metrics.json")))["meta"]
    from ppiad.utils.identity import adapter_fingerprint

    assert meta["adapter"] == f"{os.path.abspath(adapter)} ({adapter_fingerprint(adapter)})"  # path + content hash
    title = json.load(open(os.path.join(out2, "metrics.json")))["title"]
    assert title.startswith(f"adapter ({adapter_fingerprint(adapter)[:19]}) on ")   # the headline names the hash
    assert counters[-1].images == N_IMAGES
    # The merged adapter changes the model: P(A) moves on every image.
    base_scores = [r["score"] for r in read_jsonl(os.path.join(out, "predictions.jsonl"))]
    lora_scores = [r["score"] for r in read_jsonl(os.path.join(out2, "predictions.jsonl"))]
    assert all(abs(a - b) > 1e-6 for a, b in zip(base_scores, lora_scores))


def test_infer_tool_subprocess(setup):
    base, cfg = setup
    img = next(str(p) for p in sorted((base / "synth").rglob("*.png")))
    proc = _tool(["tools/infer.py", "-c", cfg, "--image", img, "--object", "fabric"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verdict: " in proc.stdout and "P(defect): 0." in proc.stdout and "reasoning:" in proc.stdout
    folder = base / "folder"
    folder.mkdir()
    Image.open(img).save(folder / "a.png")
    Image.open(img).convert("L").save(folder / "b_gray.png")
    (folder / "c.png").write_bytes(b"")
    (folder / "notes.txt").write_text("x")
    proc = _tool(["tools/infer.py", "-c", cfg, "--image_dir", str(folder), "--object", "fabric", "--json",
                  "--save_vis", str(base / "vis")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [os.path.basename(x["path"]) for x in lines] == ["a.png", "b_gray.png", "c.png"]
    assert lines[0]["p_defect"] is not None and "empty" in lines[2]["error"]
    assert "1 unreadable" in proc.stderr and "1 non-image entries skipped" in proc.stderr
    assert sorted(os.listdir(base / "vis")) == ["a.png", "b_gray.png"]


def test_tools_bad_input_exit_2(setup, tmp_path, capsys):
    base, cfg = setup
    # One real process: exit code 2 and a single line, no traceback.
    proc = _tool(["tools/eval.py", "-c", cfg, "-o", f"model.path={tmp_path / 'no_such_model'}"])
    assert proc.returncode == 2 and "no_such_model" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    # The rest in-process (same main(), no interpreter start-up).
    eval_tool, infer_tool = load_tool("eval"), load_tool("infer")
    img = next(str(p) for p in sorted((base / "synth").rglob("*.png")))
    cases = [(eval_tool, ["-c", cfg, "-o", "eval.calibrat=true"], "unknown config key 'eval.calibrat'"),
             (eval_tool, ["-c", cfg, "-o", f"data.eval.root={tmp_path / 'nodata'}"], "data.eval.root"),
             (eval_tool, ["-c", cfg, "-o", "model.path="], "'model.path' is not set"),
             (eval_tool, ["-c", cfg, "--calibrate", "-o", "eval.threshold=0.5"], "use one"),
             (infer_tool, ["-c", cfg, "-o", "model.path=", "--image", img, "--object", "x"], "'model.path' is not set")]
    for tool, argv, msg in cases:
        with pytest.raises(SystemExit) as exc:
            tool.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and msg in err and err.count("\n") == 1, (argv, err)


def test_huge_and_tiny_images_fit_pixel_bounds(setup):
    """The processor behind ModelPredictor scales a huge image under max_pixels and a tiny one up to
    min_pixels; both then generate."""
    base, cfg_path = setup
    from ppiad.eval.predictor import ModelPredictor, fit_aspect

    cfg = load_config(cfg_path, ["model.max_pixels=50176", "model.min_pixels=3136", "eval.max_new_tokens=2"])
    pred = ModelPredictor.from_config(cfg)
    huge, tiny = Image.new("RGB", (3000, 2000), (90, 90, 90)), Image.new("RGB", (5, 3), (200, 10, 10))
    inputs = pred.processor.build_inputs([fit_aspect(huge), fit_aspect(tiny)], ["plate", "plate"])
    pixels = [int(t) * int(h) * int(w) * 14 * 14 for t, h, w in inputs["image_grid_thw"].numpy()]
    assert pixels[0] <= 50176 and pixels[1] >= 3136
    out = pred.predict([huge, tiny], ["plate", "plate"])
    assert len(out) == 2 and all(p.score is not None for p in out)
