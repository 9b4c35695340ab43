"""bf16 safety that can be checked on a CPU (Paddle's CPU build has no bf16 matmul, so the bf16 training path
itself is GPU-only and untested here): small LoRA updates vanish when merged into bf16 weights, so ppiad
never merges into bf16; the fp32 master weights of a bf16 run are checkpointed under stable names."""
import numpy as np
import pytest


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (round half to even on the top 16 bits) -> float32: a numpy emulation."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_bf16_round_matches_known_values():
    assert bf16_round(np.array([1.0 + 2 ** -9], np.float32))[0] == 1.0             # below half an ulp (2^-7)
    assert bf16_round(np.array([1.0 + 2 ** -7], np.float32))[0] == 1.0 + 2 ** -7   # exactly representable
    assert bf16_round(np.array([1.0 + 3 * 2 ** -9], np.float32))[0] == 1.0 + 2 ** -7


def test_merging_a_small_update_into_bf16_weights_loses_much_of_it():
    """A 7B-sized q_proj (in 3,584) with Qwen2's weight scale (std 0.02), rank 4, alpha 16, lora_A at its
    Kaiming-uniform start and |B| ~ 1e-3 (a few hundred small steps): merged into bf16 weights, about 40 % of the
    update's entries round away entirely (41 % here); merged in fp32 none do."""
    rng = np.random.default_rng(0)
    d_in, d_out, r, alpha = 3584, 256, 4, 16
    w = (rng.normal(size=(d_in, d_out)) * 0.02).astype(np.float32)
    bound = 1.0 / np.sqrt(d_in)
    a = rng.uniform(-bound, bound, size=(d_in, r)).astype(np.float32)
    b = (rng.normal(size=(r, d_out)) * 1e-3).astype(np.float32)
    update = (alpha / r) * (a @ b)
    w_bf16 = bf16_round(w)
    merged_bf16 = bf16_round(w_bf16 + update)
    vanished = np.mean(merged_bf16 == w_bf16)
    assert 0.3 < vanished < 0.55, vanished
    merged_fp32 = w + update
    assert np.mean(merged_fp32 == w) < 0.001


def test_merge_adapter_refuses_bf16_weights():
    import paddle

    from ppiad.models.linear import Linear
    from ppiad.models.lora import apply_lora, lora_layers, merge_adapter

    def tiny():
        attn = paddle.nn.Layer()
        attn.q_proj = Linear(8, 8)
        block = paddle.nn.Layer()
        block.self_attn = attn
        inner = paddle.nn.Layer()
        inner.layers = paddle.nn.LayerList([block])
        model = paddle.nn.Layer()
        model.model = inner
        apply_lora(model, 2, 4, 0.0, ["q_proj"])
        return model

    fp32 = tiny()
    merge_adapter(fp32)                                   # float32 weights merge
    assert fp32._ppiad_lora_merged
    bf16 = tiny()
    zero = paddle.nn.initializer.Constant(0.0)
    for layer in lora_layers(bf16).values():
        layer.weight = paddle.create_parameter([8, 8], "bfloat16", default_initializer=zero)
    with pytest.raises(ValueError, match="bfloat16, not float32"):
        merge_adapter(bf16)
    assert not getattr(bf16, "_ppiad_lora_merged", False) and lora_layers(bf16)


def test_master_weights_are_saved_under_stable_names():
    from ppiad.rl.checkpoint import _structured_optimizer_state

    run1 = {"linear_3.w_0": "model.layers.0.self_attn.q_proj.lora_A"}
    run2 = {"linear_9.w_0": "model.layers.0.self_attn.q_proj.lora_A"}   # the resumed process numbers differently
    state = {"linear_3.w_0_moment1_0": 1, "master_weights": {"linear_3.w_0": "fp32 master"}}
    saved = _structured_optimizer_state(state, run1, to_structured=True)
    assert saved["master_weights"] == {"model.layers.0.self_attn.q_proj.lora_A": "fp32 master"}
    restored = _structured_optimizer_state(saved, run2, to_structured=False)
    assert restored == {"linear_9.w_0_moment1_0": 1, "master_weights": {"linear_9.w_0": "fp32 master"}}
