"""Validation during training and rollout samples in VisualDL (issue 16, items 6 and 7)."""
import json
import os

import pytest

from ppiad.data.sample import Sample
from tests.test_trainer import _metrics, build_assets, tiny_overrides


def _samples(n_defect, n_normal):
    mk = lambda i, label: Sample(f"/d/{label}{i:03d}.png", "c", "c", label, "x" if label == "defect" else "good",
                                 "test")  # noqa: E731
    return [mk(i, "defect") for i in range(n_defect)] + [mk(i, "normal") for i in range(n_normal)]


def test_stratified_subset_keeps_the_class_shares():
    from ppiad.rl.validation import stratified_subset

    got = stratified_subset(_samples(4, 16), 10)         # 20 % defects -> 2 of 10
    assert sum(s.is_defect for s in got) == 2 and len(got) == 10
    assert [s.path for s in got] == [s.path for s in stratified_subset(list(reversed(_samples(4, 16))), 10)]
    got = stratified_subset(_samples(1, 19), 3)          # round(3 x 1/20) = 0, but each class appears once
    assert sum(s.is_defect for s in got) == 1 and len(got) == 3
    assert len(stratified_subset(_samples(2, 3), -1)) == 5


def test_best_keeper_direction(tmp_path):
    from ppiad.rl.validation import BestKeeper

    def save(d):
        with open(os.path.join(d, "adapter.txt"), "w") as f:
            f.write("x")

    keep = BestKeeper(str(tmp_path), "false_alarm_rate")  # lower is better
    assert keep.offer(1, {"false_alarm_rate": 0.3}, save)
    assert not keep.offer(2, {"false_alarm_rate": 0.4}, save)
    assert keep.offer(3, {"false_alarm_rate": 0.1}, save)
    assert not keep.offer(4, {"false_alarm_rate": None}, save)
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    assert info["step"] == 3 and info["metrics"]["false_alarm_rate"] == 0.1
    assert BestKeeper(str(tmp_path), "false_alarm_rate").best == 0.1   # resumes from best.json
    f1 = BestKeeper(str(tmp_path / "other"), "f1_macro")
    assert f1.offer(1, {"f1_macro": 0.5}, save) and not f1.offer(2, {"f1_macro": 0.4}, save)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets_val"))


def test_short_run_logs_eval_scalars_and_samples_to_visualdl(assets, tmp_path):
    from visualdl import LogReader

    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer

    cfg = load_config(None, tiny_overrides(
        assets, str(tmp_path), "val", "train.max_steps=2", f"data.eval.root={assets['data']}",
        "data.eval.dataset=mvtec", "data.allow_overlap=true",   # one tiny tree for training and validation
        "train.eval_every=1", "train.eval_images=6", "eval.max_new_tokens=12", "eval.batch_size=3",
        "train.log_samples_every=2", "train.save_best=true", "train.save_best_metric=accuracy"))
    GRPOTrainer(cfg).train()
    run = os.path.join(str(tmp_path), "val")
    vdl = os.path.join(run, "vdl")
    reader = LogReader(file_path=os.path.join(vdl, os.listdir(vdl)[0]))
    tags = reader.get_tags()
    for key in ("f1_macro", "accuracy", "false_alarm_rate", "invalid_rate"):
        values = [(r.id, r.value) for r in reader.get_data("scalar", f"eval/{key}")]
        assert [v[0] for v in values] == [1, 2], key
        assert all(0.0 <= v[1] <= 1.0 for v in values), key
    # the untrained tiny model answers nothing valid: every answer invalid, accuracy 0 (an invalid answer is
    # wrong), f1 0; AUROC has no scores then and is not logged
    rows = [m for m in _metrics(run) if "eval/accuracy" in m]
    assert [m["eval/invalid_rate"] for m in rows] == [1.0, 1.0]
    assert [m["eval/accuracy"] for m in rows] == [0.0, 0.0]
    texts = reader.get_data("text", "samples/rollouts")
    assert [r.id for r in texts] == [2]
    text = texts[0].text.encoded_text_string
    assert "truth:" in text and "advantage" in text and text.count("\n") >= 4 + 1   # 4 completions
    assert [r.id for r in reader.get_data("image", "samples/image")] == [2]
    assert "samples/image" in tags["image"]
    best = json.loads(open(os.path.join(run, "best", "best.json")).read())
    assert best["step"] == 1 and best["metric"] == "accuracy"   # 0.0 at step 2 does not beat 0.0
    assert os.path.isfile(os.path.join(run, "best", "adapter_model.safetensors"))


def test_eval_every_without_held_out_data_names_the_keys(assets, tmp_path):
    from ppiad.config import ConfigError, load_config
    from ppiad.rl.trainer import GRPOTrainer

    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "x", "train.max_steps=1", "train.eval_every=1"))
    with pytest.raises(ConfigError, match="data.val.root"):
        GRPOTrainer(cfg).train()
