"""User errors of the web app and the CLIs, reported as such: a too-long prompt (the real processor's
PromptTooLongError) is a 400 from the API, a message on the page and exit code 2 from the CLIs; a busy port stops
`ppiad serve` before the model loads; relative page folders resolve against --folder_root; a too-large upload is
reported with its real size; the demo-model note names the adapter actually used."""
import io
import json
import os
import socket

import numpy as np
import pytest
from PIL import Image

from ppiad.eval.predictor import Prediction
from ppiad.models.processor import PromptTooLongError, Qwen2VLProcessor

from tests.conftest import load_tool

LIMIT = 200  # tokens: the one-image prompt at max_pixels 12,544 fits, a 5,000-character object name does not
LONG_OBJECT = "screw " * 834  # 5,004 characters


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ppiad.models.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "tiny"), weights=False)


class ProcessorPredictor:
    """Builds the real model inputs (ppiad's processor, tiny tokenizer) and answers 'normal' without a model."""

    def __init__(self, model_dir, max_prompt_length=LIMIT):
        self.processor = Qwen2VLProcessor.from_pretrained(model_dir, max_pixels=12544,
                                                          max_prompt_length=max_prompt_length)

    def predict(self, images, object_names):
        self.processor.build_inputs(images, object_names, return_tensors="np")
        return [Prediction("<think>fine</think> <answer>B</answer>", "fine", "B", True, 0.1) for _ in images]


def _png_bytes(size=(64, 48), value=200):
    buf = io.BytesIO()
    Image.new("RGB", size, (value,) * 3).save(buf, format="PNG")
    return buf.getvalue()


def test_prompt_too_long_error_names_length_limit_and_key(tiny_dir):
    pred = ProcessorPredictor(tiny_dir)
    with pytest.raises(PromptTooLongError) as exc:
        pred.predict([Image.new("RGB", (64, 48))], [LONG_OBJECT])
    assert isinstance(exc.value, ValueError) and exc.value.limit == LIMIT and exc.value.length > LIMIT
    assert f"{exc.value.length} tokens" in str(exc.value) and f"model.max_prompt_length={LIMIT}" in str(exc.value)
    assert "\n" not in str(exc.value)


def _client(inspector, tmp_path, **info):
    from fastapi.testclient import TestClient

    from ppiad.app.server import AppInfo, build_app

    info = AppInfo(model="tiny", adapter=None, threshold=0.5, threshold_source="default", default_object="product",
                   folder_root=str(tmp_path), **info)
    return TestClient(build_app(inspector, info, work_dir=str(tmp_path)))


def test_api_answers_400_for_a_too_long_object_and_the_real_size_of_a_too_large_upload(tiny_dir, tmp_path):
    pytest.importorskip("gradio")
    pytest.importorskip("httpx")
    from ppiad.app.inspection import Inspector

    client = _client(Inspector(ProcessorPredictor(tiny_dir), max_upload_mb=1), tmp_path)
    files = {"image": ("part.png", _png_bytes(), "image/png")}
    r = client.post("/api/inspect", files=files, data={"object": LONG_OBJECT})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert f"model.max_prompt_length={LIMIT}" in error and "tokens" in error and "\n" not in error
    # the server keeps serving, and a normal object name works
    r = client.post("/api/inspect", files=files, data={"object": "screw"})
    assert r.status_code == 200 and r.json()["verdict"] == "normal"
    # 3 MB against a 1 MB limit: the message names 3.0 MB, not the limit + 1 byte that was read
    big = b"\x89PNG" + b"\0" * 3_000_000
    r = client.post("/api/inspect", files={"image": ("huge.png", big, "image/png")})
    assert r.status_code == 400 and "'huge.png' is too large: 3.0 MB, the limit is 1.0 MB" in r.json()["error"]


def test_api_answers_400_for_an_image_the_processor_refuses(tmp_path):
    pytest.importorskip("gradio")
    pytest.importorskip("httpx")
    from ppiad.app.inspection import Inspector

    class Refuses:
        def predict(self, images, object_names):
            raise ValueError("image size 1x9000: aspect ratio too high")

    r = _client(Inspector(Refuses()), tmp_path).post("/api/inspect",
                                                     files={"image": ("a.png", _png_bytes(), "image/png")})
    assert r.status_code == 400 and "aspect ratio" in r.json()["error"]


def test_page_shows_the_too_long_message(tiny_dir, tmp_path):
    pytest.importorskip("gradio")
    from ppiad.app.inspection import Inspector
    from ppiad.app.server import AppInfo, Page, _guard

    img = tmp_path / "a.png"
    img.write_bytes(_png_bytes())
    info = AppInfo(model="tiny", adapter=None, threshold=0.5, threshold_source="default", default_object="product",
                   folder_root=str(tmp_path))
    out = _guard(Page(Inspector(ProcessorPredictor(tiny_dir)), info, str(tmp_path)).run, 5)([str(img)], "",
                                                                                            LONG_OBJECT, 0.5)
    summary = out[1]
    assert f"model.max_prompt_length={LIMIT}" in summary and "PromptTooLongError" not in summary


def test_infer_with_a_too_long_object_exits_2_with_one_line(tiny_dir, tmp_path, capsys):
    infer = load_tool("infer")
    img = tmp_path / "a.png"
    img.write_bytes(_png_bytes())
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  path: {tiny_dir}\n  max_prompt_length: {LIMIT}\n")
    try:
        code = infer.main(["-c", str(cfg), "--image", str(img), "--object", LONG_OBJECT],
                          predictor_factory=lambda c: ProcessorPredictor(tiny_dir, c.model.max_prompt_length))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and f"model.max_prompt_length={LIMIT}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_relative_page_folder_resolves_against_folder_root(tmp_path, monkeypatch):
    from ppiad.app.inspection import InputError
    from ppiad.app.server import list_server_folder

    root = tmp_path / "fd"
    (root / "widget" / "good").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "widget" / "good" / "a.png")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    paths, skipped = list_server_folder("widget/good", str(root), 10)
    assert paths == [os.path.join(os.path.realpath(root), "widget", "good", "a.png")] and skipped == 0
    with pytest.raises(InputError, match="outside the folder"):
        list_server_folder("../cwd", str(root), 10)


def test_serve_on_a_busy_port_exits_2_before_the_model_loads(tmp_path, capsys):
    serve = load_tool("serve")
    loaded, served = [], []
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            serve.main(["--model", str(tmp_path), "--port", str(port)],
                       predictor_factory=lambda cfg: loaded.append(cfg), serve=lambda *a: served.append(a))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"cannot serve on 127.0.0.1:{port}" in err and "another --port" in err
    assert len(err.strip().splitlines()) == 1
    assert not loaded and not served


def test_demo_model_note_names_the_adapter_used(tmp_path, monkeypatch, capsys):
    import argparse

    from ppiad.utils.cli import DEMO_SUMMARY, config_from_args

    monkeypatch.chdir(tmp_path)
    report = tmp_path / "output" / "demo" / "eval_grpo"
    report.mkdir(parents=True)
    (report / "config.yaml").write_text("model:\n  path: tiny\n")
    demo_adapter = tmp_path / "output" / "demo" / "checkpoints" / "step_000010"
    demo_adapter.mkdir(parents=True)
    with open(DEMO_SUMMARY, "w") as f:
        json.dump({"reports": {"grpo": str(report)}, "adapter": str(demo_adapter)}, f)
    args = argparse.Namespace(config=None, opt=[], model=None, adapter="mine/step_000005")
    cfg = config_from_args(args, default_model=True)
    err = capsys.readouterr().err
    assert cfg.model.adapter == "mine/step_000005"
    assert "demo's model with another adapter (tiny + adapter mine/step_000005," in err and str(demo_adapter) not in err
    args.adapter = None
    cfg = config_from_args(args, default_model=True)
    err = capsys.readouterr().err
    assert cfg.model.adapter == str(demo_adapter) and f"demo's trained model (tiny + adapter {demo_adapter}," in err


def test_help_texts_say_what_the_commands_do():
    demo, mmad = load_tool("demo"), load_tool("mmad")
    assert demo.__doc__.startswith("Train and evaluate LR-IAD end to end")
    assert "<model dir>_<adapter name>-" in mmad.build_parser().format_help()
