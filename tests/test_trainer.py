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
