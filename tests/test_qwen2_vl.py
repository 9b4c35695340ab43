"""Unit tests of ppiad's Qwen2-VL: loading/saving (errors, shards, pickle opt-in, tied heads), KV cache, loss."""
import json
import os

import numpy as np
import paddle
import pytest

from ppiad.models import weights as W
from ppiad.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration

IMG, VSTART, VEND = 290, 291, 292


def tiny_config(tied=False):
    return Qwen2VLConfig.from_dict(dict(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, tie_word_embeddings=tied,
        image_token_id=IMG, video_token_id=293, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2)))


def tiny_model(tied=False, seed=0):
    paddle.seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_config(tied))
    model.eval()
    return model


def batch(seed=0):
    """Left-padded batch of two prompts, each with one image (grids 4x6 and 6x4 patches -> 6 tokens each)."""
    rng = np.random.default_rng(seed)
    grid = np.array([[1, 4, 6], [1, 6, 4]])
    rows = [[5, VSTART] + [IMG] * 6 + [VEND, 7, 8, 9], [5, VSTART] + [IMG] * 6 + [VEND, 7]]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = rng.standard_normal((int(grid.prod(1).sum()), 3 * 2 * 14 * 14)).astype(np.float32)
    return dict(input_ids=paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask),
                pixel_values=paddle.to_tensor(pixels), image_grid_thw=paddle.to_tensor(grid))


def logits(model, inputs):
    with paddle.no_grad():
        return model(**inputs).logits.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model()
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(str(d))
    return model, d


def test_save_load_round_trip(saved):
    model, d = saved
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(str(d))
    inputs = batch()
    np.testing.assert_array_equal(logits(loaded, inputs), logits(model, inputs))


def test_files_use_hf_layout(saved):
    _, d = saved
    st = W.SafetensorsFile(str(d / "model.safetensors"))
    assert st.shape("model.layers.0.self_attn.k_proj.weight") == (16, 32)  # torch layout [out, in]
    assert st.shape("model.layers.0.mlp.down_proj.weight") == (32, 48)
    assert st.shape("visual.patch_embed.proj.weight") == (16, 3, 2, 14, 14)
    assert st.shape("visual.merger.mlp.0.weight") == (64, 64) and "visual.merger.mlp.2.bias" in st.keys()
    assert st.shape("lm_head.weight") == (300, 32)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_vl" and cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]


def test_sharded_checkpoint_loads_to_same_logits(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(str(tmp_path), max_shard_bytes=20_000)
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and (tmp_path / W.SAFE_INDEX).exists() and not (tmp_path / W.SAFE_WEIGHTS).exists()
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))
    inputs = batch()
    np.testing.assert_array_equal(logits(loaded, inputs), logits(model, inputs))
    os.remove(tmp_path / shards[0])
    with pytest.raises(W.CheckpointError, match="missing"):
        Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))


def test_wrong_architecture_is_named(saved, tmp_path):
    _, d = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(W.CheckpointError) as err:
        Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))
    assert "qwen2_5_vl" in str(err.value) and str(tmp_path / "config.json") in str(err.value)


def _copy_with_tensors(src, dst, edit):
    tensors = {n: a for n, a in W.iter_tensors("hf", [str(src / "model.safetensors")])}
    edit(tensors)
    W.save_safetensors(str(dst / "model.safetensors"), tensors)
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_and_unexpected_keys_are_listed(saved, tmp_path):
    _, d = saved
    (tmp_path / "a").mkdir()
    _copy_with_tensors(d, tmp_path / "a", lambda t: t.pop("model.layers.1.self_attn.q_proj.bias"))
    with pytest.raises(W.CheckpointError, match=r"1 missing keys .*model\.layers\.1\.self_attn\.q_proj\.bias"):
        Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    _copy_with_tensors(d, tmp_path / "b", lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(W.CheckpointError, match=r"unexpected keys .*model\.extra\.weight"):
        Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    _copy_with_tensors(d, tmp_path / "c", lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}))
    with pytest.raises(W.CheckpointError, match=r"shape mismatch.*model\.norm\.weight"):
        Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / "c"))


def test_pdparams_need_opt_in(saved, tmp_path):
    model, d = saved
    # a Paddle-format checkpoint as PaddleMIX publishes: linears already [in, out]; its lm_head an nn.Linear
    linear = model.linear_weight_names()
    state = {n: paddle.to_tensor(p.numpy().T) if n in linear else p for n, p in model.state_dict().items()}
    assert any(model.state_dict()[n].shape[0] == model.state_dict()[n].shape[1] for n in linear)  # square too
    state["lm_head.weight"] = paddle.to_tensor(state["lm_head.weight"].numpy().T)
    paddle.save(state, str(tmp_path / W.PADDLE_WEIGHTS))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(W.CheckpointError, match="allow_pickle"):
        Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path), allow_pickle=True)
    inputs = batch()
    np.testing.assert_array_equal(logits(loaded, inputs), logits(model, inputs))


def test_tied_embeddings_share_one_tensor(tmp_path):
    model = tiny_model(tied=True)
    names = list(model.state_dict())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    inputs = batch()
    with paddle.no_grad():
        out = model(**inputs)
    expected = out.hidden_states.numpy() @ model.model.embed_tokens.weight.numpy().T
    np.testing.assert_allclose(out.logits.numpy(), expected, atol=1e-5)
    model.save_pretrained(str(tmp_path))
    assert "lm_head.weight" not in W.SafetensorsFile(str(tmp_path / "model.safetensors")).keys()
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(logits(loaded, inputs), out.logits.numpy())
    # a tied checkpoint that stores lm_head.weight anyway (some exports do) still loads
    tensors = dict(W.iter_tensors("hf", [str(tmp_path / "model.safetensors")]))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    W.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))


def test_kv_cache_decode_equals_full_forward():
    model = tiny_model(seed=1)
    inputs = batch(seed=1)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = paddle.to_tensor([[11, 12, 13], [21, 22, 23]])
    full_ids = paddle.concat([ids, extra], axis=1)
    full_mask = paddle.concat([mask, paddle.ones([2, 3], mask.dtype)], axis=1)
    with paddle.no_grad():
        full = model(full_ids, full_mask, inputs["pixel_values"], inputs["image_grid_thw"]).logits.numpy()
        out = model(**inputs, use_cache=True)
        assert len(out.past_key_values) == 2 and out.past_key_values[0][0].shape == [2, 2, ids.shape[1], 8]
        deltas = out.rope_deltas
        steps = [out.logits.numpy()[:, -1]]
        t = ids.shape[1]
        for i in range(3):
            step_mask = full_mask[:, : t + i + 1]
            if i == 0:  # explicit position_ids, as the contract's decode steps pass them
                pos = (out.rope_deltas + t + i).unsqueeze(0).expand([3, 2, 1])
                out = model(extra[:, i:i + 1], step_mask, position_ids=pos, past_key_values=out.past_key_values,
                            use_cache=True)
            else:  # or rope_deltas, from which the same positions are derived
                out = model(extra[:, i:i + 1], step_mask, past_key_values=out.past_key_values, use_cache=True,
                            rope_deltas=deltas)
            if i > 0:
                np.testing.assert_array_equal(out.rope_deltas.numpy(), deltas.numpy())  # echoed for the next step
            steps.append(out.logits.numpy()[:, -1])
    np.testing.assert_allclose(np.stack(steps, 1), full[:, t - 1:], atol=1e-5)


def test_precomputed_image_embeds_and_logits_to_keep():
    model = tiny_model()
    inputs = batch()
    with paddle.no_grad():
        ref = model(**inputs).logits.numpy()
        emb = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
        assert emb.shape == [12, 32]
        out = model(inputs["input_ids"], inputs["attention_mask"], image_embeds=emb,
                    image_grid_thw=inputs["image_grid_thw"], logits_to_keep=2)
    np.testing.assert_allclose(out.logits.numpy(), ref[:, -2:], atol=1e-6)


def test_input_errors_are_clear():
    model = tiny_model()
    inputs = batch()
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        model(inputs["input_ids"], inputs["attention_mask"], image_embeds=paddle.zeros([5, 32]),
              image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(inputs["input_ids"], inputs["attention_mask"], image_embeds=paddle.zeros([12, 32]))
    with pytest.raises(ValueError, match="pixel_values nor image_embeds"):
        model(inputs["input_ids"], inputs["attention_mask"])
    with pytest.raises(W.CheckpointError, match="model directory not found"):
        Qwen2VLForConditionalGeneration.from_pretrained("/nonexistent/qwen")


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    inputs = batch()
    labels = inputs["input_ids"].numpy().copy()
    labels[inputs["attention_mask"].numpy() == 0] = -100
    with paddle.no_grad():
        out = model(**inputs, labels=paddle.to_tensor(labels))
    lg = out.logits.numpy()[:, :-1].astype(np.float64)
    target = labels[:, 1:]
    logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    keep = target != -100
    expected = -np.take_along_axis(logp, np.where(keep, target, 0)[..., None], -1)[..., 0][keep].mean()
    assert abs(float(out.loss) - expected) < 1e-4


def test_text_only_positions_follow_attention_mask():
    model = tiny_model()
    ids = paddle.to_tensor([[0, 0, 5, 6], [5, 6, 7, 8]])
    mask = paddle.to_tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    pos, deltas = model.get_rope_index(ids, None, mask)
    assert pos.numpy()[:, 0].tolist() == [[1, 1, 0, 1]] * 3 and deltas.numpy().ravel().tolist() == [-2, 0]


def test_bf16_file_values_widen_exactly(tmp_path):
    x = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    bits = W.float32_to_bf16(x)
    np.testing.assert_allclose(W.bf16_to_float32(bits), x, rtol=4e-3)
    assert W.bf16_to_float32(bits)[:3].tolist() == [1.0, -2.5, 3.140625]  # exactly representable
    W.save_safetensors(str(tmp_path / "x.safetensors"), {"x": x}, bf16_names=frozenset({"x"}))
    st = W.SafetensorsFile(str(tmp_path / "x.safetensors"))
    assert st.entries["x"]["dtype"] == "BF16"
    np.testing.assert_array_equal(st.get("x"), W.bf16_to_float32(bits))


def test_gradients_reach_decoder_projections_and_loading_leaves_no_global_state(saved):
    _, d = saved
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(d))
    inputs = batch()
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.grad is not None and float(q.grad.abs().sum()) > 0
    fresh = paddle.nn.Linear(4, 4)  # from_pretrained's zero initialiser must not leak into later layers
    assert float(fresh.weight.abs().sum()) > 0 and paddle.get_default_dtype() == "float32"


def test_bfloat16_load_and_save_keep_bf16_on_disk(saved, tmp_path):
    # bf16 compute needs a GPU (Paddle's CPU build has no bf16 matmul); loading and saving work anywhere
    model, d = saved
    half = Qwen2VLForConditionalGeneration.from_pretrained(str(d), dtype="bfloat16")
    assert {str(p.dtype) for p in half.parameters()} == {"paddle.bfloat16"}
    half.save_pretrained(str(tmp_path))
    st = W.SafetensorsFile(str(tmp_path / "model.safetensors"))
    assert {e["dtype"] for e in st.entries.values()} == {"BF16"}
    back = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))
    x = model.model.layers[0].self_attn.q_proj.weight.numpy()
    y = back.model.layers[0].self_attn.q_proj.weight.numpy()
    np.testing.assert_allclose(y, x, rtol=2 ** -8, atol=1e-6)  # bf16 keeps 8 significant bits
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_newer_transformers_key_names_load(saved, tmp_path):
    # transformers >= 4.52 saves model.language_model.* and model.visual.*; the hub files use model.* / visual.*
    model, d = saved

    def rename(t):
        for name in list(t):
            if name.startswith("model."):
                t["model.language_model." + name[len("model."):]] = t.pop(name)
            elif name.startswith("visual."):
                t["model." + name] = t.pop(name)
    _copy_with_tensors(d, tmp_path, rename)
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))
    inputs = batch()
    np.testing.assert_array_equal(logits(loaded, inputs), logits(model, inputs))


@pytest.mark.parametrize("block_bytes", [1, 2 * 2 * 24 * 4 * 5])  # 1 query row a block; 5 rows (24 patches)
def test_vision_attention_in_blocks_of_query_rows_equals_one_block(monkeypatch, block_bytes):
    import ppiad.models.qwen2_vl as Q

    model = tiny_model()
    inputs = batch()
    with paddle.no_grad():
        whole = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"]).numpy()
        monkeypatch.setattr(Q, "VISION_SCORE_BLOCK_BYTES", block_bytes)
        calls = []
        real = Q.F.softmax
        monkeypatch.setattr(Q.F, "softmax", lambda x, **kw: calls.append(x.shape) or real(x, **kw))
        blocked = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"]).numpy()
    rows = max(1, block_bytes // (2 * 24 * 4))
    assert len(calls) == 2 * -(-24 // rows)  # 2 images of 24 patches, each in ceil(24 / rows) blocks
    assert max(shape[1] for shape in calls) == rows
    np.testing.assert_allclose(blocked, whole, rtol=1e-6, atol=1e-6)
