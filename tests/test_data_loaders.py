"""MVTec-AD, VisA and folder loaders plus build_dataset, on small trees built in tmp_path."""
import csv
import os
import shutil

import pytest

from ppiad.config import load_config
from ppiad.data.folder import load_folder
from ppiad.data.mvtec import load_mvtec
from ppiad.data.registry import DatasetError, build_dataset, load_dataset
from ppiad.data.sample import DEFECT, NORMAL
from ppiad.data.visa import load_visa
from tests.conftest import VISA_SPLIT_CSV, require_shared

# smallest valid PNG (1x1 grey): the loaders never decode images, so its content does not matter
PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                        "3a7e9b550000000a49444154789c63680000008200815d6b3c9d0000000049454e44ae426082")


def touch(path, data=PNG_1PX):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def mvtec_root(tmp_path):
    r = tmp_path / "mvtec"
    for i in range(3):
        touch(str(r / "bottle" / "train" / "good" / f"{i:03d}.png"))
    touch(str(r / "bottle" / "test" / "good" / "000.png"))
    touch(str(r / "bottle" / "test" / "broken_large" / "000.png"))
    touch(str(r / "bottle" / "test" / "broken_large" / "001.png"))
    touch(str(r / "bottle" / "ground_truth" / "broken_large" / "000_mask.png"))  # masks: never read
    touch(str(r / "bottle" / "test" / "broken_large" / "notes.txt"), b"not an image")
    touch(str(r / "bottle" / "test" / ".hidden" / "000.png"))
    touch(str(r / "metal_nut" / "test" / "scratch" / "000.png"))  # test-only category
    touch(str(r / "metal_nut" / "test" / "good" / "000.JPG"))
    touch(str(r / "docs" / "readme.png"))  # no train/ or test/: not a category
    touch(str(r / "license.txt"), b"text")
    return str(r)


def test_mvtec_partitions(mvtec_root):
    all_ = load_mvtec(mvtec_root)
    assert {s.category for s in all_} == {"bottle", "metal_nut"}
    assert len(all_) == 3 + 1 + 2 + 2
    assert sum(s.label == DEFECT for s in all_) == 3
    assert not any("ground_truth" in s.path or s.path.endswith(".txt") or ".hidden" in s.path for s in all_)
    train = load_mvtec(mvtec_root, split="train")
    assert len(train) == 3 and {s.split for s in train} == {"train"} and {s.label for s in train} == {NORMAL}
    test = load_mvtec(mvtec_root, split="test")
    assert len(test) == 5 and {s.split for s in test} == {"test"}
    s = [x for x in test if x.defect_type == "broken_large"][0]
    assert os.path.isabs(s.path) and s.label == DEFECT and s.object_name == "bottle"
    nut = [x for x in all_ if x.category == "metal_nut"]
    assert nut[0].object_name == "metal nut"  # underscores become spaces
    assert all_ == load_mvtec(mvtec_root)  # deterministic order
    assert [s.category for s in all_] == sorted(s.category for s in all_)


def test_mvtec_categories_and_names(mvtec_root):
    only = load_mvtec(mvtec_root, categories=["metal_nut"], object_names={"metal_nut": "hex nut", "x": "y"})
    assert {s.category for s in only} == {"metal_nut"} and {s.object_name for s in only} == {"hex nut"}
    with pytest.raises(DatasetError, match="available: bottle, metal_nut"):
        load_mvtec(mvtec_root, categories=["bottle", "pill"])


def test_mvtec_bad_roots(tmp_path, mvtec_root):
    with pytest.raises(DatasetError, match="does not exist"):
        load_mvtec(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="MVTec-AD layout"):
        load_mvtec(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="not set"):
        load_mvtec("")
    with pytest.raises(DatasetError, match="no images found for split 'train'"):
        load_mvtec(mvtec_root, split="train", categories=["metal_nut"])
    assert issubclass(DatasetError, ValueError)


def test_folder_layout(tmp_path):
    r = tmp_path / "mine"
    touch(str(r / "widget" / "good" / "a.png"))
    touch(str(r / "widget" / "good" / "b.jpg"))
    touch(str(r / "widget" / "dent" / "c.png"))
    touch(str(r / "widget" / "good" / "readme.md"), b"x")
    touch(str(r / "gear_box" / "burr" / "d.bmp"))
    (r / "empty_cat" / "good").mkdir(parents=True)
    samples = load_folder(str(r))
    assert [(s.category, s.defect_type, s.label) for s in samples] == [
        ("gear_box", "burr", DEFECT), ("widget", "dent", DEFECT), ("widget", "good", NORMAL),
        ("widget", "good", NORMAL)]
    assert {s.split for s in samples} == {"test"}
    assert samples[0].object_name == "gear box"
    # the layout has no train/test division: every partition is the whole folder (documented)
    assert load_folder(str(r), split="train") == samples == load_folder(str(r), split="test")
    with pytest.raises(DatasetError, match="available: gear_box, widget"):
        load_folder(str(r), categories=["empty_cat"])
    (tmp_path / "flat").mkdir()
    touch(str(tmp_path / "flat" / "x.png"))
    with pytest.raises(DatasetError, match="folder layout"):
        load_folder(str(tmp_path / "flat"))


def write_csv(path, rows, header=("object", "split", "label", "image", "mask")):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def small_visa(tmp_path):
    r = tmp_path / "visa"
    rows = [("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""),
            ("pcb1", "test", "normal", "pcb1/Data/Images/Normal/0001.JPG", ""),
            ("pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/000.JPG", "pcb1/Data/Masks/Anomaly/000.png"),
            ("pipe_fryum", "test", "anomaly", "pipe_fryum/Data/Images/Anomaly/000.JPG", "m.png")]
    write_csv(str(r / "split_csv" / "1cls.csv"), rows)
    for row in rows[:3]:
        touch(str(r / row[3]))
    return str(r)


def test_visa_small_and_missing_modes(tmp_path, caplog):
    root = small_visa(tmp_path)
    samples = load_visa(root)  # keep: the row whose image is missing stays listed, with a warning
    assert len(samples) == 4 and "missing on disk" in caplog.text
    fryum = [s for s in samples if s.category == "pipe_fryum"][0]
    assert (fryum.label, fryum.defect_type, fryum.split, fryum.object_name) == (DEFECT, "anomaly", "test",
                                                                                "pipe fryum")
    assert fryum.path == os.path.join(root, "pipe_fryum", "Data", "Images", "Anomaly", "000.JPG")
    normal = [s for s in samples if s.label == NORMAL]
    assert {s.defect_type for s in normal} == {"good"} and {s.split for s in normal} == {"train", "test"}
    assert len(load_visa(root, missing_files="drop")) == 3
    with pytest.raises(DatasetError, match="1 of 4 images"):
        load_visa(root, missing_files="error")
    assert len(load_visa(root, split="train")) == 1


def test_visa_bad_csv(tmp_path):
    with pytest.raises(DatasetError, match=r"split_csv/1cls.csv' not found"):
        load_visa(str(tmp_path))
    write_csv(str(tmp_path / "a" / "split_csv" / "1cls.csv"), [("x", "train", "normal")],
              header=("object", "split", "label"))
    with pytest.raises(DatasetError, match=r"lacks column\(s\) image.*has \[object, split, label\]"):
        load_visa(str(tmp_path / "a"))
    write_csv(str(tmp_path / "b" / "split_csv" / "1cls.csv"), [("x", "train", "bad", "x/1.JPG", "")])
    with pytest.raises(DatasetError, match=r"1cls.csv:2: label 'bad'"):
        load_visa(str(tmp_path / "b"))


@pytest.fixture(scope="module")
def real_visa(tmp_path_factory):
    """A VisA root holding the real split file (10,821 rows) and no images."""
    src = require_shared(VISA_SPLIT_CSV)
    root = tmp_path_factory.mktemp("visa_real")
    os.makedirs(root / "split_csv")
    shutil.copy(src, root / "split_csv" / "1cls.csv")
    return str(root)


def counts(samples):
    return sum(s.label == NORMAL for s in samples), sum(s.label == DEFECT for s in samples)


def test_visa_real_split_counts(real_visa):
    all_ = load_visa(real_visa)
    assert counts(all_) == (9621, 1200)
    assert len({s.category for s in all_}) == 12
    assert counts(load_visa(real_visa, split="train")) == (8659, 0)
    assert counts(load_visa(real_visa, split="test")) == (962, 1200)
    pcb = load_visa(real_visa, categories=["pcb1"], object_names={"pcb1": "printed circuit board"})
    assert counts(pcb) == (1004, 100) and pcb[0].object_name == "printed circuit board"


def present_tree(real_visa, tmp_path, objects=None):
    """The real split file plus a 1-pixel image for every row (of `objects`, or all)."""
    root = tmp_path / "visa_full"
    shutil.copytree(real_visa, root)
    with open(root / "split_csv" / "1cls.csv") as f:
        for row in csv.DictReader(f):
            if objects is None or row["object"] in objects:
                touch(str(root / row["image"]))
    return str(root)


def test_visa_real_images_of_some_objects(real_visa, tmp_path):
    root = present_tree(real_visa, tmp_path, objects={"cashew", "fryum"})
    assert counts(load_visa(root, missing_files="drop")) == (1000, 200)
    assert counts(load_visa(root, categories=["cashew", "fryum"], missing_files="error")) == (1000, 200)
    assert counts(load_visa(root)) == (9621, 1200)


@pytest.mark.slow
def test_visa_real_with_all_images_present(real_visa, tmp_path):
    """Writes 10,821 files: quick on an idle disk (~3 s), slow when the machine is busy."""
    root = present_tree(real_visa, tmp_path)
    assert counts(load_visa(root, missing_files="error")) == (9621, 1200)


def test_build_dataset_from_config(mvtec_root, real_visa):
    cfg = load_config(overrides=[f"data.train.root={mvtec_root}", f"data.eval.root={real_visa}",
                                 "data.train.categories=bottle", "data.object_names={bottle: glass bottle}"])
    train = build_dataset(cfg.data.train, cfg.data.object_names)
    assert len(train) == 6 and {s.object_name for s in train} == {"glass bottle"}
    assert counts(build_dataset(cfg.data.eval, cfg.data.object_names)) == (9621, 1200)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("coco", mvtec_root)
    with pytest.raises(DatasetError, match="unknown split"):
        build_dataset({"dataset": "mvtec", "root": mvtec_root, "split": "val"})
