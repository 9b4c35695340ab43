"""tools/train.py does not continue a run directory whose checkpoints were made with other settings
(issue 12, item 1: every resumable output records what produced it)."""
import json
import os

import pytest

from ppiad.config import load_config

from tests.conftest import ROOT, load_tool

TINY = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run directory as tools/train.py leaves it after step 1 (identity.json + a complete checkpoint), made
    with seed 0; the checkpoint's content is not needed by the check."""
    from ppiad.data.synthetic import generate_synthetic
    from ppiad.models.tiny import build_tiny_checkpoint

    base = tmp_path_factory.mktemp("train_id")
    build_tiny_checkpoint(str(base / "tiny"), seed=0)
    generate_synthetic(str(base / "data"), num_images=8, defect_ratio=0.25, size=112, seed=0,
                       categories=["fabric"])
    opts = [f"output_dir={base / 'out'}", "run_name=r", f"model.path={base / 'tiny'}",
            f"data.train.root={base / 'data'}", "data.train.dataset=mvtec", "seed=0"]
    tool = load_tool("train")
    tool.check_run_identity(load_config(TINY, opts))
    step = base / "out" / "r" / "checkpoints" / "step_000001"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (base / "out" / "r" / "checkpoints" / "latest").write_text("step_000001")
    return tool, opts


def test_same_settings_continue(finished_run):
    tool, opts = finished_run
    tool.check_run_identity(load_config(TINY, opts))
    tool.check_run_identity(load_config(TINY, opts + ["train.save_every=7", "train.resume=auto"]))


@pytest.mark.parametrize("extra,keys", [(["seed=1"], "seed"),
                                        (["grpo.beta=0.5", "lora.r=2"], "grpo.beta, lora.r"),
                                        (["rewards.focal.gamma=1.0"], "rewards.focal.gamma"),
                                        (["data.train.categories=[fabric]"], "data.train.categories")])
def test_other_settings_stop_naming_the_keys(finished_run, extra, keys):
    from ppiad.utils.identity import IdentityError

    tool, opts = finished_run
    with pytest.raises(IdentityError, match=rf"holds training checkpoints made with other settings "
                                            rf"\(differing: {keys}\); pass another run_name"):
        tool.check_run_identity(load_config(TINY, opts + extra))


def test_train_tool_exits_2_with_one_line(finished_run, capsys):
    tool, opts = finished_run
    with pytest.raises(SystemExit) as exc:
        tool.main(["-c", TINY, "-o", *opts, "seed=3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "(differing: seed);" in err, err
