"""Trainer plumbing: graceful stop on signals, run logging that VisualDL reads back."""
import os
import signal

import pytest

from ppiad.utils.logging import RunLogger
from ppiad.utils.signals import GracefulStop


def test_first_signal_sets_flag_second_sigint_aborts():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop(announce=False) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_run_logger_writes_visualdl_scalars_and_text(tmp_path):
    from visualdl import LogReader

    run = tmp_path / "run"
    with RunLogger(str(run), total_steps=3, progress=False) as log:
        for step in (1, 2, 3):
            log.scalars(step, {"loss": step * 0.5, "reward/format": 1.0, "bad": float("nan")})
        log.info("finished")
    files = os.listdir(run / "vdl")
    assert len(files) == 1
    reader = LogReader(file_path=str(run / "vdl" / files[0]))
    assert {"train/loss", "train/reward/format"} <= set(reader.get_tags()["scalar"])
    assert [(r.id, r.value) for r in reader.get_data("scalar", "train/loss")] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert "finished" in (run / "train.log").read_text()
    assert (run / "metrics.jsonl").read_text().count("\n") == 3

    with RunLogger(str(run), rank=1) as other:  # non-zero ranks write only their own text log
        other.scalars(4, {"loss": 9.0})
        other.info("rank one")
    assert (run / "metrics.jsonl").read_text().count("\n") == 3
    assert "rank one" in (run / "train.rank1.log").read_text()


# ----------------------------------------------------------------------------------------------------------
# GRPOTrainer on the tiny model and synthetic data
# ----------------------------------------------------------------------------------------------------------
import json  # noqa: E402

import numpy as np  # noqa: E402

TINY_OVERRIDES = ["grpo.max_new_tokens=12", "grpo.num_generations=4", "model.min_pixels=3136",
                  "model.max_pixels=3136", "train.prompts_per_device=1", "train.grad_accum_steps=2",
                  "train.learning_rate=0.01", "lora.dropout=0.1"]


def build_assets(root) -> dict:
    """A tiny checkpoint, a 24-image synthetic tree and a LoRA adapter with non-zero B (so the KL term
    to the adapter-free reference already has a gradient at step 1)."""
    import paddle

    from ppiad.data.synthetic import generate_synthetic
    from ppiad.models.lora import apply_lora, lora_layers, save_adapter
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.models.tiny import build_tiny_checkpoint

    root = str(root)
    model_dir = build_tiny_checkpoint(os.path.join(root, "tiny"), seed=0)
    generate_synthetic(os.path.join(root, "synth"), num_images=24, defect_ratio=0.25, size=56, seed=0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    apply_lora(model, 4, 16, 0.0)
    paddle.seed(5)
    for layer in lora_layers(model).values():
        layer.lora_B.set_value(paddle.randn(layer.lora_B.shape) * 0.5)
    adapter = save_adapter(model, os.path.join(root, "adapter"))
    return {"model": model_dir, "data": os.path.join(root, "synth"), "adapter": adapter}


def tiny_overrides(assets, out_dir, run_name, *extra) -> list:
    return [f"model.path={assets['model']}", f"data.train.root={assets['data']}",
            f"model.adapter={assets['adapter']}", f"output_dir={out_dir}", f"run_name={run_name}",
            *TINY_OVERRIDES, *extra]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets"))


@pytest.fixture
def varied_rewards(monkeypatch):
    """Rewards that vary within every group (the untrained tiny model never earns the real ones), so the
    advantage path carries gradient too."""
    from ppiad.rl import rewards

    def fake(rewards_cfg, completions, samples, group_size, token_p=None, class_factors=None):
        total = np.array([float(len(t) % 7) for t in completions])
        zeros = np.zeros(len(completions))
        return rewards.RewardScores(total, {"format": zeros, "accuracy": zeros, "focal": zeros},
                                    np.ones(len(completions)), zeros)

    monkeypatch.setattr(rewards, "compute_rewards", fake)


def _metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_reproduces_the_next_step_exactly(assets, tmp_path, varied_rewards):
    from ppiad.config import load_config
    from ppiad.rl.checkpoint import read_adapter_tensors
    from ppiad.rl.trainer import GRPOTrainer

    out = str(tmp_path)
    straight = GRPOTrainer(load_config(None, tiny_overrides(
        assets, out, "straight", "train.max_steps=2", "train.save_every=1"))).train()
    assert straight["step"] == 2
    resumed = GRPOTrainer(load_config(None, tiny_overrides(
        assets, out, "resumed", "train.max_steps=2", "train.save_every=1",
        f"train.resume={out}/straight/checkpoints/step_000001"))).train()
    assert resumed["step"] == 2

    a, b = _metrics(os.path.join(out, "straight")), _metrics(os.path.join(out, "resumed"))
    assert [m["step"] for m in a] == [1, 2] and [m["step"] for m in b] == [2]
    assert a[1]["loss"] != 0.0 and a[1]["grad_norm"] > 0  # the step did something, so equality means something
    assert b[0]["loss"] == a[1]["loss"]
    assert b[0]["reward/total"] == a[1]["reward/total"]
    w1 = read_adapter_tensors(os.path.join(out, "straight", "checkpoints", "step_000001"))
    w2 = read_adapter_tensors(straight["checkpoint"])
    w2r = read_adapter_tensors(resumed["checkpoint"])
    assert any(not np.array_equal(w1[k], w2[k]) for k in w1)
    for k in w2:
        np.testing.assert_array_equal(w2[k], w2r[k], err_msg=k)
    assert resumed["adapter_sha256"] == straight["adapter_sha256"]


def test_tiny_run_logs_visualdl_scalars_and_stops_on_request(assets, tmp_path):
    from visualdl import LogReader

    from ppiad.config import load_config
    from ppiad.rl.checkpoint import find_latest
    from ppiad.rl.trainer import GRPOTrainer

    class StopAfterFirstCheck(GracefulStop):
        @property
        def requested(self):
            return True

        @requested.setter
        def requested(self, value):
            pass

    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "run", "train.max_steps=5",
                                           "train.save_every=100"))
    summary = GRPOTrainer(cfg, stop=StopAfterFirstCheck(announce=False)).train()
    assert summary["stopped"] and summary["step"] == 1
    run = os.path.join(str(tmp_path), "run")
    assert find_latest(run).endswith("step_000001")  # the stop saved a checkpoint
    vdl = os.path.join(run, "vdl")
    reader = LogReader(file_path=os.path.join(vdl, os.listdir(vdl)[0]))
    tags = set(reader.get_tags()["scalar"])
    for name in ("loss", "kl", "reward/total", "reward/format", "reward/group_std", "accuracy", "format_rate",
                 "clip_fraction", "completion_length", "lr", "seconds_per_step", "seconds_rollout"):
        assert f"train/{name}" in tags, name
    kl = [r.value for r in reader.get_data("scalar", "train/kl")]
    assert len(kl) == 1 and kl[0] > 0  # the start adapter differs from the reference
    assert os.path.isfile(os.path.join(run, "config.yaml"))


def test_lr_schedule_shapes():
    from ppiad.rl.trainer import lr_factor

    assert [lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    lin = [lr_factor(s, 10, 0, "linear") for s in range(10)]
    assert lin[0] == 1.0 and lin[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(lin, lin[1:]))
    cos = [lr_factor(s, 11, 1, "cosine") for s in range(11)]
    assert cos[0] == 1.0 and cos[1] == 1.0 and cos[6] == pytest.approx(0.5)
    assert cos[-1] == pytest.approx(0.0244717, abs=1e-6)


def test_train_tool_names_the_missing_key(tmp_path, capsys, monkeypatch):
    import importlib.util

    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    monkeypatch.syspath_prepend(tools)
    spec = importlib.util.spec_from_file_location("train_tool", os.path.join(tools, "train.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as exc:
        tool.main(["-c", os.path.join(os.path.dirname(tools), "configs", "tiny_cpu.yaml"), "-o", "model.path="])
    assert exc.value.code == 2 and "model.path" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        tool.main(["-c", os.path.join(os.path.dirname(tools), "configs", "tiny_cpu.yaml"), "-o",
                   f"model.path={tmp_path / 'm'}", f"data.train.root={tmp_path / 'nowhere'}"])
    assert exc.value.code == 2 and "data.train.root" in capsys.readouterr().err


def test_num_iterations_reuses_one_rollout_and_checkpoints_at_block_ends(assets, tmp_path, varied_rewards):
    from ppiad.config import load_config
    from ppiad.rl.checkpoint import list_checkpoints
    from ppiad.rl.trainer import GRPOTrainer

    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "iters", "grpo.num_iterations=2",
                                           "train.max_steps=2", "train.save_every=1"))
    GRPOTrainer(cfg).train()
    rows = _metrics(os.path.join(str(tmp_path), "iters"))
    assert [r["step"] for r in rows] == [1, 2]
    assert "reward/total" in rows[0] and "reward/total" not in rows[1]  # step 2 reused step 1's rollouts
    assert rows[1]["ratio"] != 1.0  # the policy moved since the rollout: the ratio is live
    names = [os.path.basename(p) for p in list_checkpoints(os.path.join(str(tmp_path), "iters"))]
    assert names == ["step_000002"]  # not inside the block, where resuming could not be exact


def test_kl_is_zero_with_fresh_adapters_and_positive_with_trained_ones(assets, tmp_path, varied_rewards):
    """The reference is the same network with adapters off: fresh adapters (B = 0) change nothing, so the
    first step's KL is exactly 0; the non-zero start adapter of `assets` gives a positive KL."""
    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer

    out = str(tmp_path)
    fresh = [o for o in tiny_overrides(assets, out, "fresh", "train.max_steps=1") if not o.startswith("model.adapter")]
    GRPOTrainer(load_config(None, fresh)).train()
    GRPOTrainer(load_config(None, tiny_overrides(assets, out, "trained", "train.max_steps=1"))).train()
    assert _metrics(os.path.join(out, "fresh"))[0]["kl"] == 0.0
    assert _metrics(os.path.join(out, "trained"))[0]["kl"] > 1e-4


def test_lora_plus_ratio_scales_the_b_steps(assets, tmp_path, varied_rewards):
    """Adam's first step moves every parameter with a gradient by about the learning rate, so with
    lora.plus_ratio=16 the lora_B matrices move 16 times as far as lora_A (LoRA+), and with 1 equally far."""
    from ppiad.config import load_config
    from ppiad.rl.checkpoint import read_adapter_tensors
    from ppiad.rl.trainer import GRPOTrainer

    start = read_adapter_tensors(assets["adapter"])
    steps = {}
    for ratio in (1, 16):
        summary = GRPOTrainer(load_config(None, tiny_overrides(
            assets, str(tmp_path), f"plus{ratio}", "train.max_steps=1", "train.learning_rate=0.001",
            "grpo.beta=0", f"lora.plus_ratio={ratio}"))).train()
        after = read_adapter_tensors(summary["checkpoint"])
        steps[ratio] = {part: max(float(np.abs(after[k] - start[k]).max()) for k in start if part in k)
                        for part in ("lora_A", "lora_B")}
    assert steps[1]["lora_A"] == pytest.approx(1e-3, rel=0.05)
    assert steps[1]["lora_B"] == pytest.approx(1e-3, rel=0.05)
    assert steps[16]["lora_A"] == pytest.approx(1e-3, rel=0.05)
    assert steps[16]["lora_B"] == pytest.approx(16e-3, rel=0.05)


def test_adam_settings_reach_the_optimizer(assets, tmp_path):
    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer

    trainer = GRPOTrainer(load_config(None, tiny_overrides(
        assets, str(tmp_path), "adam", "train.max_steps=1", "train.adam_beta1=0.8", "train.adam_beta2=0.95",
        "train.adam_epsilon=1e-6")))
    trainer.setup()
    assert (trainer.optimizer._beta1, trainer.optimizer._beta2, trainer.optimizer._epsilon) == (0.8, 0.95, 1e-6)


def test_answer_p_by_class():
    from types import SimpleNamespace

    from ppiad.rl.trainer import answer_p_by_class

    batch = [SimpleNamespace(is_defect=True), SimpleNamespace(is_defect=False)]
    got = answer_p_by_class([0.9, 0.7, 0.2, float("nan")], batch, group_size=2)
    assert got == pytest.approx({"answer_p/defect": 0.8, "answer_p/normal": 0.2})
    only_normal = answer_p_by_class([0.5, 0.5], [SimpleNamespace(is_defect=False)], group_size=2)
    assert np.isnan(only_normal["answer_p/defect"]) and only_normal["answer_p/normal"] == 0.5


def test_sampling_settings_out_of_range_are_refused_before_any_work(tmp_path):
    from ppiad.config import ConfigError, load_config
    from ppiad.rl.trainer import GRPOTrainer, check_rollout_sampling

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for bad in ("grpo.min_p=1.0", "grpo.top_p=0", "grpo.temperature=0", "grpo.min_p=-0.1"):
        cfg = load_config(os.path.join(root, "configs", "tiny_cpu.yaml"), [bad])
        with pytest.raises(ConfigError, match="'" + bad.split("=")[0].replace(".", r"\.") + "'"):
            check_rollout_sampling(cfg.grpo)
    cfg = load_config(os.path.join(root, "configs", "tiny_cpu.yaml"), ["grpo.min_p=0.02", "grpo.top_p=1.0"])
    check_rollout_sampling(cfg.grpo)
    # the trainer checks them first: no model or data exists at these paths, and the sampling key is named
    cfg = load_config(os.path.join(root, "configs", "tiny_cpu.yaml"),
                      ["grpo.min_p=1.0", f"model.path={tmp_path / 'none'}", f"data.train.root={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="'grpo\\.min_p'"):
        GRPOTrainer(cfg).setup()
