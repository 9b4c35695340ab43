"""Activation memory options on CPU: recompute per decoder layer and the scaled-dot-product attention path
give the same loss and LoRA gradients as the plain eager forward (the teacher-forced GRPO forward, with the
prompt's KV cache carrying gradient and LoRA dropout on)."""
import numpy as np
import paddle
import pytest

DROPOUT = 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ppiad.models.tiny import build_tiny_checkpoint
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), seed=0)


def _loss_and_grads(model_dir, attn="eager", recompute=False):
    from ppiad.models.generation import completion_logprobs
    from ppiad.models.lora import apply_lora, lora_layers, lora_parameters
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    paddle.seed(1)
    apply_lora(model, 4, 16, DROPOUT)
    for layer in lora_layers(model).values():
        layer.lora_B.set_value(paddle.randn(layer.lora_B.shape) * 0.1)
    model.set_attn_implementation(attn)
    model.set_recompute(recompute)
    model.train()
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 200, size=(2, 7))
    mask = np.ones((2, 7), dtype="int64")
    mask[1, :3] = 0                                     # left padding: fully masked query rows
    inputs = {"input_ids": paddle.to_tensor(ids), "attention_mask": paddle.to_tensor(mask)}
    seqs = paddle.to_tensor(rng.integers(10, 200, size=(4, 5)))
    cmask = paddle.to_tensor(np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]],
                                      dtype="float32"))
    paddle.seed(2)                                      # the same dropout masks in every variant
    logp = completion_logprobs(model, inputs, seqs, cmask, num_samples=2)
    loss = -(logp * paddle.to_tensor([[1.0], [-0.5], [0.3], [2.0]])).sum() / cmask.sum()
    loss.backward()
    return float(loss), [p.grad.numpy().copy() for p in lora_parameters(model)]


@pytest.mark.parametrize("attn,recompute", [("eager", True), ("sdpa", False), ("sdpa", True)])
def test_same_loss_and_adapter_gradients(tiny, attn, recompute):
    ref_loss, ref_grads = _loss_and_grads(tiny)
    loss, grads = _loss_and_grads(tiny, attn, recompute)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert any(np.abs(g).max() > 0 for g in ref_grads)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_unknown_attention_refused(tiny):
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny)
    with pytest.raises(ValueError, match="attn_implementation must be one of eager, sdpa"):
        model.set_attn_implementation("flash")


def test_sdpa_generation_equals_eager(tiny):
    """Decoding (prefill with left padding, then one token per step over the KV cache) with sdpa attention
    gives the eager path's tokens and log-probs."""
    from ppiad.models.generation import generate
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    rng = np.random.default_rng(3)
    ids = rng.integers(10, 200, size=(2, 9))
    mask = np.ones((2, 9), dtype="int64")
    mask[0, :4] = 0
    inputs = {"input_ids": paddle.to_tensor(ids), "attention_mask": paddle.to_tensor(mask)}
    out = {}
    for attn in ("eager", "sdpa"):
        model = Qwen2VLForConditionalGeneration.from_pretrained(tiny)
        model.set_attn_implementation(attn)
        out[attn] = generate(model, inputs, num_samples=2, max_new_tokens=6, do_sample=True, seed=4,
                             eos_token_ids=[-1])
    assert out["sdpa"].sequences.numpy().tolist() == out["eager"].sequences.numpy().tolist()
    np.testing.assert_allclose(out["sdpa"].logprobs.numpy(), out["eager"].logprobs.numpy(), rtol=1e-4, atol=1e-5)
