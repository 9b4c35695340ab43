"""Evaluation identity (issue 12, item 1): a re-run never mixes predictions of another model, adapter or setting;
the default output folder names the model and adapter."""
import json
import os

import paddle
import pytest

from ppiad.config import load_config
from ppiad.utils.identity import (IdentityError, check_identity, differing_keys, file_fingerprint,
                                  model_fingerprint, write_identity)
from ppiad.utils.io import read_jsonl

from tests.conftest import load_tool
from tests.test_eval_tool import N_IMAGES, Counting, setup  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def adapter(setup):  # noqa: F811
    from ppiad.models.lora import apply_lora, save_adapter
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    base, cfg = setup
    model = Qwen2VLForConditionalGeneration.from_pretrained(load_config(cfg).model.path)
    apply_lora(model, r=2, alpha=4, dropout=0.0)
    for p in model.parameters():
        if not p.stop_gradient:  # non-zero B: the adapter changes every answer score
            p.set_value(paddle.full(p.shape, 0.01, p.dtype))
    return save_adapter(model, str(base / "identity_adapter" / "final"))


def _factory(counters):
    from ppiad.eval.predictor import ModelPredictor

    def make(c):
        counters.append(Counting(ModelPredictor.from_config(c)))
        return counters[-1]
    return make


def test_issue_example_adapter_then_base_into_the_default_folder(setup, adapter, tmp_path):  # noqa: F811
    """The README's commands: eval with the adapter, then `-o model.adapter=` for the base model. The second
    run used to predict nothing and report the adapter's answers under the base model's name."""
    base, cfg = setup
    eval_tool = load_tool("eval")
    counters = []
    common = ["-c", cfg, "-o", f"output_dir={tmp_path}", "--no_progress"]
    assert eval_tool.main(common + ["-o", f"model.adapter={adapter}"], predictor_factory=_factory(counters)) == 0
    assert eval_tool.main(common + ["-o", "model.adapter="], predictor_factory=_factory(counters)) == 0
    assert [c.images for c in counters] == [N_IMAGES, N_IMAGES]   # the base model predicted every image itself
    folders = sorted(os.listdir(tmp_path / "e2e"))
    assert len(folders) == 2 and "eval_mvtec_all_tiny_base" in folders
    with_adapter = next(f for f in folders if f != "eval_mvtec_all_tiny_base")
    assert with_adapter.startswith("eval_mvtec_all_tiny_final-")
    scores = {f: [r["score"] for r in read_jsonl(str(tmp_path / "e2e" / f / "predictions.jsonl"))] for f in folders}
    assert all(abs(a - b) > 1e-6 for a, b in zip(*scores.values()))
    meta = json.loads((tmp_path / "e2e" / "eval_mvtec_all_tiny_base" / "metrics.json").read_text())["meta"]
    assert meta["adapter"] == "base model"
    ident = json.loads((tmp_path / "e2e" / "eval_mvtec_all_tiny_base" / "identity.json").read_text())
    assert ident["model.adapter"] == "none" and meta["identity"].endswith("(identity.json)")
    # each folder resumes itself: nothing is predicted again
    assert eval_tool.main(common + ["-o", f"model.adapter={adapter}"], predictor_factory=_factory(counters)) == 0
    assert counters[-1].images == 0


def _exit2(eval_tool, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        eval_tool.main(argv, predictor_factory=lambda c: pytest.fail("the model must not be loaded"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    return err


def test_differing_rerun_into_the_same_folder_exits_2_naming_the_keys(setup, adapter, tmp_path, capsys):  # noqa: F811
    base, cfg = setup
    eval_tool = load_tool("eval")
    out = str(tmp_path / "same")
    counters = []
    argv = ["-c", cfg, "--output_dir", out, "--no_progress"]
    assert eval_tool.main(argv + ["-o", f"model.adapter={adapter}"], predictor_factory=_factory(counters)) == 0
    before = (tmp_path / "same" / "predictions.jsonl").read_text()
    err = _exit2(eval_tool, argv, capsys)   # the base model into the adapter's folder
    assert "holds predictions made with other settings (differing: model.adapter);" in err
    err = _exit2(eval_tool, argv + ["-o", f"model.adapter={adapter}", "eval.max_new_tokens=7", "model.max_pixels=6272"],
                 capsys)
    assert "(differing: eval.max_new_tokens, model.max_pixels)" in err
    err = _exit2(eval_tool, argv + ["-o", f"model.adapter={adapter}", "eval.do_sample=true"], capsys)
    assert "eval.do_sample" in err and "seed" in err and "eval.temperature" in err
    assert (tmp_path / "same" / "predictions.jsonl").read_text() == before   # nothing lost or appended


def test_older_folder_without_identity_is_refused(setup, tmp_path, capsys):  # noqa: F811
    base, cfg = setup
    out = tmp_path / "old"
    out.mkdir()
    (out / "predictions.jsonl").write_text('{"path": "x"}\n')
    err = _exit2(load_tool("eval"), ["-c", cfg, "--output_dir", str(out)], capsys)
    assert "without identity.json" in err


def test_changed_weights_change_the_fingerprint(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    big = bytearray(os.urandom(5 << 20))
    (d / "model.safetensors").write_bytes(bytes(big))
    (d / "README.md").write_text("not part of it")
    first = model_fingerprint(str(d))
    (d / "README.md").write_text("edited")
    assert model_fingerprint(str(d)) == first
    big[(5 << 20) // 2] ^= 1   # one bit in the middle sample
    (d / "model.safetensors").write_bytes(bytes(big))
    assert model_fingerprint(str(d)) != first
    small = tmp_path / "s.bin"
    small.write_bytes(b"abc")
    assert file_fingerprint(str(small)) != file_fingerprint(str(d / "config.json"))


def test_check_identity_helpers(tmp_path):
    assert differing_keys({"a": 1, "b": [1]}, {"a": 1, "b": (1,), "c": 0}) == ["b", "c"]
    assert check_identity(str(tmp_path / "new"), {"a": 1}, "x", "hint") is False
    write_identity(str(tmp_path), {"a": 1, "b": (1, 2)})
    assert check_identity(str(tmp_path), {"a": 1, "b": (1, 2)}, "x", "hint") is True
    with pytest.raises(IdentityError, match=r"differing: b\); hint"):
        check_identity(str(tmp_path), {"a": 1, "b": (2, 2)}, "x", "hint")
