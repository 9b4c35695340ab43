"""Qwen2.5-VL in ppiad: window layout, config checks, the AutoModel entry point, weight files (tied / untied
heads, bf16 shards), and tools/train.py, tools/eval.py, tools/infer.py end to end on a tiny Qwen2.5-VL stand-in.
Numerical parity with transformers is in tests/test_qwen2_5_vl_parity.py."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

import ppiad.models
from ppiad.models import AutoModel, AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from ppiad.models import weights as W
from ppiad.models.qwen2_5_vl import window_index
from ppiad.models.tiny import build_tiny_checkpoint
from ppiad.utils.io import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- window layout -----------------------------------------------------------------------------------------
def test_window_index_on_a_grid_that_does_not_tile():
    # 6 x 10 patches -> 3 x 5 merged tokens; 56-px windows = 2 x 2 merged tokens; the last row/column are cut short
    order, cu = window_index(np.array([[1, 6, 10], [1, 4, 4]]), window_size=56, patch_size=14, merge=2)
    first = [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert order.tolist() == first + [15, 16, 17, 18]  # the second image (2 x 2 merged) is one window
    assert cu == [0, 16, 32, 40, 48, 56, 60, 76]  # in patches: 4 per merged token


def _tower_inputs(model, sizes, seed=0):
    proc_cfg = model.config.vision_config
    rng = np.random.default_rng(seed)
    grids = np.array([[1, h, w] for h, w in sizes])
    n = int(sum(h * w for h, w in sizes))
    width = proc_cfg.in_chans * proc_cfg.temporal_patch_size * proc_cfg.patch_size ** 2
    return paddle.to_tensor(rng.normal(0, 1, (n, width)).astype("float32")), grids


@pytest.fixture(scope="module")
def tiny25(tmp_path_factory):
    path = build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny25")), seed=0, family="qwen2_5_vl",
                                 vision_depth=3, fullatt_block_indexes=[1])
    return path, AutoModel.from_pretrained(path)


def test_windows_do_not_cross_images_and_merged_tokens_come_back_in_raster_order(tiny25):
    _, model = tiny25
    pixels, grids = _tower_inputs(model, [(6, 10), (8, 4)])
    with paddle.no_grad():
        both = model.visual(pixels, grids).numpy()
        first = model.visual(pixels[:60], grids[:1]).numpy()
        second = model.visual(pixels[60:], grids[1:]).numpy()
    np.testing.assert_allclose(both, np.concatenate([first, second]), atol=1e-5)


def test_windows_cover_the_image_equal_full_attention(tiny25):
    _, model = tiny25
    pixels, grids = _tower_inputs(model, [(6, 10)])
    with paddle.no_grad():
        windowed = model.visual(pixels, grids).numpy()
        model.visual.cfg.window_size = 28 * 8  # one window holds the whole 3 x 5 merged grid
        try:
            one_window = model.visual(pixels, grids).numpy()
        finally:
            model.visual.cfg.window_size = 56
        model.visual.full_attention = frozenset(range(3))
        try:
            full = model.visual(pixels, grids).numpy()
        finally:
            model.visual.full_attention = frozenset([1])
    np.testing.assert_allclose(one_window, full, atol=1e-5)
    assert np.abs(windowed - full).max() > 1e-3  # small windows really restrict attention


# ---- config and entry point --------------------------------------------------------------------------------
def _write_config(tmp_path, edit):
    src = build_tiny_checkpoint(str(tmp_path / "src"), family="qwen2_5_vl", weights=False)
    cfg = json.loads(open(os.path.join(src, "config.json")).read())
    edit(cfg)
    d = tmp_path / "edited"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("key,value,words", [
    ("window_size", 100, "window_size"),
    ("fullatt_block_indexes", [0, 7], "fullatt_block_indexes"),
    ("out_hidden_size", 48, "out_hidden_size"),
])
def test_bad_vision_config_is_named(tmp_path, key, value, words):
    d = _write_config(tmp_path, lambda c: c["vision_config"].__setitem__(key, value))
    with pytest.raises(W.CheckpointError) as err:
        AutoModel.from_pretrained(str(d))
    assert words in str(err.value) and str(d / "config.json") in str(err.value)


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    d = _write_config(tmp_path, lambda c: c.update(model_type="llava"))
    for load in (AutoModel.from_pretrained, AutoProcessor.from_pretrained):
        with pytest.raises(W.CheckpointError) as err:
            load(str(d))
        msg = str(err.value)
        assert "'llava'" in msg and "'qwen2_vl'" in msg and "'qwen2_5_vl'" in msg and str(d) in msg
    with pytest.raises(W.CheckpointError, match="no config.json"):
        AutoModel.from_pretrained(str(tmp_path))


def test_qwen2_vl_class_refuses_a_qwen2_5_vl_directory(tiny25):
    path, _ = tiny25
    with pytest.raises(W.CheckpointError, match="AutoModel"):
        Qwen2VLForConditionalGeneration.from_pretrained(path)


def test_package_exports():
    assert set(ppiad.models.__all__) >= {"AutoModel", "AutoProcessor", "Qwen2VLForConditionalGeneration",
                                         "Qwen2_5_VLForConditionalGeneration", "Qwen2VLProcessor"}
    with pytest.raises(AttributeError):
        ppiad.models.NoSuchModel


# ---- weight files ------------------------------------------------------------------------------------------
def _logits(model, n=6):
    ids = paddle.to_tensor([[5, 17, 40, 2, 9, 11][:n]])
    with paddle.no_grad():
        return model(input_ids=ids).logits.numpy()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_sharded_bf16_checkpoint_loads_as_the_hub_stores_it(tmp_path, tied):
    path = build_tiny_checkpoint(str(tmp_path / "fp32"), seed=2, family="qwen2_5_vl", tie_word_embeddings=tied)
    model = AutoModel.from_pretrained(path)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration) and model.config.tie_word_embeddings is tied
    tensors = model.hf_state_dict()
    assert ("lm_head.weight" in tensors) is not tied
    assert {"visual.blocks.0.mlp.gate_proj.weight", "visual.blocks.0.mlp.up_proj.bias", "visual.merger.ln_q.weight",
            "visual.blocks.1.norm1.weight", "model.layers.0.self_attn.q_proj.bias"} <= set(tensors)
    # bf16 shards + index, as the hub stores Qwen/Qwen2.5-VL-*-Instruct
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in os.listdir(path):  # tokenizer, preprocessor and chat template files as they are
        if name not in ("model.safetensors", "config.json"):
            os.link(os.path.join(path, name), hub / name)
    W.save_sharded(str(hub), tensors, max_shard_bytes=200_000, bf16_names=frozenset(tensors))
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = "bfloat16"
    (hub / "config.json").write_text(json.dumps(cfg))
    assert len([f for f in os.listdir(hub) if f.endswith(".safetensors")]) > 1
    loaded = AutoModel.from_pretrained(str(hub))
    rounded = {k: W.bf16_to_float32(W.float32_to_bf16(v)) for k, v in tensors.items()}
    model.load_hf_tensors(rounded.items())
    np.testing.assert_array_equal(_logits(loaded), _logits(model))


# ---- the tools end to end on a Qwen2.5-VL stand-in ---------------------------------------------------------
@pytest.fixture(scope="module")
def assets25(tmp_path_factory):
    from tests.test_trainer import build_assets

    return build_assets(tmp_path_factory.mktemp("assets25"), family="qwen2_5_vl")


def _tool(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_train_resume_eval_and_infer_tools_on_qwen2_5_vl(assets25, tmp_path):
    from ppiad.rl.checkpoint import read_adapter_tensors
    from tests.test_trainer import tiny_overrides

    out = tmp_path / "out"
    cfg = os.path.join(ROOT, "configs", "tiny_cpu.yaml")
    proc = _tool(["tools/train.py", "-c", cfg, "-o", *tiny_overrides(assets25, str(out), "straight",
                                                                     "train.max_steps=2", "train.save_every=1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 2
    step1 = out / "straight" / "checkpoints" / "step_000001"
    proc = _tool(["tools/train.py", "-c", cfg, "-o", *tiny_overrides(
        assets25, str(out), "resumed", "train.max_steps=2", "train.save_every=1", f"train.resume={step1}")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    straight_w, resumed_w = read_adapter_tensors(summary["checkpoint"]), read_adapter_tensors(resumed["checkpoint"])
    start_w = read_adapter_tensors(assets25["adapter"])
    assert sorted(straight_w) == sorted(start_w) and all(".self_attn.q_proj" in k or ".self_attn.v_proj" in k
                                                           for k in straight_w)
    assert any(not np.array_equal(straight_w[k], start_w[k]) for k in start_w)  # training moved the adapters
    for k in straight_w:  # resuming at step 1 reproduces step 2 exactly
        np.testing.assert_array_equal(straight_w[k], resumed_w[k], err_msg=k)

    from ppiad.data.synthetic import generate_synthetic

    synth = tmp_path / "synth"
    generate_synthetic(str(synth), num_images=4, defect_ratio=0.25, size=112, seed=1, categories=["washer"])
    ecfg = tmp_path / "eval.yaml"
    ecfg.write_text(f"run_name: e25\noutput_dir: {tmp_path / 'eval_out'}\nmodel:\n  path: {assets25['model']}\n"
                    f"  adapter: {summary['checkpoint']}\ndata:\n  eval:\n    dataset: mvtec\n    root: {synth}\n"
                    f"    split: all\neval:\n  batch_size: 2\n  max_new_tokens: 6\n")
    proc = _tool(["tools/eval.py", "-c", str(ecfg), "--no_progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the default folder is eval_mvtec_all_<model>_<adapter tag> (ppiad.eval.identity.model_tag)
    (eval_dir,) = (tmp_path / "eval_out" / "e25").glob("eval_mvtec_all_*")
    recs = read_jsonl(str(eval_dir / "predictions.jsonl"))
    assert len(recs) == 4 and all(r["error"] is None and 0.0 <= r["score"] <= 1.0 for r in recs)

    img = next(str(p) for p in sorted(synth.rglob("*.png")))
    proc = _tool(["tools/infer.py", "-c", str(ecfg), "--image", img, "--object", "washer", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= line["p_defect"] <= 1.0 and line["verdict"] in ("defect", "normal", "unknown")


@pytest.mark.parametrize("name,train,evaluate", [("lriad_mvtec_qwen2_5_vl", "mvtec", "visa"),
                                                 ("lriad_visa_qwen2_5_vl", "visa", "mvtec")])
def test_qwen2_5_vl_configs_keep_the_paper_recipe(name, train, evaluate):
    from ppiad.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    assert cfg.model.path.endswith("Qwen2.5-VL-7B-Instruct") and cfg.run_name == name
    assert cfg.data.train.dataset == train and cfg.data.eval.dataset == evaluate
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.target_modules)) == (4, 16, 0.1,
                                                                                             ["q_proj", "v_proj"])
    assert cfg.grpo.num_generations == 4 and cfg.model.max_pixels == 401408
