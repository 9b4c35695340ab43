"""ppiad.utils.memory: the parameter inventory equals the model's; the estimate equals what a training step
holds (single process here; bench/memory.py covers 2 processes x sharding modes)."""
import numpy as np
import pytest


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_shapes_match_the_model(tmp_path, tied):
    from ppiad.models.lora import apply_lora, lora_state_dict
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.models.tiny import build_tiny_checkpoint
    from ppiad.utils.memory import lora_shapes, parameter_shapes

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        build_tiny_checkpoint(str(tmp_path), tie_word_embeddings=tied))
    assert parameter_shapes(model.config) == {n: list(p.shape) for n, p in model.named_parameters()}
    apply_lora(model, 4, 16, 0.0)
    assert lora_shapes(model.config, 4, ["q_proj", "v_proj"]) == {
        n: list(t.shape) for n, t in lora_state_dict(model).items()}


def test_published_sizes():
    from ppiad.utils.memory import parameter_shapes, qwen2_vl_config

    counts = {n: sum(int(np.prod(s)) for s in parameter_shapes(qwen2_vl_config(n)).values()) for n in ("2B", "7B")}
    assert counts == {"2B": 2_208_985_600, "7B": 8_291_375_616}   # Qwen2-VL-2B/7B-Instruct: 2.21 B / 8.29 B


@pytest.mark.parametrize("recompute", [False, True])
def test_estimate_matches_a_measured_step(tmp_path, recompute):
    """In a fresh process: the host allocator's peak counts whatever earlier tests of this process left
    allocated (measured: +1.2 MB after the full suite, 24 % off), so the step is measured on its own."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"from tests.test_memory import measured_step_check; "
            f"measured_step_check({str(tmp_path)!r}, {recompute!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def measured_step_check(tmp_path, recompute):
    """Two GRPO steps of the tiny stand-in: held bytes equal the estimate, the step peak within 15 %."""
    import pathlib

    tmp_path = pathlib.Path(tmp_path)
    from paddle.base import core

    import ppiad.models.generation as generation
    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer
    from ppiad.utils import memory
    from tests.test_trainer import build_assets, tiny_overrides

    assets = build_assets(tmp_path / "assets")
    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "mem", "train.max_steps=2", "grpo.max_new_tokens=16",
                                           f"train.recompute={str(recompute).lower()}"))
    probe = {}
    real = generation.generate

    class Probe(GRPOTrainer):
        def _sample(self, step, micro, batch, draw=0):
            if micro == 0 and draw == 0:
                core.host_memory_stat_reset_peak_value("Allocated", 0)
            res = super()._sample(step, micro, batch, draw)
            probe["prompt_tokens"] = int(res["inputs"]["input_ids"].shape[1])
            return res

        def _update(self, buffer):
            out = super()._update(buffer)
            probe["peak"] = core.host_memory_stat_peak_value("Allocated", 0)
            probe.update(memory.measure(self.core, self.wrapped, self.optimizer))
            return out

    generation.generate = lambda *a, **k: real(*a, **{**k, "eos_token_ids": [-1]})   # full-length rollouts
    try:
        Probe(cfg).train()
    finally:
        generation.generate = real
    est = memory.estimate(cfg, 1, prompt_tokens=probe["prompt_tokens"], completion_tokens=16)
    for key in ("params", "grads", "optimizer"):
        assert est[key] == probe[key], key
    assert est["peak"] == pytest.approx(probe["peak"], rel=0.15)
