"""tools/prepare_data.py stats, run as a user would (subprocess), plus the stats helpers."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from ppiad.data.sample import DEFECT, NORMAL, Sample
from ppiad.data.stats import dataset_stats, format_stats
from tests.conftest import ROOT, VISA_SPLIT_CSV, require_shared
from tests.test_data_loaders import touch

TOOL = os.path.join(ROOT, "tools", "prepare_data.py")


def run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=120)


def test_stats_helpers():
    s = [Sample("/a", "b", "b", NORMAL, "good", "train"), Sample("/c", "b", "b", DEFECT, "x", "test"),
         Sample("/d", "a", "a", NORMAL, "good", "test"), Sample("/e", "a", "a", NORMAL, "good", "test")]
    st = dataset_stats(s, "mvtec", "all")
    assert st == {"dataset": "mvtec", "split": "all",
                  "categories": {"a": {"normal": 2, "defect": 0}, "b": {"normal": 1, "defect": 1}},
                  "total": {"normal": 3, "defect": 1, "defect_ratio": 0.25}, "defect_types": {"b": ["x"]}}
    assert list(st["categories"]) == ["a", "b"]
    table = format_stats(st, missing=2)
    assert "Total" in table and "25.0%" in table and "2 listed image(s) are missing" in table
    assert dataset_stats([], "visa", "train")["total"]["defect_ratio"] == 0.0


def test_stats_cli_mvtec(tmp_path):
    r = tmp_path / "mv"
    for i in range(4):
        touch(str(r / "cable" / "train" / "good" / f"{i}.png"))
    touch(str(r / "cable" / "test" / "good" / "0.png"))
    touch(str(r / "cable" / "test" / "cut" / "0.png"))
    touch(str(r / "tile" / "test" / "crack" / "0.png"))
    out = run("stats", "--dataset", "mvtec", "--root", str(r), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data == {"dataset": "mvtec", "split": "all",
                    "categories": {"cable": {"normal": 5, "defect": 1}, "tile": {"normal": 0, "defect": 1}},
                    "total": {"normal": 5, "defect": 2, "defect_ratio": 2 / 7},
                    "defect_types": {"cable": ["cut"], "tile": ["crack"]}}
    test = json.loads(run("stats", "--dataset", "mvtec", "--root", str(r), "--split", "test", "--json").stdout)
    assert test["total"]["normal"] == 1 and test["split"] == "test"
    table = run("stats", "--dataset", "mvtec", "--root", str(r))
    assert table.returncode == 0 and "cable" in table.stdout and "28.6%" in table.stdout


def test_stats_cli_visa_real_split(tmp_path):
    root = tmp_path / "visa"
    os.makedirs(root / "split_csv")
    shutil.copy(require_shared(VISA_SPLIT_CSV), root / "split_csv" / "1cls.csv")
    out = run("stats", "--dataset", "visa", "--root", str(root), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # stdout is pure JSON; the missing-image warning goes to stderr
    assert (data["total"]["normal"], data["total"]["defect"]) == (9621, 1200)
    assert abs(data["total"]["defect_ratio"] - 1200 / 10821) < 1e-12
    assert data["categories"]["pcb4"] == {"normal": 1005, "defect": 100}
    assert "missing on disk" in out.stderr
    train = json.loads(run("stats", "--dataset", "visa", "--root", str(root), "--split", "train", "--json").stdout)
    assert (train["total"]["normal"], train["total"]["defect"]) == (8659, 0)
    table = run("stats", "--dataset", "visa", "--root", str(root))
    assert "10821" in table.stdout and "11.1%" in table.stdout


@pytest.mark.parametrize("dataset,expect", [("mvtec", "MVTec-AD layout"), ("visa", "1cls.csv' not found"),
                                            ("folder", "folder layout")])
def test_stats_cli_bad_root(tmp_path, dataset, expect):
    out = run("stats", "--dataset", dataset, "--root", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and expect in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    missing = run("stats", "--dataset", dataset, "--root", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
