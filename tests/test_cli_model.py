"""Naming the model on the command line: --model / --adapter, and the demo's trained model as the default.

The user's own command `python tools/infer.py --image part.png` (no -c) must either use the model `make demo`
trained in this directory, saying so, or stop with one line saying how to name a model.
"""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ppiad.eval.predictor import Prediction
from ppiad.utils.cli import DEMO_SUMMARY

from tests.conftest import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
infer = load_tool("infer")
eval_tool = load_tool("eval")


class Recorder:
    """A predictor factory that keeps the config it was given and answers 'normal'."""

    def __init__(self):
        self.cfg = None

    def __call__(self, cfg):
        self.cfg = cfg
        return self

    def predict(self, images, object_names):
        return [Prediction("<think>ok</think> <answer>B</answer>", "ok", "B", True, 0.2) for _ in images]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "part.png"
    Image.new("RGB", (64, 48), (90, 90, 90)).save(path)
    return str(path)


def _exit_code(fn):
    try:
        return fn()
    except SystemExit as exc:
        return exc.code


def test_no_model_named_exits_2_with_one_line(tmp_path, image):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "infer.py"), "--image", image],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "no model named" in err and "--model DIR" in err and "make demo" in err


def test_model_and_adapter_shortcuts(tmp_path, image, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rec = Recorder()
    code = _exit_code(lambda: infer.main(["--model", "models/qwen", "--adapter", "runs/a/checkpoints/latest",
                                          "--image", image, "--object", "gear"], predictor_factory=rec))
    assert code == 0
    assert rec.cfg.model.path == "models/qwen" and rec.cfg.model.adapter == "runs/a/checkpoints/latest"
    # The shortcut wins over the same key given in -c / -o.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: from_yaml\n  adapter: from_yaml\n")
    code = _exit_code(lambda: infer.main(["-c", str(cfg), "-o", "model.adapter=from_o", "--adapter", "flag",
                                          "--image", image, "--object", "gear"], predictor_factory=rec))
    assert code == 0 and rec.cfg.model.path == "from_yaml" and rec.cfg.model.adapter == "flag"


def test_eval_takes_the_shortcuts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _exit_code(lambda: eval_tool.main(["--model", "models/qwen"], predictor_factory=Recorder()))
    # The config was built from --model alone: what is missing next is the data, not the model.
    assert code == 2 and "'data.eval.root' is not set" in capsys.readouterr().err


def _fake_demo(tmp_path):
    """What `make demo` leaves behind, as far as the default model needs it."""
    report = tmp_path / "output" / "demo" / "eval_grpo"
    report.mkdir(parents=True)
    adapter = tmp_path / "output" / "demo" / "checkpoints" / "step_000300"
    adapter.mkdir(parents=True)
    (report / "config.yaml").write_text("model:\n  path: output/demo/model_warmstart\n  adapter: ''\n"
                                        "data:\n  eval: {dataset: mvtec, root: output/demo/data/heldout}\n")
    summary = {"adapter": str(adapter.relative_to(tmp_path)), "reports": {"grpo": "output/demo/eval_grpo"}}
    (tmp_path / DEMO_SUMMARY).write_text(json.dumps(summary))
    return summary["adapter"]


def test_the_demo_model_is_the_default(tmp_path, image, monkeypatch, capsys):
    adapter = _fake_demo(tmp_path)
    monkeypatch.chdir(tmp_path)
    rec = Recorder()
    assert _exit_code(lambda: infer.main(["--image", image], predictor_factory=rec)) == 0
    assert rec.cfg.model.path == "output/demo/model_warmstart" and rec.cfg.model.adapter == adapter
    captured = capsys.readouterr()
    assert "using the demo's trained model" in captured.err and adapter in captured.err
    assert "verdict: normal" in captured.out
    # --adapter still applies on top of the demo's config (e.g. an earlier checkpoint).
    assert _exit_code(lambda: infer.main(["--image", image, "--adapter", "other"], predictor_factory=rec)) == 0
    assert rec.cfg.model.adapter == "other"


def test_a_demo_whose_files_are_gone_is_named(tmp_path, image, monkeypatch, capsys):
    adapter = _fake_demo(tmp_path)
    os.rmdir(tmp_path / adapter)
    monkeypatch.chdir(tmp_path)
    assert _exit_code(lambda: infer.main(["--image", image], predictor_factory=Recorder())) == 2
    err = capsys.readouterr().err
    assert "is gone" in err and adapter in err
