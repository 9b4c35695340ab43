"""Multi-process training on CPU: two processes under `paddle.distributed.launch` must end with identical
trainable parameters (data parallel and sharding stage 1), each having seen different data.

Running this file as a script is the worker the tests launch (a toy model with a frozen base and a small
trainable part, like LoRA, trained with gradient accumulation)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ppiad.utils.distributed import DistEnv, shard_samples, unwrap, wrap  # noqa: E402


def test_shard_samples_disjoint_equal_and_deterministic():
    items = list(range(11))
    parts = [shard_samples(items, r, 3) for r in range(3)]
    assert all(len(p) == 3 for p in parts)  # 11 -> 9 usable, equal counts per rank
    flat = sorted(x for p in parts for x in p)
    assert len(set(flat)) == 9 and set(flat) <= set(items)
    assert parts == [shard_samples(items, r, 3) for r in range(3)]
    assert shard_samples(items, 0, 1) == items
    with pytest.raises(ValueError):
        shard_samples(items, 3, 3)


def test_single_process_wrap_is_identity():
    import paddle
    layer = paddle.nn.Linear(2, 2)
    opt = paddle.optimizer.SGD(parameters=layer.parameters())
    m, o = wrap(layer, opt, DistEnv())
    assert m is layer and o is opt and unwrap(m) is layer


def test_stage2_and_stage3_refused_on_cpu_without_emulation(monkeypatch):
    import paddle
    from ppiad.utils import distributed
    if distributed._has_accelerator():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    monkeypatch.delenv(distributed.EMULATE_ENV, raising=False)
    with pytest.raises(RuntimeError, match="needs GPUs; use stage1 or none on CPU"):
        distributed.init("stage2")
    with pytest.raises(RuntimeError, match="needs GPUs; use stage1 or none on CPU"):
        distributed.init("stage3")
    layer = paddle.nn.Linear(2, 2)
    for mode in ("stage2", "stage3"):
        with pytest.raises(RuntimeError, match="needs GPUs"):
            wrap(layer, paddle.optimizer.SGD(parameters=layer.parameters()), DistEnv(0, 2, mode))
    monkeypatch.setenv(distributed.EMULATE_ENV, "0")   # only "1" turns the emulation on
    with pytest.raises(RuntimeError, match="needs GPUs; use stage1 or none on CPU"):
        distributed.init("stage2")
    monkeypatch.setenv(distributed.EMULATE_ENV, "1")   # emulation (tests/test_stage3.py runs both stages)
    for mode in ("stage2", "stage3"):
        distributed._check_device(mode)


def _launch(tmp_path, sharding):
    out = tmp_path / sharding
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
           "--log_dir", str(out / "log"), os.path.abspath(__file__), "--worker", str(out), sharding]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    logs = ""
    if (out / "log").is_dir():
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted((out / "log").iterdir()))
    assert proc.returncode == 0, f"launch failed:\n{proc.stderr[-2000:]}\n{logs}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow  # the trainer-level test below covers the same on the real model; this isolates wrap()
@pytest.mark.parametrize("sharding", ["none", "stage1"])
def test_two_process_training_keeps_ranks_identical(tmp_path, sharding):
    r0, r1 = _launch(tmp_path, sharding)
    assert r0["data"] != r1["data"]  # each rank trained on its own slice
    assert r0["initial"] != r0["final"]  # training moved the parameters
    for name in r0["final"]:
        np.testing.assert_allclose(r0["final"][name], r1["final"][name], rtol=0, atol=1e-7, err_msg=name)
    assert r0["frozen_unchanged"] and r1["frozen_unchanged"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.test_trainer import build_assets
    return build_assets(tmp_path_factory.mktemp("tiny_assets"))


@pytest.mark.parametrize("sharding", ["none", "stage1"])
def test_two_process_grpo_run_keeps_adapters_identical(assets, tmp_path, sharding):
    """tools/train.py under paddle.distributed.launch: both ranks end with the same adapters (sha256 in their
    logs), which moved away from the start adapter, after training on different prompts."""
    import re

    from safetensors.numpy import load_file

    from tests.test_trainer import tiny_overrides

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "log"), os.path.join(ROOT, "tools", "train.py"), "-c",
           os.path.join(ROOT, "configs", "tiny_cpu.yaml"), "-o",
           *tiny_overrides(assets, str(out), "dist", "train.max_steps=2", f"distributed.sharding={sharding}")]
    proc = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=150)
    logs = ""
    if (tmp_path / "log").is_dir():
        logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted((tmp_path / "log").iterdir()))
    assert proc.returncode == 0, f"launch failed:\n{proc.stderr[-1500:]}\n{logs}"
    run = out / "dist"
    texts = [(run / "train.log").read_text(), (run / "train.rank1.log").read_text()]
    digests = [re.search(r"adapter sha256 ([0-9a-f]{64})", t).group(1) for t in texts]
    firsts = [re.search(r"first prompts of this rank: (.*)", t).group(1) for t in texts]
    assert digests[0] == digests[1]
    assert firsts[0] != firsts[1]
    final = load_file(str(run / "checkpoints" / "step_000002" / "adapter_model.safetensors"))
    start = load_file(os.path.join(assets["adapter"], "adapter_model.safetensors"))
    assert any(not np.array_equal(final[k], start[k]) for k in start)
    if sharding == "stage1":
        assert (run / "checkpoints" / "step_000002" / "optimizer_rank1.pdopt").is_file()


def _worker(out_dir, sharding):
    import paddle
    from ppiad.utils import distributed
    from ppiad.utils.seed import seed_everything

    env = distributed.init(sharding)
    seed_everything(1234 + env.rank)  # different seeds on purpose: wrapping must synchronise the start

    class Toy(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.base = paddle.nn.Linear(4, 4)
            self.adapter = paddle.nn.Linear(4, 1)
            self.base.weight.stop_gradient = True
            self.base.bias.stop_gradient = True

        def forward(self, x):
            return self.adapter(paddle.tanh(self.base(x)))

    model = Toy()
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    opt = paddle.optimizer.AdamW(learning_rate=0.05, parameters=trainable)
    model, opt = distributed.wrap(model, opt, env)
    frozen_before = unwrap(model).base.weight.numpy().copy()
    initial = {n: p.numpy().tolist() for n, p in unwrap(model).named_parameters() if not p.stop_gradient}

    rng = np.random.default_rng(0)  # the same global data on every rank; shard_samples splits it
    data = [(rng.normal(size=4).astype("float32"), float(rng.normal())) for _ in range(16)]
    mine = shard_samples(data, env.rank, env.world_size)
    accum = 2
    for step in range(2):
        for micro in range(accum):
            x, y = mine[step * accum + micro]
            pred = model(paddle.to_tensor(x[None]))
            loss = ((pred - y) ** 2).mean() / accum
            loss.backward()
        distributed.combine_gradients(trainable, env)
        distributed.clip_grad_norm(trainable, 1.0)
        opt.step()
        opt.clear_grad()

    core = unwrap(model)
    result = {
        "data": [x.tolist() for x, _ in mine[:4]],
        "initial": initial,
        "final": {n: p.numpy().tolist() for n, p in core.named_parameters() if not p.stop_gradient},
        "frozen_unchanged": bool(np.array_equal(frozen_before, core.base.weight.numpy())),
    }
    with open(os.path.join(out_dir, f"rank{env.rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3])
