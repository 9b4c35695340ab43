"""Dynamic sampling and truncated-completion masking in the trainer (issue 16, items 3 and 4), on the tiny
model and synthetic data of tests/test_trainer.py."""
import os

import numpy as np
import pytest

from tests.test_trainer import _metrics, build_assets, tiny_overrides


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets_ds"))


@pytest.fixture
def defect_only_signal(monkeypatch):
    """Rewards with spread only in groups of defect images: every normal image's group is all 1.0, so with
    dynamic sampling a step trains on defect prompts only (when the draws find them)."""
    from ppiad.rl import rewards

    def fake(rewards_cfg, completions, samples, group_size, token_p=None, class_factors=None):
        defect = np.repeat([s.is_defect for s in samples], group_size)
        total = np.where(defect, [float(len(t) % 7) + 0.5 * (i % 2) for i, t in enumerate(completions)], 1.0)
        zeros = np.zeros(len(completions))
        return rewards.RewardScores(total, {"format": zeros, "accuracy": zeros, "focal": zeros},
                                    np.ones(len(completions)), zeros)

    monkeypatch.setattr(rewards, "compute_rewards", fake)


def _trainer(cfg, seen, drawn=None):
    from ppiad.rl.trainer import GRPOTrainer

    class Watch(GRPOTrainer):
        def _sample(self, step, micro, batch, draw=0):
            if drawn is not None:
                drawn.setdefault(step, []).extend(s.path for s in batch)
            return super()._sample(step, micro, batch, draw)

        def _update(self, buffer):
            seen.append([s.is_defect for mb in buffer for s in mb["samples"]])
            return super()._update(buffer)

    return Watch(cfg)


def test_dynamic_sampling_trains_on_informative_groups_and_logs_the_draws(assets, tmp_path, defect_only_signal):
    from ppiad.config import load_config

    seen, drawn = [], {}
    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "ds", "train.max_steps=4",
                                           "grpo.dynamic_sampling=true", "grpo.max_resample_factor=8"))
    _trainer(cfg, seen, drawn).train()
    assert all(len(paths) == len(set(paths)) for paths in drawn.values())   # no image twice in a step
    # 24 images, 6 defect: with up to 8 x 2 prompts drawn per step the two informative groups are found
    assert seen == [[True, True]] * 4
    rows = _metrics(os.path.join(str(tmp_path), "ds"))
    for m in rows:
        assert m["sampling/informative_groups"] == 2.0
        assert m["sampling/prompts_drawn"] == len(drawn[m["step"] - 1])
        assert 2.0 <= m["sampling/prompts_drawn"] <= 16.0
        # a step draws more than its 2 planned prompts exactly when a planned one was normal (zero spread)
        assert (m["sampling/prompts_drawn"] > 2.0) == (m["frac_reward_zero_std"] > 0.0)
    assert any(m["sampling/prompts_drawn"] > 2.0 for m in rows)

    seen_off = []
    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "plain", "train.max_steps=2"))
    _trainer(cfg, seen_off).train()
    for m in _metrics(os.path.join(str(tmp_path), "plain")):
        assert m["sampling/prompts_drawn"] == 2.0 and "sampling/informative_groups" not in m


def test_dynamic_sampling_cap_fills_with_zero_spread_groups(assets, tmp_path, defect_only_signal):
    from ppiad.config import load_config

    seen = []
    # factor 1: nothing beyond the plan's 2 prompts; the step keeps its batch size whatever their spread
    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "cap", "train.max_steps=3",
                                           "grpo.dynamic_sampling=true", "grpo.max_resample_factor=1"))
    _trainer(cfg, seen).train()
    assert [len(s) for s in seen] == [2, 2, 2]
    for m in _metrics(os.path.join(str(tmp_path), "cap")):
        assert m["sampling/prompts_drawn"] == 2.0


def test_dynamic_sampling_resume_is_exact(assets, tmp_path, defect_only_signal):
    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer

    out = str(tmp_path)
    extra = ("train.max_steps=2", "train.save_every=1", "grpo.dynamic_sampling=true", "grpo.max_resample_factor=8")
    straight = GRPOTrainer(load_config(None, tiny_overrides(assets, out, "straight", *extra))).train()
    resumed = GRPOTrainer(load_config(None, tiny_overrides(
        assets, out, "resumed", *extra, f"train.resume={out}/straight/checkpoints/step_000001"))).train()
    a, b = _metrics(os.path.join(out, "straight")), _metrics(os.path.join(out, "resumed"))
    assert a[1]["grad_norm"] > 0
    for key in ("loss", "sampling/prompts_drawn", "frac_reward_zero_std", "reward/total"):
        assert b[0][key] == a[1][key], key
    assert resumed["adapter_sha256"] == straight["adapter_sha256"]


def test_truncated_completions_add_no_loss_when_masked(assets, tmp_path, defect_only_signal, monkeypatch):
    import ppiad.models.generation as generation
    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer

    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: real(*a, **{**k, "eos_token_ids": [-1]}))
    out = str(tmp_path)
    # every completion runs to max_new_tokens without a stop token; all prompts informative (all defects drawn)
    base = ("train.max_steps=1", "grpo.beta=0", "grpo.dynamic_sampling=true", "grpo.max_resample_factor=8")
    GRPOTrainer(load_config(None, tiny_overrides(assets, out, "kept", *base))).train()
    GRPOTrainer(load_config(None, tiny_overrides(assets, out, "masked", *base,
                                                 "grpo.mask_truncated_completions=true"))).train()
    kept, masked = _metrics(os.path.join(out, "kept"))[0], _metrics(os.path.join(out, "masked"))[0]
    assert kept["completions/truncated_share"] == 1.0 and kept["completions/min_length"] == 12.0
    assert kept["grad_norm"] > 0
    assert masked["loss"] == 0.0 and masked["grad_norm"] == 0.0
    # entropy of the sampled positions, in nats: positive and at most log(vocabulary size)
    import json

    with open(os.path.join(assets["model"], "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    assert 0.0 < kept["entropy"] <= np.log(vocab)


def test_two_processes_agree_on_the_draws_and_the_held_out_figures(assets, tmp_path):
    """tools/train.py under paddle.distributed.launch with dynamic sampling, batch reward scaling and held-out
    evaluation: every collective is reached by both ranks (no hang), the adapters stay identical, and the
    logged draws and held-out figures cover both ranks' images."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "log"), os.path.join(root, "tools", "train.py"), "-c",
           os.path.join(root, "configs", "tiny_cpu.yaml"), "-o",
           *tiny_overrides(assets, str(out), "dist", "train.max_steps=2", "grpo.dynamic_sampling=true",
                           "grpo.max_resample_factor=3", "grpo.scale_rewards=batch", "train.eval_every=2",
                           "train.eval_images=7", f"data.eval.root={assets['data']}", "data.eval.dataset=mvtec",
                           "data.allow_overlap=true",   # one tiny tree for training and validation
                           "eval.max_new_tokens=12")]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    logs = ""
    if (tmp_path / "log").is_dir():
        logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted((tmp_path / "log").iterdir()))
    assert proc.returncode == 0, f"launch failed:\n{proc.stderr[-1500:]}\n{logs}"
    run = out / "dist"
    texts = [(run / "train.log").read_text(), (run / "train.rank1.log").read_text()]
    digests = [re.search(r"adapter sha256 ([0-9a-f]{64})", t).group(1) for t in texts]
    assert digests[0] == digests[1]
    rows = _metrics(str(run))
    assert all(2.0 <= m["sampling/prompts_drawn"] <= 6.0 for m in rows if "sampling/prompts_drawn" in m)
    assert "held-out (7 images)" in texts[0]
    assert [m["eval/n"] for m in rows if "eval/n" in m] == [7.0]   # no image dropped by the split
    assert [m["step"] for m in rows if "eval/invalid_rate" in m] == [2]
