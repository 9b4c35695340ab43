"""What binds a training run folder (fix round): speed / memory / logging settings never block
`train.resume=auto`; the run length may grow when the schedule does not depend on it, and is refused with the
reason otherwise; a start that failed before its first checkpoint does not bind the folder; a finished run
re-run with resume=auto reports the checkpoint it holds."""
import json
import os

import pytest

from ppiad.config import load_config
from ppiad.utils.identity import IdentityError

from tests.conftest import ROOT, load_tool

TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from ppiad.data.synthetic import generate_synthetic
    from ppiad.models.tiny import build_tiny_checkpoint

    base = tmp_path_factory.mktemp("train_scope")
    build_tiny_checkpoint(str(base / "tiny"), seed=0)
    generate_synthetic(str(base / "data"), num_images=8, defect_ratio=0.25, size=112, seed=0, categories=["fabric"])
    return base


def _opts(base, run):
    return [f"output_dir={base / 'out'}", f"run_name={run}", f"model.path={base / 'tiny'}",
            f"data.train.root={base / 'data'}", "data.train.dataset=mvtec", "seed=0", "train.max_steps=3"]


def _finished(base, run, *extra):
    """A run folder as tools/train.py leaves it after 3 steps (identity.json + a complete checkpoint)."""
    tool = load_tool("train")
    tool.check_run_identity(load_config(TINY, _opts(base, run) + list(extra)))
    step = base / "out" / run / "checkpoints" / "step_000003"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 3}))
    (base / "out" / run / "checkpoints" / "latest").write_text("step_000003")
    return tool


@pytest.mark.parametrize("extra", [["train.recompute=true"], ["model.attn_implementation=sdpa"],
                                   ["data.num_workers=2"], ["train.max_bad_steps=9"],
                                   ["model.max_prompt_length=4096"], ["distributed.sharding=stage2"],
                                   ["train.log_every=5", "train.save_every=2", "train.eval_images=7"]])
def test_speed_memory_logging_settings_do_not_block_resume(base, extra):
    run = "speed_" + extra[0].split("=")[0].replace(".", "_")
    tool = _finished(base, run)
    tool.check_run_identity(load_config(TINY, _opts(base, run) + ["train.resume=auto"] + extra))


def test_result_settings_still_block(base):
    tool = _finished(base, "result")
    with pytest.raises(IdentityError, match=r"differing: train.learning_rate\)"):
        tool.check_run_identity(load_config(TINY, _opts(base, "result") + ["train.learning_rate=0.5"]))


def test_extend_constant_schedule_allowed(base):
    tool = _finished(base, "extend", "train.lr_schedule=constant", "train.warmup_ratio=0")
    tool.check_run_identity(load_config(TINY, _opts(base, "extend") + [
        "train.resume=auto", "train.max_steps=6", "train.lr_schedule=constant", "train.warmup_ratio=0"]))


@pytest.mark.parametrize("schedule,why", [(["train.lr_schedule=cosine"], "train.lr_schedule=cosine decays"),
                                          (["train.warmup_ratio=0.1"], "train.warmup_ratio=0.1 is a share")])
def test_extend_refused_when_schedule_depends_on_total(base, schedule, why):
    run = "noext_" + schedule[0].split("=")[0].replace(".", "_")
    tool = _finished(base, run, *schedule)
    with pytest.raises(IdentityError, match=r"differing: train.max_steps\).*run length cannot change here: " + why):
        tool.check_run_identity(load_config(TINY, _opts(base, run) + schedule + ["train.max_steps=6"]))


def test_failed_start_does_not_bind_the_folder(base):
    """identity.json of a start that never saved a checkpoint (it crashed in setup, or was stopped before its
    first checkpoint) is replaced by the next start's. (The review's example, lora.r=-4, is now refused when the
    config loads; lora.r=8 stands for any start that died before a checkpoint.)"""
    tool = load_tool("train")
    tool.check_run_identity(load_config(TINY, _opts(base, "neg") + ["lora.r=8"]))
    assert os.path.isfile(base / "out" / "neg" / "identity.json")
    tool.check_run_identity(load_config(TINY, _opts(base, "neg")))       # the corrected run starts
    with open(base / "out" / "neg" / "identity.json") as f:
        assert json.load(f)["lora.r"] == 4


def test_checkpoints_without_identity_still_refused(base):
    run_dir = base / "out" / "old"
    (run_dir / "checkpoints" / "step_000001").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000001" / "trainer_state.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(IdentityError, match="without identity.json"):
        load_tool("train").check_run_identity(load_config(TINY, _opts(base, "old")))
