"""The demo never reuses another seed's (or setting's) data, warm start, run or evaluation (issue 12, item 1)."""
import os
import subprocess
import sys

import pytest

from ppiad.config import load_config
from ppiad.demo.pipeline import RUN_IDENTITY, check_outputs, prepare_data, prepare_model, run_dir, run_identity
from ppiad.utils.identity import IdentityError, write_identity

from tests.test_demo import ROOT, small_overrides


def _cfg(tmp, *extra):
    return load_config(os.path.join(ROOT, "configs", "demo.yaml"), small_overrides(tmp) + list(extra))


@pytest.fixture(scope="module")
def seed0(tmp_path_factory):
    """A seed-0 demo's data, warm start and run directory (training itself is not needed for the checks)."""
    tmp = tmp_path_factory.mktemp("demo_id")
    cfg = _cfg(tmp)
    check_outputs(cfg)
    os.makedirs(os.path.join(run_dir(cfg), "checkpoints"))
    write_identity(run_dir(cfg), run_identity(cfg), RUN_IDENTITY)
    prepare_data(cfg, log=lambda m: None)
    prepare_model(cfg, log=lambda m: None)
    check_outputs(cfg)   # the same settings pass
    return tmp


def test_seed_1_does_not_reuse_seed_0_data(seed0):
    with pytest.raises(IdentityError, match=r"data/train' holds a synthetic tree made with other settings "
                                            r"\(differing: seed\); pass another data.train.root"):
        check_outputs(_cfg(seed0, "seed=1"))
    with pytest.raises(IdentityError, match=r"data/heldout' .*\(differing: demo.test_images\)"):
        check_outputs(_cfg(seed0, "demo.test_images=11"))


def test_seed_1_does_not_reuse_seed_0_warm_start(seed0, tmp_path):
    new_data = [f"data.train.root={tmp_path}/train", f"data.eval.root={tmp_path}/heldout"]
    with pytest.raises(IdentityError, match=r"model_warmstart' holds a warm-started model made with other "
                                            r"settings \(differing: seed\)"):
        check_outputs(_cfg(seed0, "seed=1", *new_data))
    with pytest.raises(IdentityError, match=r"\(differing: demo.warmstart_steps\)"):
        check_outputs(_cfg(seed0, "demo.warmstart_steps=3"))


def test_seed_1_does_not_reuse_seed_0_run(seed0, tmp_path):
    fresh = [f"data.train.root={tmp_path}/train", f"data.eval.root={tmp_path}/heldout",
             f"model.path={tmp_path}/model"]
    with pytest.raises(IdentityError, match=r"demo' holds a demo run made with other settings \(differing: seed\); "
                                            r"pass another run_name"):
        check_outputs(_cfg(seed0, "seed=1", *fresh))
    with pytest.raises(IdentityError, match=r"\(differing: grpo.beta\)"):
        check_outputs(_cfg(seed0, "grpo.beta=0.04"))
    check_outputs(_cfg(seed0, "train.save_every=7"))   # where and how often it saves is not part of it
    # nor what only trades speed for memory or watches the run: the same set as a training run's identity
    check_outputs(_cfg(seed0, "train.recompute=true", "train.eval_every=7", "model.attn_implementation=sdpa"))
    check_outputs(_cfg(seed0, "seed=1", *fresh, "run_name=demo_seed1"))   # all new: passes


def test_demo_tool_with_seed_1_exits_2_before_doing_anything(seed0):
    before = sorted(os.listdir(seed0 / "output" / "demo"))
    proc = subprocess.run([sys.executable, "tools/demo.py", "-o", *small_overrides(seed0), "seed=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "(differing: seed)" in proc.stderr
    assert sorted(os.listdir(seed0 / "output" / "demo")) == before
