"""Checkpoints: atomic layout, `latest` / auto-resume lookup, and exact continuation of training after a
reload (optimizer moments, LR schedule and every RNG), even when Paddle numbers the layers differently."""
import json
import os
import random

import numpy as np
import paddle
import pytest

from ppiad.config import defaults
from ppiad.rl import checkpoint as ck
from ppiad.utils.seed import derive_seed, get_rng_state, seed_everything, set_rng_state


class Toy(paddle.nn.Layer):
    """A frozen base and a small trainable part with dropout, like a LoRA-adapted model."""

    def __init__(self):
        super().__init__()
        self.base = paddle.nn.Linear(6, 6)
        self.adapter = paddle.nn.Linear(6, 1)
        self.drop = paddle.nn.Dropout(0.3)
        for p in self.base.parameters():
            p.stop_gradient = True

    def forward(self, x):
        return self.adapter(self.drop(paddle.tanh(self.base(x))))


def build(adapter_seed=0):
    seed_everything(0)
    model = Toy()  # the base stands for pretrained weights: the same in every process
    paddle.seed(adapter_seed)
    model.adapter.weight.set_value(paddle.randn(model.adapter.weight.shape))
    seed_everything(0)
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    sched = paddle.optimizer.lr.LambdaDecay(0.05, lambda s: min(1.0, (s + 1) / 3))
    opt = paddle.optimizer.AdamW(learning_rate=sched, parameters=trainable, weight_decay=0.01,
                                 grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    return model, opt, sched


def train_step(model, opt, sched):
    # Draws from python, numpy and paddle RNGs, as a rollout + dropout step does.
    x = paddle.to_tensor(np.random.normal(size=(4, 6)).astype("float32"))
    y = random.random() + paddle.rand([4, 1])
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    opt.clear_grad()
    sched.step()
    return float(loss)


def trainable_state(model):
    return {n: p for n, p in model.named_parameters() if not p.stop_gradient}


def test_rng_state_round_trips_through_json():
    seed_everything(7)
    state = json.loads(json.dumps(get_rng_state()))
    a = (random.random(), float(np.random.rand()), float(paddle.rand([1])))
    set_rng_state(state)
    b = (random.random(), float(np.random.rand()), float(paddle.rand([1])))
    assert a == b
    assert derive_seed(1, "x", 2) == derive_seed(1, "x", 2) != derive_seed(1, "x", 3)


def test_resume_continues_exactly(tmp_path):
    run = str(tmp_path / "run")
    # Uninterrupted: 4 steps.
    model, opt, sched = build()
    straight = [train_step(model, opt, sched) for _ in range(4)]
    final_straight = {n: p.numpy() for n, p in trainable_state(model).items()}

    # Interrupted: 2 steps, checkpoint, then a fresh model (new internal layer names) resumes.
    model, opt, sched = build()
    first = [train_step(model, opt, sched) for _ in range(2)]
    path = ck.save_checkpoint(run, 2, trainable_state=trainable_state(model), optimizer=opt, lr_scheduler=sched,
                              rng=get_rng_state(), data_position={"epoch": 0, "index": 16},
                              config=defaults(), metrics={"loss": first[-1]},
                              adapter_config={"r": 4}, param_names=ck.param_name_map(model))
    random.random(), np.random.rand(), paddle.rand([3])  # disturb every RNG after the save

    model2, opt2, sched2 = build(adapter_seed=99)  # different adapter init: the checkpoint must overwrite it
    assert model2.adapter.weight.name != model.adapter.weight.name
    for name, arr in ck.read_adapter_tensors(path).items():
        dict(model2.named_parameters())[name].set_value(arr)
    state = ck.load_checkpoint(ck.find_latest(run), optimizer=opt2, lr_scheduler=sched2,
                               param_names=ck.param_name_map(model2))
    assert state.step == 2 and state.data_position == {"epoch": 0, "index": 16}
    resumed = first + [train_step(model2, opt2, sched2) for _ in range(2)]
    assert resumed == straight  # bit-exact
    for n, p in trainable_state(model2).items():
        np.testing.assert_array_equal(p.numpy(), final_straight[n])


def test_layout_latest_pointer_and_fallback(tmp_path):
    run = str(tmp_path / "run")
    model, opt, sched = build()
    train_step(model, opt, sched)
    assert ck.find_latest(run) is None
    for step in (100, 200):
        ck.save_checkpoint(run, step, trainable_state=trainable_state(model), optimizer=opt, lr_scheduler=sched,
                           rng=get_rng_state(), config=defaults(), adapter_config={"r": 4})
    d = os.path.join(run, "checkpoints", "step_000200")
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors", "config.yaml",
                                     "optimizer.pdopt", "trainer_state.json"]
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == "step_000200"
    assert [os.path.basename(p) for p in ck.list_checkpoints(run)] == ["step_000100", "step_000200"]  # kept
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith(".tmp")]

    # A crash mid-save leaves a temp dir and an incomplete step dir: neither is picked up.
    os.makedirs(os.path.join(run, "checkpoints", ".tmp-step_000300"))
    os.makedirs(os.path.join(run, "checkpoints", "step_000300"))
    assert ck.find_latest(run) == d
    os.remove(os.path.join(run, "checkpoints", "latest"))  # pointer lost: fall back to the highest step
    assert ck.find_latest(run) == d
    # A save over a stale temp dir still works.
    ck.save_checkpoint(run, 300, trainable_state=lambda out: open(os.path.join(out, "adapter_model.safetensors"),
                                                                  "wb").close())
    assert ck.find_latest(run).endswith("step_000300")


def test_bad_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        ck.load_checkpoint(str(tmp_path))
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="trainer_state.json"):
        ck.load_checkpoint(str(tmp_path))
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3}))
    model, opt, _ = build()
    with pytest.raises(FileNotFoundError, match="optimizer.pdopt"):
        ck.load_checkpoint(str(tmp_path), optimizer=opt)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "sharded_optimizer": True,
                                                             "world_size": 2}))
    with pytest.raises(ValueError, match="same number of processes"):
        ck.load_checkpoint(str(tmp_path), optimizer=opt, world_size=1)
