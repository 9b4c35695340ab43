"""The trainer never dies mid-run on a bad training image: missing files are dropped at setup, an image that
fails to decode when drawn is logged, counted and replaced deterministically by another training image."""
import os

import numpy as np
import pytest
from PIL import Image

from ppiad.config import ConfigError, load_config
from ppiad.data.sample import DEFECT, NORMAL, Sample
from ppiad.rl.trainer import GRPOTrainer, _drop_missing, _shown_path


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)


class _Env:
    rank = 0


def _samples(tmp_path, n=6):
    out = []
    for i in range(n):
        p = str(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(p)
        out.append(Sample(p, "widget", "widget", NORMAL if i % 2 else DEFECT, "good", "train"))
    return out


def _bare_trainer(samples):
    t = GRPOTrainer.__new__(GRPOTrainer)
    t.cfg = load_config(None, [])
    t.samples, t.unreadable, t.references, t.log, t.env = samples, {}, None, _Log(), _Env()
    return t


def test_corrupt_image_is_replaced_deterministically_and_counted(tmp_path):
    samples = _samples(tmp_path)
    with open(samples[0].path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nnot really a png")
    t = _bare_trainer(samples)
    got, image, refs = t._load_or_replace(samples[0], (3, 0, 0, 0, 0))
    assert got is not samples[0] and got in samples and refs is None
    assert image.size == (8, 8)
    assert list(t.unreadable) == [samples[0].path]
    assert any(samples[0].path in line and "1 unreadable so far" in line for line in t.log.lines)
    # the same draw on a fresh trainer (another process, or after a resume) picks the same replacement
    again = _bare_trainer(samples)._load_or_replace(samples[0], (3, 0, 0, 0, 0))[0]
    assert again is got
    # a readable image is returned as is
    assert t._load_or_replace(samples[1], (3, 0, 0, 0, 1))[0] is samples[1]


def test_all_unreadable_stops_with_a_clear_error(tmp_path):
    samples = _samples(tmp_path, 2)
    for s in samples:
        open(s.path, "wb").close()
    with pytest.raises(ConfigError, match="failed to load"):
        _bare_trainer(samples)._load_or_replace(samples[0], (0, 0, 0, 0, 0))


def test_missing_files_are_dropped(tmp_path):
    samples = _samples(tmp_path, 3)
    os.remove(samples[1].path)
    kept, missing = _drop_missing(samples)
    assert kept == [samples[0], samples[2]] and missing == [samples[1].path]
    for s in kept:
        os.remove(s.path)
    with pytest.raises(ConfigError, match="none of the 3 training images exist"):
        _drop_missing(samples)


def test_first_prompt_paths_keep_the_category(tmp_path):
    root = tmp_path / "data"
    path = str(root / "pcb1" / "Data" / "Images" / "Normal" / "0001.JPG")
    assert _shown_path(path, str(root)) == os.path.join("pcb1", "Data", "Images", "Normal", "0001.JPG")
    assert _shown_path("/elsewhere/x.png", str(root)) == "/elsewhere/x.png"


def test_tiny_training_survives_a_corrupt_and_a_missing_image(tmp_path):
    """End to end on the tiny model: half the synthetic training images are corrupt, one listed file missing."""
    from tests.test_trainer import build_assets, tiny_overrides

    assets = build_assets(tmp_path / "assets")
    images = sorted(os.path.join(d, f) for d, _, fs in os.walk(assets["data"]) for f in fs
                    if f.endswith(".png") and "mask" not in d and "ground_truth" not in d)
    for p in images[::2]:
        with open(p, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\ntruncated")
    from ppiad.data.registry import build_dataset

    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "run", "train.max_steps=2"))
    samples = build_dataset(cfg.data.train, cfg.data.object_names)
    samples.append(Sample(str(tmp_path / "gone.png"), samples[0].category, samples[0].object_name, NORMAL,
                          "good", "train"))
    summary = GRPOTrainer(cfg, samples=samples).train()
    assert summary["step"] == 2
    log = open(os.path.join(summary["run_dir"], "train.log")).read()
    assert "1 training image(s) listed but missing on disk" in log and "gone.png" in log
    assert "unreadable training image" in log
    assert summary["metrics"]["unreadable_images"] >= 1
