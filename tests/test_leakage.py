"""Leakage guard (issue 17): training / reference vs evaluation images compared by file content."""
import os
import shutil

import pytest
from PIL import Image

from ppiad.config import load_config
from ppiad.data.leakage import HashCache, LeakageError, check_no_leakage, find_overlaps, guard_run
from tests.conftest import load_tool


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PPIAD_CACHE_DIR", str(tmp_path / "cache"))


def _png(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (16, 16), (value, 0, 0)).save(path)
    return str(path)


def test_copies_under_other_names_are_found_and_distinct_files_are_not(tmp_path):
    train = [_png(tmp_path / "train" / f"{i}.png", i) for i in range(5)]
    evaluation = [_png(tmp_path / "eval" / f"e{i}.png", 100 + i) for i in range(5)]
    assert find_overlaps({"training": train, "evaluation": evaluation}, [("training", "evaluation")]) == []
    leaked = str(tmp_path / "eval" / "renamed.png")
    shutil.copy(train[3], leaked)
    found = find_overlaps({"training": train, "evaluation": evaluation + [leaked]}, [("training", "evaluation")])
    assert [(o.path_a, o.path_b) for o in found] == [(train[3], leaked)]


def test_overlap_stops_with_count_and_files_unless_allowed(tmp_path):
    train = [_png(tmp_path / "train" / f"{i}.png", i) for i in range(6)]
    evaluation = [str(tmp_path / "eval" / f"copy{i}.png") for i in range(5)]
    os.makedirs(tmp_path / "eval")
    for src, dst in zip(train, evaluation):
        shutil.copy(src, dst)
    groups, pairs = {"training": train, "evaluation": evaluation}, [("training", "evaluation")]
    with pytest.raises(LeakageError) as exc:
        check_no_leakage(groups, pairs)
    msg = str(exc.value)
    assert "5 evaluation image(s) identical to training images" in msg and "copy0.png" in msg
    assert "copy4.png" not in msg and "data.allow_overlap=true" in msg   # a few named, not all
    assert len(check_no_leakage(groups, pairs, allow_overlap=True)) == 5


def test_hashes_are_cached_by_path_size_and_mtime(tmp_path):
    a, b = _png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)
    cache_file = str(tmp_path / "c" / "hashes.json")
    cache = HashCache(cache_file)
    first = cache.digest(a)
    cache.save()
    reloaded = HashCache(cache_file)
    assert reloaded.entries[os.path.abspath(a)][2] == first
    reloaded.entries[os.path.abspath(a)][2] = "stale"   # a cached value is used while size and mtime match
    assert reloaded.digest(a) == "stale"
    shutil.copy(b, a)   # new content, new mtime: read again
    os.utime(a, ns=(1, 1))
    assert reloaded.digest(a) == cache.digest(b) != first


def test_reference_root_pool_is_checked_against_the_evaluation(tmp_path):
    from ppiad.data.references import ReferencePool

    evaluation = [_png(tmp_path / "eval" / "pill" / "e.png", 7)]
    ref = str(tmp_path / "refs" / "pill" / "r.png")
    os.makedirs(os.path.dirname(ref))
    shutil.copy(evaluation[0], ref)
    cfg = load_config(None, [])
    pool = ReferencePool({"pill": [ref]}, 1, {"pool": "data.eval.reference_root"})
    with pytest.raises(LeakageError, match=r"1 evaluation image\(s\) identical to reference images"):
        guard_run(cfg, None, evaluation, pool)
    assert guard_run(cfg, None, None, pool) == []   # nothing to evaluate, nothing to compare


class Never:
    def predict(self, images, object_names, references=None):
        raise AssertionError("the model must not run when the data leak")


def test_eval_tool_exits_2_on_overlap_and_runs_when_allowed(tmp_path, capsys):
    for i in range(3):
        _png(tmp_path / "ds" / "pill" / "train" / "good" / f"{i}.png", i)
    _png(tmp_path / "ds" / "pill" / "test" / "good" / "t.png", 50)
    os.makedirs(tmp_path / "ds" / "pill" / "test" / "crack")
    shutil.copy(tmp_path / "ds" / "pill" / "train" / "good" / "1.png", tmp_path / "ds" / "pill" / "test" / "crack" / "x.png")
    (tmp_path / "model").mkdir()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path / 'model'}\ndata:\n  train:\n    dataset: mvtec\n    root: {tmp_path / 'ds'}\n"
                   f"    split: train\n  eval:\n    dataset: mvtec\n    root: {tmp_path / 'ds'}\n    split: test\n")
    eval_tool = load_tool("eval")
    with pytest.raises(SystemExit) as exc:
        eval_tool.main(["-c", str(cfg), "--output_dir", str(tmp_path / "out"), "--no_progress"],
                       predictor_factory=lambda c: Never())
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "1 evaluation image(s) identical to training images" in err and "x.png" in err
    assert not (tmp_path / "out").exists()


def test_training_stops_before_the_model_is_loaded(tmp_path):
    from ppiad.rl.trainer import GRPOTrainer

    for i in range(3):
        _png(tmp_path / "ds" / "pill" / "train" / "good" / f"{i}.png", i)
    shutil.copytree(tmp_path / "ds" / "pill" / "train", tmp_path / "other" / "pill" / "test")
    opts = [f"data.train.root={tmp_path / 'ds'}", f"data.eval.root={tmp_path / 'other'}", "data.eval.dataset=mvtec",
            f"output_dir={tmp_path / 'out'}", f"model.path={tmp_path / 'no_model'}"]
    with pytest.raises(LeakageError, match="3 evaluation image"):
        GRPOTrainer(load_config(None, opts)).setup()
    with pytest.raises(Exception) as exc:   # allowed: it goes on, to the (missing) model
        GRPOTrainer(load_config(None, opts + ["data.allow_overlap=true"])).setup()
    assert not isinstance(exc.value, LeakageError) and "no_model" in str(exc.value)
