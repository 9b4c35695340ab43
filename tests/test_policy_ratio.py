"""The GRPO probability ratio: exactly 1 at the first update of a rollout batch (LoRA dropout and sampling
temperature handled the same way in the old and the new log-probs), and log-probs at the sampling temperature."""
import json
import os

import numpy as np
import paddle
import pytest

from ppiad.models.generation import completion_logprobs
from ppiad.utils.seed import seeded
from tests.test_generation import _completions, _full_forward_logprobs, _inputs
from tests.test_trainer import build_assets, tiny_overrides


class _ScaledLogits:
    """The model with its logits divided by T: the plain full forward of the tempered distribution."""

    def __init__(self, model, t):
        self.model, self.t = model, t

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, **kw):
        out = self.model(**kw)
        out.logits = out.logits / self.t
        return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ppiad.models.lora import apply_lora, lora_layers
    from ppiad.models.processor import Qwen2VLProcessor
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_ratio")), seed=0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(path)
    apply_lora(model, 4, 16, 0.3)
    paddle.seed(1)
    for layer in lora_layers(model).values():
        layer.lora_B.set_value(paddle.randn(layer.lora_B.shape) * 0.5)
    return model, Qwen2VLProcessor.from_pretrained(path)


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_logprobs_at_the_sampling_temperature(tiny, temperature):
    model, proc = tiny
    model.eval()
    inputs = _inputs(proc)
    seqs, mask = _completions(model, 3)
    with paddle.no_grad():
        got = completion_logprobs(model, inputs, seqs, mask, 3, temperature=temperature).numpy()
        want = _full_forward_logprobs(_ScaledLogits(model, temperature), inputs, seqs, mask, 3).numpy()
        plain = completion_logprobs(model, inputs, seqs, mask, 3).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - plain).max() > 0.01   # the temperature really changes them
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, inputs, seqs, mask, 3, temperature=0.0)


def test_same_dropout_seed_same_logprobs(tiny):
    # the mechanism the trainer relies on: in train mode, LoRA dropout masks follow the seed
    model, proc = tiny
    model.train()
    inputs = _inputs(proc)
    seqs, mask = _completions(model, 3)
    with paddle.no_grad():
        runs = {}
        for key, seed in (("a", 7), ("b", 7), ("c", 8)):
            with seeded(seed):
                runs[key] = completion_logprobs(model, inputs, seqs, mask, 3, temperature=0.7).numpy()
        model.eval()
        no_dropout = completion_logprobs(model, inputs, seqs, mask, 3, temperature=0.7).numpy()
    np.testing.assert_array_equal(runs["a"], runs["b"])
    assert np.abs(runs["a"] - runs["c"]).max() > 1e-3
    # what the rollout sees (no dropout) differs from the update's pass: using rollout log-probs as the old
    # policy made the ratio != 1 at the first update
    assert np.abs(runs["a"] - no_dropout).max() > 1e-3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets_ratio"))


def test_ratio_is_exactly_one_at_the_first_update(assets, tmp_path, monkeypatch):
    from ppiad.config import load_config
    from ppiad.rl import rewards
    from ppiad.rl.trainer import GRPOTrainer

    def varied(rewards_cfg, completions, samples, group_size, token_p=None, class_factors=None):
        n = len(completions)
        zeros = np.zeros(n)
        return rewards.RewardScores(np.array([float(len(t) % 7) for t in completions]),
                                    {"format": zeros, "accuracy": zeros, "focal": zeros}, np.ones(n), zeros)

    monkeypatch.setattr(rewards, "compute_rewards", varied)
    # LoRA dropout 0.1 (TINY_OVERRIDES), temperature 0.7, two updates per rollout batch
    GRPOTrainer(load_config(None, tiny_overrides(assets, str(tmp_path), "ratio", "train.max_steps=2",
                                                 "grpo.num_iterations=2", "grpo.temperature=0.7",
                                                 "grpo.beta=0.04"))).train()
    with open(os.path.join(str(tmp_path), "ratio", "metrics.jsonl")) as f:
        first, second = [json.loads(line) for line in f]
    assert first["max_abs_log_ratio"] == 0.0 and first["ratio"] == 1.0 and first["clip_fraction"] == 0.0
    assert first["grad_norm"] > 0
    # the second update of the same rollouts sees the policy that the first one moved
    assert second["max_abs_log_ratio"] > 0.0
