"""A report never describes fewer predictions than its folder holds for the dataset, and --compare warns when
the compared runs cover different image counts (fix-round defect: a 3-image quick look overwrote a 10-image
report)."""
import json
import os

from ppiad.eval.report import image_count_warning, write_comparison
from ppiad.eval.runner import run_evaluation
from ppiad.utils.io import read_jsonl
from tests.test_eval_runner import CountingPredictor, make_dataset


def test_subset_rerun_keeps_full_report(tmp_path):
    samples = make_dataset(str(tmp_path / "data"))          # 10 images
    out = str(tmp_path / "out")
    full = run_evaluation(samples, CountingPredictor(), out, batch_size=4, progress=False)
    assert full["n_images"] == 10 and full["overall"]["n"] == 10
    pred = CountingPredictor()
    quick = run_evaluation(samples, pred, out, batch_size=4, max_images=3, progress=False)
    assert pred.images == 0                                  # all 3 were predicted before
    assert quick["n_images"] == 10 and quick["overall"]["n"] == 10
    assert quick["overall"]["accuracy"] == full["overall"]["accuracy"]
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        assert json.load(f)["n_images"] == 10
    assert len(list(read_jsonl(os.path.join(out, "predictions.jsonl")))) == 10


def test_subset_first_then_more_grows_report(tmp_path):
    samples = make_dataset(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    assert run_evaluation(samples, CountingPredictor(), out, max_images=3, progress=False)["n_images"] == 3
    pred = CountingPredictor()
    m = run_evaluation(samples, pred, out, max_images=4, progress=False)
    # subsets: images 0, 4, 9 then 0, 3, 6, 9 of the sorted dataset -> union of 5, two newly predicted
    assert pred.images == 2 and m["n_images"] == 5 and m["overall"]["n"] == 5
    assert len(list(read_jsonl(os.path.join(out, "predictions.jsonl")))) == 5
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        assert "4 asked for by this run, the others from earlier runs" in f.read()


def _metrics(n):
    return {"n_images": n, "overall": {"n": n, "accuracy": 0.5, "f1_macro": 0.5}, "per_category": {}}


def test_compare_warns_on_different_image_counts(tmp_path):
    assert image_count_warning([("a", _metrics(10)), ("b", _metrics(10))]) is None
    warning = image_count_warning([("full", _metrics(10)), ("quick", _metrics(3))])
    assert "full: 10" in warning and "quick: 3" in warning
    samples = make_dataset(str(tmp_path / "data"))
    full = run_evaluation(samples, CountingPredictor(), str(tmp_path / "full"), progress=False)
    quick = run_evaluation(samples, CountingPredictor(), str(tmp_path / "quick"), max_images=3, progress=False)
    text = write_comparison([("full", full), ("quick", quick)], str(tmp_path / "cmp.md"))
    assert "**Warning:**" in text and "full: 10" in text and "quick: 3" in text
    same = write_comparison([("x", full), ("y", full)], str(tmp_path / "cmp2.md"))
    assert "Warning" not in same


def test_compare_cli_warns_on_stderr(tmp_path, capsys):
    from ppiad.cli.eval import main

    samples = make_dataset(str(tmp_path / "data"))
    run_evaluation(samples, CountingPredictor(), str(tmp_path / "full"), progress=False)
    run_evaluation(samples, CountingPredictor(), str(tmp_path / "quick"), max_images=3, progress=False)
    rc = main(["--compare", f"full={tmp_path / 'full'}", f"quick={tmp_path / 'quick'}",
               "--output_dir", str(tmp_path / "cmp")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "full: 10" in err and "quick: 3" in err
