"""ppiad export: the merged Hugging Face-format folder and the adapter folder, checked by transformers 4.51.3 + PEFT.

tests/ref/export_reference.py runs in the reference virtualenv (torch + transformers 4.51.3 + peft): it loads
the exported folders with AutoProcessor / Qwen2VLForConditionalGeneration.from_pretrained as they are, and the
base + ppiad's adapter folder with peft.PeftModel.from_pretrained, on one 640x480 image. Here ppiad, with the
adapter NOT merged, must give the same logits within 1e-4. The adapter adapts a vision-tower layer too, so the
regex form of target_modules is what PEFT reads.
"""
import json
import os
import subprocess

import numpy as np
import paddle
import pytest
from PIL import Image

from tests import conftest
from tests.conftest import load_tool

REF_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref", "export_reference.py")
TOL = 1e-4
TARGETS = ["q_proj", "v_proj", r"visual\.blocks\.\d+\.attn\.qkv"]


def _run_export(argv):
    try:
        return load_tool("export").main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ppiad.models.lora import apply_lora, lora_layers, save_adapter
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.models.tiny import build_tiny_checkpoint
    from ppiad.prompt import build_prompt

    ref_python = conftest.require_ref_python()
    base = tmp_path_factory.mktemp("export")
    ckpt = build_tiny_checkpoint(str(base / "tiny"), seed=0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt)
    apply_lora(model, r=4, alpha=16, dropout=0.0, target_modules=TARGETS)
    rng = np.random.default_rng(0)
    for p in model.parameters():
        if not p.stop_gradient:  # B != 0 so the adapter changes the logits
            p.set_value(paddle.to_tensor(rng.normal(0, 0.05, p.shape).astype("float32")))
    adapter = save_adapter(model, str(base / "adapter"))
    n_layers = len(lora_layers(model))
    out32, out16 = str(base / "out_f32"), str(base / "out_bf16")
    assert _run_export(["--model", ckpt, "--adapter", adapter, "--output", out32, "--dtype", "float32",
                        "--max_shard_size", "200KB"]) == 0
    assert _run_export(["--model", ckpt, "--adapter", adapter, "--output", out16]) == 0  # bfloat16, one file
    image = str(base / "part.png")
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(image)
    spec = {"exported": [out32, out16], "base": ckpt, "adapter": adapter, "image": image,
            "prompt": build_prompt("fabric")}
    (base / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([ref_python, REF_SCRIPT, str(base / "spec.json"), str(base / "ref.npz")],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"reference script failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    ref = dict(np.load(base / "ref.npz"))
    ref["meta"] = json.loads(str(ref["meta"]))
    return {"base": base, "ckpt": ckpt, "adapter": adapter, "model": model, "n_layers": n_layers,
            "out32": out32, "out16": out16, "image": image, "ref": ref}


def _logits(model, ref):
    inputs = {k: paddle.to_tensor(ref[k]) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    with paddle.no_grad():
        return model(**inputs).logits.numpy()[0]


def test_the_folder_holds_what_transformers_needs(exported):
    files = set(os.listdir(exported["out32"]))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "chat_template.json", "generation_config.json", "ppiad_export.json"} <= files
    shards = sorted(f for f in files if f.startswith("model-"))
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.load(open(os.path.join(exported["out32"], "model.safetensors.index.json")))
    assert sorted(set(index["weight_map"].values())) == shards
    assert "model.safetensors" in os.listdir(exported["out16"])  # under 5GB: one file
    assert json.load(open(os.path.join(exported["out16"], "config.json")))["torch_dtype"] == "bfloat16"
    assert exported["ref"]["meta"]["dtypes"] == ["torch.float32", "torch.bfloat16"]
    info = json.load(open(os.path.join(exported["out16"], "ppiad_export.json")))
    assert info["adapter"] == os.path.abspath(exported["adapter"]) and info["merged_in"] == "float32"


def test_transformers_and_peft_match_ppiad_with_adapter(exported):
    ref = exported["ref"]
    assert ref["image_grid_thw"].tolist() == [[1, 34, 46]]  # the 640x480 image at full size
    ours = _logits(exported["model"], ref)  # ppiad, adapter applied on the fly (not merged)
    assert ours.shape == ref["logits_0"].shape
    np.testing.assert_allclose(ref["logits_0"], ours, atol=TOL, rtol=0)      # transformers on the merged export
    np.testing.assert_allclose(ref["logits_peft"], ours, atol=TOL, rtol=0)   # transformers + PEFT on the adapter
    assert ref["meta"]["peft_adapted_layers"] == exported["n_layers"]          # PEFT adapted every layer ppiad did
    # The adapter matters at this tolerance: the base alone is far off.
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    base = _logits(Qwen2VLForConditionalGeneration.from_pretrained(exported["ckpt"]), ref)
    assert np.abs(base - ours).max() > 100 * TOL


def test_bfloat16_export_is_the_rounded_merge(exported):
    """Both libraries widen the same bf16 weights to float32: equal logits; and bf16 differs from float32."""
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    ref = exported["ref"]
    ours16 = _logits(Qwen2VLForConditionalGeneration.from_pretrained(exported["out16"]), ref)
    np.testing.assert_allclose(ref["logits_1"], ours16, atol=TOL, rtol=0)
    assert np.abs(ours16 - ref["logits_0"]).max() > TOL


def test_ppiad_reads_the_export_with_the_same_prompt(exported):
    """The exported processor files give ppiad's processor the very inputs transformers built."""
    from ppiad.models.processor import Qwen2VLProcessor

    ref = exported["ref"]
    proc = Qwen2VLProcessor.from_pretrained(exported["out32"])
    inputs = proc.build_inputs([Image.open(exported["image"]).convert("RGB")], ["fabric"], return_tensors="np")
    np.testing.assert_array_equal(np.asarray(inputs["input_ids"]), ref["input_ids"])
    np.testing.assert_allclose(np.asarray(inputs["pixel_values"]), ref["pixel_values"], atol=1e-5, rtol=0)


def test_export_refuses_bad_input(exported, tmp_path, capsys):
    cases = [(["--model", exported["ckpt"], "--output", exported["out32"]], "exists and is not empty"),
             (["--model", exported["ckpt"], "--output", str(tmp_path / "x"), "--max_shard_size", "big"],
              "is not a size"),
             (["--model", exported["ckpt"], "--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "y")],
              "does not exist"),
             (["--model", str(tmp_path), "--output", str(tmp_path / "z")], "no config.json"),
             (["--output", str(tmp_path / "w")], "'model.path' is not set")]
    for argv, msg in cases:
        assert _run_export(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and err.count("\n") == 0, err
    assert not any(n.startswith(("x", "y", "z", "w", ".")) for n in os.listdir(tmp_path))  # nothing half-written


def test_adapter_config_is_peft_shaped_and_old_adapters_still_load(exported, tmp_path):
    from ppiad.models.lora import load_adapter, lora_layers
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    cfg = json.load(open(os.path.join(exported["adapter"], "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and isinstance(cfg["target_modules"], str) and "format" not in cfg
    # An adapter written by an earlier ppiad: target list mixing names and a regex, and a 'format' key.
    old = tmp_path / "old_adapter"
    old.mkdir()
    os.link(os.path.join(exported["adapter"], "adapter_model.safetensors"), old / "adapter_model.safetensors")
    (old / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS,
         "bias": "none", "fan_in_fan_out": False, "format": "ppiad-lora-v1 (PEFT layout, torch orientation, float32)"}))
    for path in (exported["adapter"], str(old)):
        model = load_adapter(Qwen2VLForConditionalGeneration.from_pretrained(exported["ckpt"]), path)
        assert len(lora_layers(model)) == exported["n_layers"]
        np.testing.assert_allclose(_logits(model, exported["ref"]), _logits(exported["model"], exported["ref"]),
                                   atol=1e-6, rtol=0)
