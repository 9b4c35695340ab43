"""LoRA on the decoder's q/v projections: trainability, reference policy, save/load, merge."""
import json
import os

import numpy as np
import paddle
import pytest

from ppiad.models.linear import Linear
from ppiad.models.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapters_disabled, apply_lora, lora_layers,
                               lora_parameters, load_adapter, merge_adapter, save_adapter)


class _Attn(paddle.nn.Layer):
    def __init__(self, d):
        super().__init__()
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.o_proj = Linear(d, d, bias_attr=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        w = paddle.nn.functional.softmax(q @ k.transpose([0, 2, 1]) / 4.0, axis=-1)
        return x + self.o_proj(w @ v)


class _Layer(paddle.nn.Layer):
    def __init__(self, d):
        super().__init__()
        self.self_attn = _Attn(d)

    def forward(self, x):
        return self.self_attn(x)


class _Decoder(paddle.nn.Layer):
    def __init__(self, d, n):
        super().__init__()
        self.layers = paddle.nn.LayerList([_Layer(d) for _ in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _VisionAttn(paddle.nn.Layer):
    def __init__(self, d):
        super().__init__()
        self.qkv = Linear(d, 3 * d)
        self.q_proj = Linear(d, d)  # a decoy: same short name, but in the vision tower


class _Vision(paddle.nn.Layer):
    def __init__(self, d):
        super().__init__()
        self.blocks = paddle.nn.LayerList([paddle.nn.Layer()])
        self.blocks[0].attn = _VisionAttn(d)


class ToyVL(paddle.nn.Layer):
    """Layer names like Qwen2-VL's: visual.blocks.0.attn.qkv, model.layers.0.self_attn.q_proj, lm_head."""

    def __init__(self, d=16, n=2, vocab=32):
        super().__init__()
        self.visual = _Vision(d)
        self.embed = paddle.nn.Embedding(vocab, d)
        self.model = _Decoder(d, n)
        self.lm_head = Linear(d, vocab, bias_attr=False)

    def forward(self, ids):
        return self.lm_head(self.model(self.embed(ids)))


def _model(seed=0):
    paddle.seed(seed)
    m = ToyVL()
    m.eval()
    return m


def _randomise_adapters(model, seed=1):
    rng = np.random.default_rng(seed)
    for p in lora_parameters(model):
        p.set_value(paddle.to_tensor(rng.normal(0, 0.3, p.shape).astype("float32")))


IDS = paddle.to_tensor([[1, 5, 7, 3, 9], [2, 2, 8, 30, 0]])


def test_only_decoder_q_v_adapters_are_trainable():
    m = apply_lora(_model(), r=4, alpha=16, dropout=0.1)
    names = list(lora_layers(m))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = sorted(n for n, p in m.named_parameters() if not p.stop_gradient)
    assert trainable == sorted(f"{n}.lora_{x}" for n in names for x in "AB")
    assert len(lora_parameters(m)) == 8
    assert type(m.visual.blocks[0].attn.q_proj) is Linear  # vision tower untouched


def test_zero_b_leaves_output_unchanged_and_disabled_equals_base():
    base = _model()
    ref = base(IDS).numpy()
    m = apply_lora(_model(), r=4, alpha=16, dropout=0.0)
    np.testing.assert_array_equal(m(IDS).numpy(), ref)  # B = 0 at init
    _randomise_adapters(m)
    adapted = m(IDS).numpy()
    assert np.abs(adapted - ref).max() > 1e-3
    with adapters_disabled(m):
        np.testing.assert_allclose(m(IDS).numpy(), ref, atol=1e-6)
    np.testing.assert_array_equal(m(IDS).numpy(), adapted)  # restored


def test_adapters_restored_after_exception():
    m = apply_lora(_model(), r=4, alpha=16, dropout=0.0)
    _randomise_adapters(m)
    adapted = m(IDS).numpy()
    with pytest.raises(KeyError):
        with adapters_disabled(m):
            raise KeyError("boom")
    assert not any(l.disable_lora for l in lora_layers(m).values())
    np.testing.assert_array_equal(m(IDS).numpy(), adapted)


def test_save_load_round_trip_exact(tmp_path):
    m = apply_lora(_model(), r=4, alpha=16, dropout=0.0)
    _randomise_adapters(m)
    want = m(IDS).numpy()
    save_adapter(m, str(tmp_path / "ad"))
    cfg = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 16, ["q_proj", "v_proj"])
    # into a fresh model with adapters already applied ...
    m2 = apply_lora(_model(), r=4, alpha=16, dropout=0.0)
    load_adapter(m2, str(tmp_path / "ad"))
    np.testing.assert_array_equal(m2(IDS).numpy(), want)
    # ... and into a bare model (adapters added from adapter_config.json), via the file path
    m3 = load_adapter(_model(), str(tmp_path / "ad" / ADAPTER_WEIGHTS))
    np.testing.assert_array_equal(m3(IDS).numpy(), want)
    # ... and through a trainer's `latest` pointer file, as the README's eval command uses it
    (tmp_path / "latest").write_text("ad\n")
    m4 = load_adapter(_model(), str(tmp_path / "latest"))
    np.testing.assert_array_equal(m4(IDS).numpy(), want)


def test_safetensors_layout_is_peft_like(tmp_path):
    from safetensors.numpy import load_file

    m = apply_lora(_model(), r=4, alpha=16, dropout=0.0)
    save_adapter(m, str(tmp_path))
    t = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 16) and b.shape == (16, 4) and len(t) == 8


def test_load_errors_name_keys(tmp_path):
    m = apply_lora(_model(), r=4, alpha=16, dropout=0.0)
    save_adapter(m, str(tmp_path / "qv"))
    other = apply_lora(_model(), r=4, alpha=16, dropout=0.0, target_modules=("q_proj", "k_proj"))
    with pytest.raises(ValueError, match="missing keys .*k_proj.*unexpected keys .*v_proj"):
        load_adapter(other, str(tmp_path / "qv"))
    wrong_r = apply_lora(_model(), r=2, alpha=16, dropout=0.0)
    with pytest.raises(ValueError, match="r=4"):
        load_adapter(wrong_r, str(tmp_path / "qv"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_adapter(m, str(tmp_path / "nowhere"))


def test_merge_gives_same_logits():
    m = apply_lora(_model(), r=4, alpha=16, dropout=0.0)
    _randomise_adapters(m)
    want = m(IDS).numpy()
    merge_adapter(m)
    np.testing.assert_allclose(m(IDS).numpy(), want, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        with adapters_disabled(m):
            pass


def test_bad_targets_rejected():
    with pytest.raises(ValueError, match="match no layer"):
        apply_lora(_model(), r=4, alpha=16, dropout=0.0, target_modules=("qkv",))
    m = apply_lora(_model(), r=4, alpha=16, dropout=0.0)
    with pytest.raises(ValueError, match="already"):
        apply_lora(m, r=4, alpha=16, dropout=0.0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_real_tiny_qwen2_vl(tmp_path, family):
    """On the real architectures: q/v of the decoder only, exact reload, merge, and a mergeable checkpoint."""
    from ppiad.models import AutoModel
    from ppiad.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(str(tmp_path / "ckpt"), seed=0, layers=2, vision_depth=1, family=family)
    ids = paddle.to_tensor([[5, 17, 40, 2, 9, 11]])
    base = AutoModel.from_pretrained(path)
    want_base = base(input_ids=ids).logits.numpy()
    m = apply_lora(AutoModel.from_pretrained(path), r=4, alpha=16, dropout=0.1)
    m.eval()
    assert sorted(lora_layers(m)) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                            for p in ("q_proj", "v_proj"))
    assert all(n.startswith("model.layers.") for n, p in m.named_parameters() if not p.stop_gradient)
    np.testing.assert_array_equal(m(input_ids=ids).logits.numpy(), want_base)
    _randomise_adapters(m)
    adapted = m(input_ids=ids).logits.numpy()
    with adapters_disabled(m):
        np.testing.assert_allclose(m(input_ids=ids).logits.numpy(), want_base, atol=1e-6)
    save_adapter(m, str(tmp_path / "adapter"))
    fresh = load_adapter(AutoModel.from_pretrained(path), str(tmp_path / "adapter"))
    np.testing.assert_array_equal(fresh(input_ids=ids).logits.numpy(), adapted)
    merge_adapter(fresh)
    assert not lora_layers(fresh)
    np.testing.assert_allclose(fresh(input_ids=ids).logits.numpy(), adapted, atol=1e-5)
    fresh.save_pretrained(str(tmp_path / "merged"))  # the base architecture again: loads without LoRA code
    merged = AutoModel.from_pretrained(str(tmp_path / "merged"))
    assert type(merged) is type(base)  # saved as the same family
    np.testing.assert_allclose(merged(input_ids=ids).logits.numpy(), adapted, atol=1e-5)
