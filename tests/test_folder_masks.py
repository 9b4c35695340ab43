"""Folder datasets never count mask folders as defect types; normal_dirs / exclude_dirs; stats lists what was
counted and what was skipped (issue 12, item 8)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ppiad.config import load_config
from ppiad.data.folder import folder_layout, is_mask_image, load_folder
from ppiad.data.registry import DatasetError, build_dataset, load_dataset
from ppiad.data.sample import DEFECT, NORMAL
from tests.conftest import ROOT

TOOL = os.path.join(ROOT, "tools", "prepare_data.py")


def photo(path, seed=0, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.RandomState(seed).randint(0, 256, (24, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    (img.convert("L") if mode == "L" else img).save(path)


def mask(path, value=255, mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.zeros((24, 24), dtype=np.uint8)
    arr[5:9, 5:12] = value
    img = Image.fromarray(arr)
    (img.convert("1") if mode == "1" else img).save(path)


@pytest.fixture
def mvtec_like(tmp_path):
    """A category in folder layout with an MVTec-AD style mask folder beside the defect folders, a mask folder
    under another name, and a folder of grayscale photos (not masks)."""
    r = tmp_path / "parts"
    for i in range(3):
        photo(str(r / "bottle" / "good" / f"{i}.png"), i)
    photo(str(r / "bottle" / "crack" / "0.png"), 10)
    photo(str(r / "bottle" / "scratch" / "0.png"), 11, mode="L")       # grayscale photo: a defect type
    for i in range(2):
        mask(str(r / "bottle" / "ground_truth" / f"{i}_mask.png"))     # masks by name
        mask(str(r / "bottle" / "crack_annotations" / f"{i}.png"), mode="1")   # masks by content only
    return r


def test_issue_example_mask_folder_is_not_a_defect_type(mvtec_like):
    samples = load_folder(str(mvtec_like))
    assert sorted({s.defect_type for s in samples if s.label == DEFECT}) == ["crack", "scratch"]
    assert len(samples) == 5 and not any("ground_truth" in s.path or "annotations" in s.path for s in samples)
    skipped = folder_layout(str(mvtec_like))["bottle"]["skipped"]
    assert skipped["ground_truth"] == "mask folder (named 'ground_truth')"
    assert skipped["crack_annotations"].startswith("mask folder (its images are single-channel binary")


def test_root_at_one_mvtec_category(tmp_path):
    # a root pointed at an MVTec-AD category: train/, test/, ground_truth/<type>/ are the "categories"
    r = tmp_path / "bottle"
    photo(str(r / "test" / "good" / "0.png"))
    photo(str(r / "test" / "broken" / "0.png"), 1)
    mask(str(r / "ground_truth" / "broken" / "0_mask.png"))
    samples = load_folder(str(r))
    assert {s.category for s in samples} == {"test"}
    assert folder_layout(str(r))[""]["skipped"] == {"ground_truth": "mask folder (named 'ground_truth')"}


def test_is_mask_image(tmp_path):
    mask(str(tmp_path / "m.png"))
    mask(str(tmp_path / "one.png"), mode="1")
    photo(str(tmp_path / "p.png"), mode="L")
    photo(str(tmp_path / "rgb.png"))
    Image.new("L", (8, 8), 0).save(tmp_path / "black.png")
    assert is_mask_image(str(tmp_path / "m.png")) and is_mask_image(str(tmp_path / "one.png"))
    assert is_mask_image(str(tmp_path / "black.png"))
    assert not is_mask_image(str(tmp_path / "p.png")) and not is_mask_image(str(tmp_path / "rgb.png"))


def test_normal_and_exclude_dirs(mvtec_like):
    photo(str(mvtec_like / "bottle" / "ok_line2" / "0.png"), 20)
    photo(str(mvtec_like / "bottle" / "unsure" / "0.png"), 21)
    samples = load_folder(str(mvtec_like), normal_dirs=["good", "ok_line2"], exclude_dirs=["unsure"])
    labels = {(os.path.basename(os.path.dirname(s.path)), s.label) for s in samples}
    assert labels == {("good", NORMAL), ("ok_line2", NORMAL), ("crack", DEFECT), ("scratch", DEFECT)}
    assert folder_layout(str(mvtec_like), exclude_dirs=["unsure"])["bottle"]["skipped"]["unsure"] == "in exclude_dirs"
    with pytest.raises(DatasetError, match="both normal_dirs and exclude_dirs"):
        load_folder(str(mvtec_like), normal_dirs=["good"], exclude_dirs=["good"])


def test_config_keys_reach_the_loader(mvtec_like):
    photo(str(mvtec_like / "bottle" / "unsure" / "0.png"), 21)
    cfg = load_config(None, ["data.eval.dataset=folder", f"data.eval.root={mvtec_like}",
                             "data.eval.exclude_dirs=[unsure]", "data.eval.normal_dirs=[good]"])
    assert not any("unsure" in s.path for s in build_dataset(cfg.data.eval))
    with pytest.raises(DatasetError, match="exclude_dirs apply to folder datasets only"):
        load_dataset("mvtec", str(mvtec_like), exclude_dirs=["unsure"])


def test_stats_lists_counted_and_skipped_folders(mvtec_like):
    run = subprocess.run([sys.executable, TOOL, "stats", "--dataset", "folder", "--root", str(mvtec_like)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "defect types counted:\n  bottle: crack, scratch" in run.stdout
    assert "bottle/ground_truth: mask folder (named 'ground_truth')" in run.stdout
    assert "bottle/crack_annotations: mask folder" in run.stdout
    run = subprocess.run([sys.executable, TOOL, "stats", "--dataset", "folder", "--root", str(mvtec_like),
                          "--exclude_dirs", "scratch", "--json"], capture_output=True, text=True, timeout=120)
    stats = json.loads(run.stdout)
    assert stats["defect_types"] == {"bottle": ["crack"]} and stats["skipped"]["bottle/scratch"] == "in exclude_dirs"
