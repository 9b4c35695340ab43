"""Records name the adapter checkpoint really used, not `checkpoints/latest`, with its content hash (fix round:
ppiad_export.json recorded `.../checkpoints/latest` unresolved and without a hash)."""
import json
import os

import numpy as np
import paddle
import pytest

from ppiad.utils.identity import adapter_fingerprint, resolve_adapter


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from ppiad.models.lora import apply_lora, save_adapter
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.models.tiny import build_tiny_checkpoint

    base = tmp_path_factory.mktemp("provenance")
    ckpt = build_tiny_checkpoint(str(base / "tiny"), seed=0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt)
    apply_lora(model, r=2, alpha=4, dropout=0.0)
    rng = np.random.default_rng(0)
    for p in model.parameters():
        if not p.stop_gradient:
            p.set_value(paddle.to_tensor(rng.normal(0, 0.05, p.shape).astype("float32")))
    checkpoints = base / "run" / "checkpoints"
    step = save_adapter(model, str(checkpoints / "step_000003"))
    (checkpoints / "latest").write_text("step_000003\n")
    return {"base": base, "ckpt": ckpt, "step": os.path.abspath(step), "latest": str(checkpoints / "latest")}


def test_resolve_adapter(run):
    assert resolve_adapter(run["latest"]) == run["step"]
    assert resolve_adapter(run["step"]) == run["step"]
    assert resolve_adapter("") == ""
    assert adapter_fingerprint(run["latest"]) == adapter_fingerprint(run["step"])


def test_export_records_the_resolved_adapter_and_its_hash(run):
    from ppiad.models.export import EXPORT_INFO, export_hf

    out = str(run["base"] / "exported")
    export_hf(run["ckpt"], run["latest"], out, dtype="float32", log=lambda m: None)
    with open(os.path.join(out, EXPORT_INFO), encoding="utf-8") as f:
        info = json.load(f)
    assert info["adapter"] == run["step"]
    assert info["adapter_sha256"] == adapter_fingerprint(run["step"]) and info["adapter_sha256"].startswith("sha256:")


def test_base_model_mismatch_is_flagged(run, tmp_path):
    from ppiad.models.tiny import build_tiny_checkpoint
    from ppiad.rl.checkpoint import TRAINER_STATE
    from ppiad.utils.identity import base_model_mismatch, model_fingerprint

    state = os.path.join(run["step"], TRAINER_STATE)
    assert base_model_mismatch(run["latest"], run["ckpt"]) is None          # nothing recorded: no claim
    with open(state, "w") as f:
        json.dump({"step": 3, "base_model_fingerprint": model_fingerprint(run["ckpt"])}, f)
    assert base_model_mismatch(run["latest"], run["ckpt"]) is None          # the same base
    other = build_tiny_checkpoint(str(tmp_path / "other"), seed=1)
    warning = base_model_mismatch(run["latest"], other)
    assert warning and run["step"] in warning and "another base model" in warning
    logs = []
    from ppiad.models.export import export_hf
    export_hf(other, run["latest"], str(tmp_path / "exp"), dtype="float32", log=logs.append)
    assert any(m.startswith("warning: ") and "another base model" in m for m in logs)
    os.remove(state)


def test_every_tool_that_loads_an_adapter_warns_on_another_base(run, tmp_path, capsys):
    """eval, infer and serve load through ModelPredictor.from_config: the warning lives there, once."""
    from ppiad.config import load_config
    from ppiad.eval.predictor import ModelPredictor
    from ppiad.models.tiny import build_tiny_checkpoint
    from ppiad.rl.checkpoint import TRAINER_STATE
    from ppiad.utils.identity import model_fingerprint

    state = os.path.join(run["step"], TRAINER_STATE)
    with open(state, "w") as f:
        json.dump({"step": 3, "base_model_fingerprint": model_fingerprint(run["ckpt"])}, f)
    try:
        for base, warned in ((run["ckpt"], False), (build_tiny_checkpoint(str(tmp_path / "other"), seed=1), True)):
            cfg = load_config(None, [f"model.path={base}", f"model.adapter={run['latest']}"])
            ModelPredictor.from_config(cfg)
            err = capsys.readouterr().err
            assert ("another base model" in err and run["step"] in err) == warned, err
    finally:
        os.remove(state)


def test_serve_names_the_checkpoint_latest_points_at(run, capsys):
    """/api/health and the start-up line say which step directory is served, not `checkpoints/latest`."""
    import socket

    from fastapi.testclient import TestClient

    from tests.conftest import load_tool
    from tests.test_app_inspection import DarkIsDefect

    with socket.socket() as s:   # a port free now (serve checks it can bind before the model loads)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = []
    assert load_tool("serve").main(["--model", run["ckpt"], "--adapter", run["latest"], "--port", str(port)],
                                   predictor_factory=lambda cfg: DarkIsDefect(),
                                   serve=lambda app, host, port: served.append(app)) == 0
    assert f"+ adapter {run['step']};" in capsys.readouterr().out
    health = TestClient(served[0]).get("/api/health").json()
    assert health["adapter"] == run["step"]
