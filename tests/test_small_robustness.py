"""Small robustness fixes: malformed JSONL lines, skipped-folder warnings logged once."""
import logging
import os
import signal
import subprocess
import sys

import pytest

from ppiad.utils.cli import user_errors
from ppiad.utils.io import MalformedFileError, read_json, read_jsonl
from tests.conftest import ROOT
from tests.test_folder_masks import mask, photo


def test_malformed_middle_line_names_file_and_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"path": "a"}\n{"path": "b"\n{"path": "c"}\n')
    with pytest.raises(MalformedFileError, match=r"predictions\.jsonl:2: not a JSON line"):
        read_jsonl(str(path))
    with pytest.raises(SystemExit) as exit_:
        with user_errors():
            read_jsonl(str(path))
    assert exit_.value.code == 2 and f"{path}:2: not a JSON line" in capsys.readouterr().err
    # a torn last line (a kill mid-write) is still dropped silently
    path.write_text('{"path": "a"}\n{"path": "b"')
    assert read_jsonl(str(path)) == [{"path": "a"}]
    bad = tmp_path / "m.json"
    bad.write_text("{")
    with pytest.raises(MalformedFileError, match="m.json' is not valid JSON"):
        read_json(str(bad))


def test_skipped_mask_folder_is_warned_once(tmp_path):
    root = tmp_path / "parts"
    for i in range(2):
        photo(str(root / "bottle" / "good" / f"{i}.png"), i)
        mask(str(root / "bottle" / "ground_truth" / f"{i}_mask.png"))
    photo(str(root / "bottle" / "crack" / "0.png"), 9)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_data.py"), "stats", "--dataset",
                          "folder", "--root", str(root)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    warning = f"skipped {os.path.join(str(root), 'bottle', 'ground_truth')}"
    assert (run.stdout + run.stderr).count(warning) == 1


def test_training_stopped_by_ctrl_c_exits_130_after_saving(tmp_path):
    from ppiad.cli.train import exit_code
    from ppiad.config import load_config
    from ppiad.rl.checkpoint import find_latest
    from ppiad.rl.trainer import GRPOTrainer
    from ppiad.utils.signals import GracefulStop
    from tests.test_trainer import build_assets, tiny_overrides

    class CtrlC(GracefulStop):   # a real SIGINT, delivered as training starts
        def __enter__(self):
            super().__enter__()
            os.kill(os.getpid(), signal.SIGINT)
            return self

    stop = CtrlC(announce=False)
    assets = build_assets(tmp_path / "assets")
    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "run", "train.max_steps=3"))
    summary = GRPOTrainer(cfg, stop=stop).train()
    assert summary["stopped"] and summary["signal"] == "SIGINT" and find_latest(summary["run_dir"])
    assert exit_code(summary) == 130
    assert exit_code({**summary, "signal": "SIGTERM"}) == 143
    assert exit_code({**summary, "stopped": False, "signal": ""}) == 0
