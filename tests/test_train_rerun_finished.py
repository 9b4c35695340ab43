"""Re-running a finished training run with train.resume=auto reports the checkpoint it holds (fix round: it
returned "checkpoint": null and logged "last checkpoint None" although step_000002 existed)."""
import json
import os

from ppiad.config import load_config
from ppiad.rl.trainer import GRPOTrainer

from tests.test_trainer import assets, tiny_overrides  # noqa: F401  (module-scoped fixture)


def test_finished_run_rerun_reports_its_last_checkpoint(assets, tmp_path):  # noqa: F811
    out = str(tmp_path)
    opts = tiny_overrides(assets, out, "done", "train.max_steps=2", "train.save_every=1")
    first = GRPOTrainer(load_config(None, opts)).train()
    expected = os.path.join(out, "done", "checkpoints", "step_000002")
    assert first["step"] == 2 and os.path.samefile(first["checkpoint"], expected)
    from ppiad.utils.identity import model_fingerprint   # checkpoints record the base model they were trained on

    with open(os.path.join(expected, "trainer_state.json"), encoding="utf-8") as f:
        assert json.load(f)["base_model_fingerprint"] == model_fingerprint(assets["model"])
    again = GRPOTrainer(load_config(None, opts + ["train.resume=auto"])).train()
    assert again["step"] == 2 and again["checkpoint"] is not None
    assert os.path.samefile(again["checkpoint"], expected)
    with open(os.path.join(out, "done", "train.log"), encoding="utf-8") as f:
        log = f.read()
    assert "last checkpoint None" not in log and log.rstrip().endswith(f"last checkpoint {again['checkpoint']}")


def test_finished_constant_schedule_run_extends(assets, tmp_path):  # noqa: F811
    """train.resume=auto with a larger train.max_steps continues a finished run (constant lr, no warm-up)."""
    from tests.conftest import load_tool

    tool = load_tool("train")
    opts = tiny_overrides(assets, str(tmp_path), "ext", "train.max_steps=1", "train.save_every=1",
                          "train.lr_schedule=constant", "train.warmup_ratio=0")
    tool.check_run_identity(load_config(None, opts))
    GRPOTrainer(load_config(None, opts)).train()
    longer = load_config(None, opts + ["train.resume=auto", "train.max_steps=2"])
    tool.check_run_identity(longer)
    summary = GRPOTrainer(longer).train()
    assert summary["step"] == 2 and summary["checkpoint"].endswith("step_000002")
