"""Gradient averaging and clipping across processes and LoRA+ parameter groups (issue 12, items 5 and 6).

- Token averaging: 2 processes holding completions of different lengths give exactly the gradient of 1 process
  on all of them (the normaliser is the step's completion-token count over all processes).
- Clipping is global over every adapter parameter, also across the two LoRA+ groups: gradients (3, 4) with
  max norm 1 become (0.6, 0.8), and the returned (logged) norm is 5.
Running this file as a script is the launched worker of the 2-process test."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def test_clip_is_global_across_lora_plus_groups():
    import paddle

    from ppiad.utils.distributed import clip_grad_norm

    a = paddle.create_parameter([1], "float32", default_initializer=paddle.nn.initializer.Constant(0.0))
    b = paddle.create_parameter([1], "float32", default_initializer=paddle.nn.initializer.Constant(0.0))
    # LoRA+ groups, as GRPOTrainer._param_groups builds them; lr 1 so the update equals the clipped gradient
    opt = paddle.optimizer.SGD(learning_rate=1.0, parameters=[{"params": [a]}, {"params": [b],
                                                                                "learning_rate": 1.0}])
    (3.0 * a + 4.0 * b).sum().backward()
    norm = clip_grad_norm([a, b], 1.0)
    opt.step()
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose([-float(a), -float(b)], [0.6, 0.8], rtol=1e-6)


def test_paddle_clips_each_parameter_group_alone():
    """Why the trainer does not hand the clip to the optimizer: Paddle applies a group's grad_clip to that
    group only, so (3, 4) would become (1, 1)."""
    import paddle

    a = paddle.create_parameter([1], "float32", default_initializer=paddle.nn.initializer.Constant(0.0))
    b = paddle.create_parameter([1], "float32", default_initializer=paddle.nn.initializer.Constant(0.0))
    opt = paddle.optimizer.SGD(learning_rate=1.0, parameters=[{"params": [a]}, {"params": [b]}],
                               grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    (3.0 * a + 4.0 * b).sum().backward()
    opt.step()
    np.testing.assert_allclose([-float(a), -float(b)], [1.0, 1.0], rtol=1e-6)


def test_clip_grad_norm_below_the_limit_and_off():
    import paddle

    from ppiad.utils.distributed import clip_grad_norm

    p = paddle.create_parameter([2], "float32", default_initializer=paddle.nn.initializer.Constant(1.0))
    (p * paddle.to_tensor([0.3, 0.4])).sum().backward()
    assert clip_grad_norm([p], 1.0) == pytest.approx(0.5)       # below the limit: unchanged
    np.testing.assert_allclose(p.grad.numpy(), [0.3, 0.4], rtol=1e-6)
    assert clip_grad_norm([p], 0.0) == pytest.approx(0.5)       # 0 = off, the norm is still reported
    assert clip_grad_norm([paddle.create_parameter([1], "float32")], 1.0) == 0.0   # no gradients


def test_two_processes_give_the_one_process_gradient(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "log"), os.path.abspath(__file__), "--worker", str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process run did not finish within 120 s")
    logs = ""
    if (tmp_path / "log").is_dir():
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted((tmp_path / "log").iterdir()))
    assert proc.returncode == 0, f"launch failed:\n{proc.stderr[-2000:]}\n{logs}"
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["tokens"] == [11, 3]   # very different token counts on the two processes
        np.testing.assert_allclose(r["two_process"], r["one_process"], rtol=1e-5, atol=1e-7)
        # dividing by the local count (the old way) gives another gradient
        assert not np.allclose(r["local_normaliser"], r["one_process"], rtol=1e-3)
        for loss_type in ("grpo", "dr_grpo"):   # the other loss types' divisors (issue 16)
            np.testing.assert_allclose(r[f"two_process/{loss_type}"], r[f"one_process/{loss_type}"], rtol=1e-5,
                                       atol=1e-7, err_msg=loss_type)


def _worker(out_dir):
    import paddle

    from ppiad.rl.grpo import grpo_loss
    from ppiad.rl.trainer import token_normalizer
    from ppiad.utils import distributed

    env = distributed.init("none")
    rng = np.random.default_rng(0)   # the same data on both ranks; each takes its own rows
    feats = rng.normal(size=(4, 6, 5)).astype("float32")      # 4 completions x 6 steps x 5 features
    tokens = rng.integers(0, 3, size=(4, 6))
    lengths = [6, 5, 2, 1]                                     # rank 0: rows 0, 1 (11 tokens); rank 1: 2, 3 (3)
    mask = np.array([[1.0] * n + [0.0] * (6 - n) for n in lengths], dtype="float32")
    adv = np.array([1.0, -0.5, 0.7, -1.2], dtype="float32")
    ref = rng.normal(size=(4, 6)).astype("float32") * 0.1 - 1.0

    def loss_of(layer, rows, normalizer, loss_type="bnpo"):
        logits = layer(paddle.to_tensor(feats[rows]))
        logp = paddle.take_along_axis(paddle.nn.functional.log_softmax(logits, -1),
                                      paddle.to_tensor(tokens[rows]).unsqueeze(-1), -1)[..., 0]
        loss, _ = grpo_loss(logp, None, paddle.to_tensor(ref[rows]), adv[rows], mask[rows], beta=0.04,
                            normalizer=normalizer, loss_type=loss_type)
        return loss

    def fresh():
        paddle.seed(7)
        return paddle.nn.Linear(5, 3)

    rows = [0, 1] if env.rank == 0 else [2, 3]
    local = float(mask[rows].sum())
    single = fresh()                                           # 1 process, all four completions
    loss_of(single, [0, 1, 2, 3], float(mask.sum())).backward()
    results = {"tokens": [int(mask[[0, 1]].sum()), int(mask[[2, 3]].sum())],
               "one_process": single.weight.grad.numpy().ravel().tolist()}
    for key, norm in (("two_process", token_normalizer(local, env)), ("local_normaliser", local)):
        layer = fresh()
        wrapped, _ = distributed.wrap(layer, paddle.optimizer.SGD(parameters=layer.parameters()), env)
        loss_of(wrapped, rows, norm).backward()                # DataParallel averages the gradients
        distributed.combine_gradients(layer.parameters(), env)
        results[key] = layer.weight.grad.numpy().ravel().tolist()
    from ppiad.rl.grpo import loss_normalizer_units

    for loss_type in ("grpo", "dr_grpo"):
        single = fresh()
        loss_of(single, [0, 1, 2, 3], loss_normalizer_units(mask, loss_type, 6), loss_type).backward()
        results[f"one_process/{loss_type}"] = single.weight.grad.numpy().ravel().tolist()
        layer = fresh()
        wrapped, _ = distributed.wrap(layer, paddle.optimizer.SGD(parameters=layer.parameters()), env)
        norm = token_normalizer(loss_normalizer_units(mask[rows], loss_type, 6), env)
        loss_of(wrapped, rows, norm, loss_type).backward()
        distributed.combine_gradients(layer.parameters(), env)
        results[f"two_process/{loss_type}"] = layer.weight.grad.numpy().ravel().tolist()
    with open(os.path.join(out_dir, f"rank{env.rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
