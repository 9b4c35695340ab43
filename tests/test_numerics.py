"""Numerical safety of GRPO: the KL and ratio terms cannot overflow, non-finite steps are skipped and counted,
too many in a row stop training, and non-finite adapters are never written."""
import json
import os

import numpy as np
import paddle
import pytest

from ppiad.rl.grpo import LOG_RATIO_LIMIT, grpo_loss
from tests.test_trainer import build_assets, tiny_overrides


# ---------------------------------------------------------------- the loss
def _loss(logp, old, ref, adv=(1.0, -1.0), beta=0.04):
    x = paddle.to_tensor(np.array(logp, dtype=np.float32), stop_gradient=False)
    loss, stats = grpo_loss(x, old, ref, list(adv), [[1, 1], [1, 1]], beta=beta)
    loss.backward()
    return float(loss), x.grad.numpy(), stats


def test_large_reference_gap_gives_a_finite_kl():
    # ref - logp = 200: exp(200) overflows float32 (inf loss before the clamp)
    logp = [[-200.0, -1.0], [-1.0, -1.0]]
    ref = [[0.0, -1.0], [-1.0, -1.0]]
    loss, grad, stats = _loss(logp, None, ref)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    # the clamped token contributes exp(20) - 20 - 1 per token, averaged over the 4 tokens, times beta
    kl_big = np.exp(LOG_RATIO_LIMIT) - LOG_RATIO_LIMIT - 1
    assert stats["kl"] == pytest.approx(kl_big / 4, rel=1e-5)
    assert loss == pytest.approx(0.04 * kl_big / 4, rel=1e-4)   # the surrogate is 0 at ratio 1 (+1 - 1)
    # a gap inside the limit is untouched: k3 of d = 2 is e^2 - 3
    _, _, stats = _loss([[-3.0, -1.0], [-1.0, -1.0]], None, [[-1.0, -1.0], [-1.0, -1.0]])
    assert stats["kl"] == pytest.approx((np.exp(2.0) - 3.0) / 4, rel=1e-5)


def test_large_policy_ratio_is_finite():
    logp = [[0.0, -1.0], [-1.0, -1.0]]
    old = [[-500.0, -1.0], [-1.0, -1.0]]          # log ratio 500 on the first token
    loss, grad, stats = _loss(logp, old, None, adv=(-1.0, 1.0), beta=0.0)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert stats["ratio"] == pytest.approx((np.exp(LOG_RATIO_LIMIT) + 3) / 4, rel=1e-5)


# ---------------------------------------------------------------- adapters
def test_save_adapter_refuses_non_finite_tensors(tmp_path):
    from ppiad.models.lora import apply_lora, lora_layers, save_adapter
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.models.tiny import build_tiny_checkpoint

    model = Qwen2VLForConditionalGeneration.from_pretrained(build_tiny_checkpoint(str(tmp_path / "tiny"), seed=0))
    apply_lora(model, 4, 16, 0.0)
    name, layer = next(iter(lora_layers(model).items()))
    b = layer.lora_B.numpy()
    b[0, 0] = np.nan
    layer.lora_B.set_value(paddle.to_tensor(b))
    with pytest.raises(FloatingPointError, match=f"{name}.lora_B"):
        save_adapter(model, str(tmp_path / "adapter"))
    assert not os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")


# ---------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets_numerics"))


def _nan_rewards(monkeypatch, bad_calls):
    """compute_rewards whose totals are NaN on the rollouts numbered in `bad_calls` (0-based), varied else."""
    from ppiad.rl import rewards

    calls = {"n": 0}

    def fake(rewards_cfg, completions, samples, group_size, token_p=None, class_factors=None):
        n = len(completions)
        total = np.array([float(len(t) % 7) for t in completions])
        if calls["n"] in bad_calls:
            total[:] = np.nan
        calls["n"] += 1
        zeros = np.zeros(n)
        return rewards.RewardScores(total, {"format": zeros, "accuracy": zeros, "focal": zeros}, np.ones(n), zeros)

    monkeypatch.setattr(rewards, "compute_rewards", fake)


def _adapter(core) -> dict:
    from ppiad.models.lora import lora_state_dict

    return {k: v.numpy().copy() for k, v in lora_state_dict(core).items()}


def _metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_non_finite_step_is_skipped_and_counted(assets, tmp_path, monkeypatch):
    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer

    # grad_accum_steps 2: rollouts 0, 1 = step 1 (rollout 0 NaN -> the whole step is skipped); 2, 3 = step 2
    _nan_rewards(monkeypatch, bad_calls={0})
    trainer = GRPOTrainer(load_config(None, tiny_overrides(assets, str(tmp_path), "skip", "train.max_steps=2",
                                                           "train.max_bad_steps=2")))
    trainer.setup()
    before = _adapter(trainer.core)
    trainer.setup = lambda: None   # train() would set up again; keep this model to compare
    out = trainer.train()
    assert out["step"] == 2
    m = _metrics(os.path.join(str(tmp_path), "skip"))
    assert [r["skipped_steps"] for r in m] == [1, 1]
    assert "loss" not in m[0] and np.isfinite(m[1]["loss"])   # NaN is not written; step 2 trained
    after = _adapter(trainer.core)
    assert any(not np.array_equal(before[k], after[k]) for k in before)   # step 2 updated the adapters
    assert all(np.isfinite(v).all() for v in after.values())
    log = open(os.path.join(str(tmp_path), "skip", "train.log")).read()
    assert "step 1: loss nan" in log and "update skipped (1 in a row" in log


def test_max_bad_steps_in_a_row_stop_training_without_touching_the_adapters(assets, tmp_path, monkeypatch):
    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer, TrainingDiverged

    _nan_rewards(monkeypatch, bad_calls=set(range(100)))
    trainer = GRPOTrainer(load_config(None, tiny_overrides(assets, str(tmp_path), "nan", "train.max_steps=5",
                                                           "train.max_bad_steps=2", "train.save_every=1")))
    trainer.setup()
    before = _adapter(trainer.core)
    trainer.setup = lambda: None
    with pytest.raises(TrainingDiverged, match=r"stopped at step 2: 2 steps in a row .*train.max_bad_steps=2"):
        trainer.train()
    after = _adapter(trainer.core)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # the skipped steps were checkpointed with the untouched (finite) adapters, step 1 only (2 raised first)
    ckpts = os.path.join(str(tmp_path), "nan", "checkpoints")
    assert sorted(d for d in os.listdir(ckpts) if d.startswith("step_")) == ["step_000001"]
    assert [r["skipped_steps"] for r in _metrics(os.path.join(str(tmp_path), "nan"))] == [1, 2]


def test_trainer_never_saves_non_finite_adapters(assets, tmp_path, monkeypatch):
    from ppiad.config import load_config
    from ppiad.models.lora import lora_layers
    from ppiad.rl.trainer import GRPOTrainer

    trainer = GRPOTrainer(load_config(None, tiny_overrides(assets, str(tmp_path), "save", "train.max_steps=1")))
    trainer.setup()
    layer = next(iter(lora_layers(trainer.core).values()))
    a = layer.lora_A.numpy()
    a[0, 0] = np.inf
    layer.lora_A.set_value(paddle.to_tensor(a))
    with pytest.raises(FloatingPointError, match="not saving the step-1 checkpoint"):
        trainer._save(1, {})
    assert not os.path.exists(os.path.join(str(tmp_path), "save", "checkpoints"))


def test_max_bad_steps_must_be_positive(assets, tmp_path):
    from ppiad.config import ConfigError, load_config
    from ppiad.rl.trainer import GRPOTrainer

    with pytest.raises(ConfigError, match="train.max_bad_steps"):
        GRPOTrainer(load_config(None, tiny_overrides(assets, str(tmp_path), "x", "train.max_bad_steps=0"))).setup()
