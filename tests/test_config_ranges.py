"""Out-of-range config values stop with a ConfigError naming the key, before any work."""
import glob
import os

import pytest
from PIL import Image

from ppiad.config import SCHEMA, ConfigError, Field, load_config
from ppiad.data.sample import DEFECT, NORMAL, Sample
from ppiad.rl.trainer import one_class_warning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("override, key, rule", [
    ("lora.r=-4", "lora.r", ">= 1"),
    ("lora.dropout=1.5", "lora.dropout", ">= 0 and < 1"),
    ("lora.dropout=1", "lora.dropout", ">= 0 and < 1"),
    ("grpo.num_generations=1", "grpo.num_generations", ">= 2"),
    ("eval.batch_size=0", "eval.batch_size", ">= 1"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio", ">= 0 and <= 1"),
    ("train.adam_epsilon=0", "train.adam_epsilon", "> 0"),
])
def test_out_of_range_override_names_the_key(override, key, rule):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"config key '{key}' must be {rule}, got ")


def test_out_of_range_value_in_a_file_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: -4\n")
    with pytest.raises(ConfigError, match=r"config key 'lora\.r' must be >= 1, got -4"):
        load_config(str(path))


def test_bounds_are_inclusive_where_stated():
    cfg = load_config(None, ["lora.dropout=0", "grpo.num_generations=2", "train.max_steps=-1",
                             "train.warmup_ratio=1"])
    assert (cfg.lora.dropout, cfg.grpo.num_generations, cfg.train.warmup_ratio) == (0.0, 2, 1.0)


def test_every_shipped_config_and_every_default_is_in_range():
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        load_config(path)   # raises on any out-of-range value

    def walk(schema):
        for spec in schema.values():
            if isinstance(spec, dict):
                yield from walk(spec)
            else:
                yield spec
    for spec in walk(SCHEMA):
        if isinstance(spec, Field) and spec.type in (int, float):
            assert spec.in_range(spec.default), spec


def test_one_class_training_set_warns(tmp_path):
    normal = Sample("/d/n.png", "c", "c", NORMAL, "good", "train")
    defect = Sample("/d/d.png", "c", "c", DEFECT, "crack", "train")
    assert "no defect images" in one_class_warning([normal, normal])
    assert "no normal images" in one_class_warning([defect])
    assert one_class_warning([normal, defect]) == ""


def test_infer_batch_size_zero_is_refused(tmp_path, capsys):
    from tests.test_infer import run

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path / 'no_model_needed'}\n")
    img = str(tmp_path / "a.png")
    Image.new("RGB", (20, 10), (200, 200, 200)).save(img)
    code, _ = run(["-c", str(cfg), "--batch_size", "0", "--image", img, "--object", "pill"])
    assert code == 2 and "--batch_size must be >= 1, got 0" in capsys.readouterr().err
