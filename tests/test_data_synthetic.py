"""The synthetic dataset: layout, ratio, determinism, held-out disjointness, annotations, visible defects."""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from ppiad.data.mvtec import load_mvtec
from ppiad.data.sample import DEFECT
from ppiad.data.synthetic import (CATEGORIES, SyntheticError, describe_defect, generate_synthetic, plan_dataset,
                                  render_image)
from tests.conftest import ROOT


def tree_hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "s0")
    generate_synthetic(out, num_images=120, defect_ratio=0.11, seed=0)
    return out


def test_layout_and_ratio(tree):
    samples = load_mvtec(tree)
    assert len(samples) == 120
    assert sum(s.is_defect for s in samples) == round(120 * 0.11)
    assert {s.category for s in samples} == set(CATEGORIES)
    assert all(s.split == "test" for s in samples if s.is_defect)  # defects only in test/<type>
    assert {s.defect_type for s in load_mvtec(tree, split="train")} == {"good"}
    assert any(s.defect_type == "good" for s in load_mvtec(tree, split="test"))
    img = Image.open(samples[0].path)
    assert img.size == (112, 112) and img.mode == "RGB"


def test_ratio_is_configurable():
    plan = plan_dataset(1000, 0.3, ["fabric", "pill"])
    assert len(plan) == 1000 and sum(p.defect_type != "good" for p in plan) == 300
    assert sum(p.defect_type != "good" for p in plan_dataset(50, 0.0, ["wood"])) == 0


def test_deterministic_and_held_out(tree, tmp_path):
    again = str(tmp_path / "again")
    generate_synthetic(again, num_images=120, defect_ratio=0.11, seed=0)
    first = tree_hashes(tree)
    assert first == tree_hashes(again)  # byte for byte
    other = str(tmp_path / "heldout")
    generate_synthetic(other, num_images=120, defect_ratio=0.11, seed=1)
    second = tree_hashes(other)
    pngs = lambda h: {v for k, v in h.items() if k.endswith(".png")}
    assert not pngs(first) & pngs(second)  # a held-out tree shares no image


def test_annotations(tree):
    recs = [json.loads(line) for line in open(os.path.join(tree, "annotations.jsonl"))]
    assert len(recs) == 120 and [r["path"] for r in recs] == sorted(r["path"] for r in recs)
    for r in recs:
        assert os.path.isfile(os.path.join(tree, r["path"]))
        assert set(r) == {"path", "category", "label", "defect_type", "bbox", "description"}
        if r["label"] == DEFECT:
            x0, y0, x1, y1 = r["bbox"]
            assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112
            assert r["path"].split("/")[1:3] == ["test", r["defect_type"]]
            assert f"of the {r['category'].replace('_', ' ')}" in r["description"]
        else:
            assert r["bbox"] is None and "no defect" in r["description"]


def test_describe_defect():
    assert describe_defect("fabric", "hole", [5, 5, 30, 30]) == \
        "a dark hole in the upper left of the fabric, spanning about a fifth of the image"
    assert "lower right" in describe_defect("pill", "crack", [70, 70, 110, 110])
    assert "centre" in describe_defect("washer", "missing_part", [40, 40, 70, 70])
    assert describe_defect("wood", "good") == "no defect: the wood looks normal"


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_defects_are_large_and_contrasted(category):
    """Every defect type spans >= 15% of the side and visibly changes the pixels in its box."""
    for t in CATEGORIES[category]:
        for k in range(4):
            arr, bbox = render_image(category, t, np.random.default_rng([7, k]))
            side = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
            assert side >= 0.15 * 112, (category, t, k, bbox)
            # the same stream draws the same base image (exposure and noise differ by < 60 levels):
            # at least ~a 2.5 x 28 px line of pixels inside the box must change strongly
            base, _ = render_image(category, "good", np.random.default_rng([7, k]))
            x0, y0, x1, y1 = bbox
            diff = np.abs(arr[y0:y1, x0:x1].astype(int) - base[y0:y1, x0:x1].astype(int)).max(axis=2)
            assert (diff > 60).sum() >= 70, (category, t, k, int((diff > 60).sum()))


def test_normals_vary():
    imgs = [render_image("washer", "good", np.random.default_rng([3, k]))[0].astype(float) for k in range(6)]
    assert min(np.abs(a - b).mean() for i, a in enumerate(imgs) for b in imgs[i + 1:]) > 5


def test_bad_arguments(tmp_path):
    with pytest.raises(SyntheticError, match="available: fabric"):
        generate_synthetic(str(tmp_path / "x"), 10, categories=["bolt"])
    with pytest.raises(SyntheticError, match="defect_ratio"):
        generate_synthetic(str(tmp_path / "x"), 10, defect_ratio=1.5)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(SyntheticError, match="not empty"):
        generate_synthetic(str(tmp_path / "busy"), 10)
    with pytest.raises(SyntheticError, match="not a synthetic dataset"):
        generate_synthetic(str(tmp_path / "busy"), 10, overwrite=True)
    assert (tmp_path / "busy" / "keep.txt").exists()


def test_cli_synth_and_overwrite(tmp_path):
    out = str(tmp_path / "cli")
    tool = os.path.join(ROOT, "tools", "prepare_data.py")
    args = [sys.executable, tool, "synth", "--out", out, "--num_images", "40", "--categories", "pill,fabric",
            "--size", "64", "--seed", "3"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {s.category for s in load_mvtec(out)} == {"pill", "fabric"} and len(load_mvtec(out)) == 40
    assert Image.open(load_mvtec(out)[0].path).size == (64, 64)
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = subprocess.run(args[:-2] + ["--seed", "4", "--overwrite"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.load(open(os.path.join(out, "synthetic.json")))["seed"] == 4


def test_timing_1000_images(tmp_path):
    start = time.time()
    generate_synthetic(str(tmp_path / "k"), num_images=1000)
    took = time.time() - start
    print(f"\nsynthetic: 1000 images at 112 px in {took:.1f} s")
    assert took < 120  # loose: shared 2-core machines vary; typically ~10 s
