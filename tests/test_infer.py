"""tools/infer.py on awkward inputs, with a stand-in predictor (the model-backed run is in test_eval_tool.py)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ppiad.eval.predictor import Prediction, fit_aspect

from tests.conftest import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


infer = load_tool("infer")


class FakePredictor:
    """Says 'defect' for dark images; remembers what it was given."""

    def __init__(self):
        self.seen = []

    def predict(self, images, object_names):
        out = []
        for im, name in zip(images, object_names):
            self.seen.append((im.mode, im.size, name))
            dark = float(np.asarray(im).mean()) < 128
            out.append(Prediction(completion=f"<think>looks {'dark' if dark else 'fine'}</think> "
                                             f"<answer>{'A' if dark else 'B'}</answer>",
                                  think=f"looks {'dark' if dark else 'fine'}", answer="A" if dark else "B",
                                  valid_format=True, score=0.9 if dark else 0.1))
        return out


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model:\n  path: {tmp_path / 'no_model_needed'}\neval:\n  batch_size: 2\n")
    return str(path)


def run(argv, predictor=None):
    """(exit code, predictor) of tools/infer.py main with a stand-in model."""
    predictor = predictor or FakePredictor()
    try:
        code = infer.main(argv, predictor_factory=lambda cfg: predictor)
    except SystemExit as exc:
        code = exc.code
    return code, predictor


def _png(path, mode="RGB", size=(40, 30), value=200):
    if mode in ("L", "I;16"):
        Image.new(mode, size, value).save(path)
    else:
        Image.new(mode, size, (value,) * len(mode)).save(path)
    return str(path)


def test_single_image_prints_verdict_score_reasoning(tmp_path, cfg_file, capsys):
    img = _png(tmp_path / "part.png", value=30)
    code, pred = run(["-c", cfg_file, "--image", img, "--object", "metal_washer"])
    out = capsys.readouterr().out
    assert code == 0
    assert "verdict: defect" in out and "P(defect): 0.900" in out and "reasoning: looks dark" in out
    assert pred.seen == [("RGB", (40, 30), "metal washer")]  # underscores read as spaces, as for categories


@pytest.mark.parametrize("mode,value", [("L", 40), ("RGBA", 40), ("I;16", 60000)])
def test_grayscale_rgba_16bit_arrive_as_8bit_rgb(tmp_path, cfg_file, capsys, mode, value):
    img = _png(tmp_path / f"x_{mode.replace(';', '')}.png", mode=mode, value=value)
    code, pred = run(["-c", cfg_file, "--image", img, "--object", "pill"])
    assert code == 0
    assert pred.seen[0][0] == "RGB"
    # Dark gray stays dark; a mostly transparent dark RGBA is composited over white (bright); 16-bit
    # 60000/65535 is scaled to bright 8-bit, not clipped.
    expected = {"L": "defect", "RGBA": "normal", "I;16": "normal"}[mode]
    assert f"verdict: {expected}" in capsys.readouterr().out


@pytest.mark.parametrize("content,reason", [(b"", "empty (0 bytes)"), (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "corrupt or truncated"),
                                            (b"hello, not an image", "not a recognised image format")])
def test_bad_single_image_exits_2_with_reason(tmp_path, cfg_file, capsys, content, reason):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    code, pred = run(["-c", cfg_file, "--image", str(bad), "--object", "pill"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and reason in err and "bad.png" in err and err.count("\n") == 1
    assert pred.seen == []


def test_truncated_png_exits_2(tmp_path, cfg_file, capsys):
    good = _png(tmp_path / "good.png", size=(64, 64))
    data = open(good, "rb").read()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    code, _ = run(["-c", cfg_file, "--image", str(tmp_path / "cut.png"), "--object", "pill"])
    assert code == 2 and "cut.png" in capsys.readouterr().err


def test_missing_image_and_missing_object(tmp_path, cfg_file, capsys):
    code, _ = run(["-c", cfg_file, "--image", str(tmp_path / "nope.png"), "--object", "pill"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    # Without --object the prompt names a generic 'product' (the config has no single eval category), and says so.
    img = _png(tmp_path / "a.png")
    code, predictor = run(["-c", cfg_file, "--image", img])
    assert code == 0 and predictor.seen[0][2] == "product"
    assert "no --object given: the prompt names the object 'product'" in capsys.readouterr().err
    code, predictor = run(["-c", cfg_file, "-o", "data.eval.categories=[metal_nut]", "--image", img])
    assert code == 0 and predictor.seen[0][2] == "metal nut"


def test_unreadable_permissions(tmp_path, cfg_file, capsys):
    img = _png(tmp_path / "locked.png")
    os.chmod(img, 0)
    try:
        if os.access(img, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        code, _ = run(["-c", cfg_file, "--image", img, "--object", "pill"])
        assert code == 2 and "permission denied" in capsys.readouterr().err
    finally:
        os.chmod(img, 0o644)


def test_unknown_override_key_exits_2(tmp_path, cfg_file, capsys):
    img = _png(tmp_path / "a.png")
    code, _ = run(["-c", cfg_file, "-o", "eval.batch_sise=3", "--image", img, "--object", "pill"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown config key 'eval.batch_sise'" in err and "batch_size" in err


def test_missing_model_path_exits_2(tmp_path, capsys):
    img = _png(tmp_path / "a.png")
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("eval:\n  batch_size: 1\n")
    try:
        code = infer.main(["-c", str(cfg), "--image", img, "--object", "pill"])  # the real model loader
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "model.path" in capsys.readouterr().err
    try:
        code = infer.main(["-c", str(cfg), "-o", f"model.path={tmp_path / 'gone'}", "--image", img,
                           "--object", "pill"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "gone" in err and "not a directory" in err


def test_folder_skips_non_images_and_reports_corrupt_files(tmp_path, cfg_file, capsys):
    d = tmp_path / "fabric_roll"
    d.mkdir()
    _png(d / "a_dark.png", value=20)
    _png(d / "b_light.jpg", value=230)
    _png(d / "c_gray.png", mode="L", value=10)
    (d / "d_zero.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / "subdir").mkdir()
    code, pred = run(["-c", cfg_file, "--image_dir", str(d), "--json"])
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert code == 0
    assert [os.path.basename(x["path"]) for x in lines] == ["a_dark.png", "b_light.jpg", "c_gray.png", "d_zero.png"]
    assert [x["verdict"] for x in lines] == ["defect", "normal", "defect", None]
    assert "empty (0 bytes)" in lines[3]["error"]
    assert {name for _, _, name in pred.seen} == {"fabric roll"}  # folder name, underscores as spaces
    assert "3 images" not in captured.err and "4 images: 2 defect, 1 normal" in captured.err
    assert "1 unreadable" in captured.err and "2 non-image entries skipped" in captured.err


def test_folder_text_mode_and_object_flag(tmp_path, cfg_file, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    _png(d / "x.png", value=20)
    code, pred = run(["-c", cfg_file, "--image_dir", str(d), "--object", "screw"])
    out = capsys.readouterr().out
    assert code == 0 and "x.png: defect  P(defect)=0.900" in out and "summary: 1 images" in out
    assert pred.seen[0][2] == "screw"


def test_empty_folder_and_folder_of_only_broken_images(tmp_path, cfg_file, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "readme.md").write_text("x")
    code, _ = run(["-c", cfg_file, "--image_dir", str(d)])
    assert code == 2 and "no image files" in capsys.readouterr().err
    (d / "broken.png").write_bytes(b"garbage")
    code, _ = run(["-c", cfg_file, "--image_dir", str(d)])
    assert code == 2 and "none of the 1 images" in capsys.readouterr().err
    code, _ = run(["-c", cfg_file, "--image_dir", str(tmp_path / "nowhere")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_save_vis_writes_png_per_image(tmp_path, cfg_file, capsys):
    d = tmp_path / "cap"
    d.mkdir()
    _png(d / "one.jpg", value=20, size=(300, 100))  # listed first: one.jpg < one.png
    _png(d / "one.png", value=220)
    vis = tmp_path / "vis"
    code, _ = run(["-c", cfg_file, "--image_dir", str(d), "--save_vis", str(vis)])
    assert code == 0
    files = sorted(os.listdir(vis))
    assert files == ["one.png", "one_1.png"]
    with Image.open(vis / "one.png") as im:
        assert im.format == "PNG" and im.width > 448  # image plus the text panel beside it
        # The verdict bar is drawn in the defect colour right of the image.
        assert im.convert("RGB").getpixel((450, 5)) == (200, 30, 30)


def test_huge_and_tiny_images_reach_the_predictor_unchanged(tmp_path, cfg_file):
    """Loading keeps sizes; fitting into [min_pixels, max_pixels] is the processor's job (tested with the
    tiny checkpoint in test_eval_tool.py). Only extreme aspect ratios are padded before the processor."""
    huge = _png(tmp_path / "huge.png", size=(4000, 3000))
    tiny = _png(tmp_path / "tiny.png", size=(3, 2))
    for img, size in ((huge, (4000, 3000)), (tiny, (3, 2))):
        code, pred = run(["-c", cfg_file, "--image", img, "--object", "pill"])
        assert code == 0 and pred.seen[0][1] == size
    strip = fit_aspect(Image.new("RGB", (5000, 10)))
    assert strip.size == (5000, 25) and max(strip.size) / min(strip.size) <= 200
    same = Image.new("RGB", (50, 40))
    assert fit_aspect(same) is same


def test_fixed_threshold_overrides_the_letter(tmp_path, cfg_file, capsys):
    img = _png(tmp_path / "dark.png", value=30)  # the fake answers A with P(A) = 0.9
    code, _ = run(["-c", cfg_file, "-o", "eval.threshold=0.95", "--image", img, "--object", "pill"])
    assert code == 0 and "verdict: normal (P(defect) < threshold 0.9500)" in capsys.readouterr().out
    code, _ = run(["-c", cfg_file, "-o", "eval.threshold=0.5", "--image_dir", str(tmp_path), "--json"])
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert code == 0 and line["verdict"] == "defect" and line["threshold"] == 0.5 and line["answer"] == "A"
    code, _ = run(["-c", cfg_file, "-o", "eval.threshold=5", "--image", img, "--object", "pill"])
    assert code == 2 and "probability" in capsys.readouterr().err


def test_decompression_bomb_is_reported_not_a_crash(tmp_path, cfg_file, capsys, monkeypatch):
    d = tmp_path / "big"
    d.mkdir()
    _png(d / "a_huge.png", size=(200, 100))
    _png(d / "b_ok.png", size=(20, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 20,000 px > 2 x 5,000: PIL refuses to decode
    code, pred = run(["-c", cfg_file, "--image_dir", str(d), "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert code == 0 and "too large to decode safely" in lines[0]["error"] and lines[1]["verdict"] == "normal"
    code, _ = run(["-c", cfg_file, "--image", str(d / "a_huge.png"), "--object", "x"])
    assert code == 2 and "too large" in capsys.readouterr().err
