"""ppiad.utils.memory under sharding stage 2: Paddle's assignment of the adapters to processes (each tensor in
turn to the process owning the fewest elements) and what it leaves each process. The measured side (2 emulated
processes, bytes equal to the estimate) is in tests/test_stage3.py and bench/memory.py."""
import pytest


def test_stage2_shares_follow_paddles_assignment():
    from ppiad.utils.memory import _stage2_shares

    # 100 -> p0; 50 -> p1; 60 -> p1 (50 < 100); 10 -> p0 (100 < 110): owned 110 / 110
    # GPU: each tensor padded to 256 bytes = 64 fp32: p0 128 + 64, p1 64 + 64 -> buffers of 192 elements
    assert _stage2_shares([100, 50, 60, 10], 2, gpu=True) == (110, 192)
    # CPU (emulation): 4,096 bytes = 1,024 elements per tensor
    assert _stage2_shares([100, 50, 60, 10], 2, gpu=False) == (110, 2048)
    assert _stage2_shares([5000, 7], 1, gpu=True) == (5007, 5056 + 64)
    # the gradient buffer is capped at Paddle's default bucket (2**23 elements)
    assert _stage2_shares([2 ** 24, 1], 2, gpu=True) == (2 ** 24, 2 ** 23)


@pytest.mark.parametrize("plus_ratio", [1.0, 16.0])
def test_stage2_estimate_for_qwen2_vl_7b(plus_ratio):
    from ppiad.config import load_config
    from ppiad.utils.memory import estimate, lora_shapes, qwen2_vl_config

    mc = qwen2_vl_config("7B")
    est = {}
    for mode in ("none", "stage2"):
        cfg = load_config(None, [f"distributed.sharding={mode}", f"lora.plus_ratio={plus_ratio}"])
        est[mode] = estimate(cfg, 4, model_config=mc, prompt_tokens=1024, gpu=True)
    lora = sum(int(a) * int(b) for a, b in lora_shapes(mc, cfg.lora.r, cfg.lora.target_modules).values())
    assert est["stage2"]["params"] == est["none"]["params"]                   # weights stay whole
    assert est["none"]["optimizer"] == 8 * lora
    # AdamW state: the largest of 4 shares, within one tensor of a quarter (the largest tensor: 3,584 x 4)
    assert 8 * lora / 4 <= est["stage2"]["optimizer"] <= 8 * (lora / 4 + 3584 * 4)
    assert est["stage2"]["grads"] < est["none"]["grads"] / 3
