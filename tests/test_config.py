import os
import subprocess
import sys

import pytest

from ppiad.config import ConfigError, load_config, parse_override, require, save_config, schema_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.lora.r == 4 and cfg.lora.alpha == 16 and cfg.lora.dropout == 0.1
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.max_pixels == 401408 and cfg.model.max_prompt_length == 1024
    assert cfg.grpo.num_generations == 4
    assert cfg.data.train.dataset == "mvtec" and cfg.data.eval.dataset == "visa"


def test_yaml_then_overrides_typed(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  max_steps: 5\nmodel:\n  path: /m\n")
    cfg = load_config(path, ["train.max_steps=7", "train.learning_rate=3e-4", "eval.do_sample=true",
                             "lora.target_modules=q_proj,k_proj", "model.path=0001", "data.train.categories=[a, b]"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.learning_rate == pytest.approx(3e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.eval.do_sample is True
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.model.path == "0001"  # strings are kept verbatim, not YAML-parsed into ints
    assert cfg.data.train.categories == ["a", "b"]


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["grpo.beta=0"])
    assert cfg.grpo.beta == 0.0 and isinstance(cfg.grpo.beta, float)


@pytest.mark.parametrize("override, fragment", [
    ("train.max_step=3", "Did you mean 'max_steps'"),
    ("nosuch.key=1", "Valid keys here"),
    ("train.max_steps=abc", "expects an int"),
    ("train.max_steps=1.5", "expects an int"),
    ("eval.do_sample=maybe", "expects a bool"),
    ("model.dtype=float16", "valid choices: float32, bfloat16"),
    ("train=3", "is a section"),
    ("train.max_steps", "must look like key.sub=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_in_yaml_names_full_path(tmp_path):
    path = write(tmp_path / "c.yaml", "grpo:\n  betta: 0.1\n")
    with pytest.raises(ConfigError, match=r"'grpo.betta'.*Did you mean 'beta'"):
        load_config(path)


def test_wrong_type_in_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", "lora:\n  r: four\n")
    with pytest.raises(ConfigError, match="'lora.r' expects an int"):
        load_config(path)


def test_base_chain_merges_underneath(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  max_steps: 5\n  save_every: 2\n")
    path = write(tmp_path / "child.yaml", "_base_: base.yaml\ntrain:\n  max_steps: 9\n")
    cfg = load_config(path)
    assert cfg.train.max_steps == 9 and cfg.train.save_every == 2


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "a: [1,\n"))


def test_require_names_the_key():
    cfg = load_config()
    with pytest.raises(ConfigError, match="'model.path' is not set"):
        require(cfg, "model.path", "the Qwen2-VL checkpoint directory")


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["train.max_steps=3", "data.object_names={pcb1: printed circuit board}"])
    save_config(cfg, str(tmp_path / "saved.yaml"))
    again = load_config(str(tmp_path / "saved.yaml"))
    assert again == cfg
    assert again.data.object_names == {"pcb1": "printed circuit board"}


def test_override_parser_keeps_string_values():
    assert parse_override("model.path=/a=b")[1] == "/a=b"


def test_configuration_doc_is_current():
    doc = open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8").read()
    assert schema_markdown() in doc, "docs/configuration.md is stale: regenerate the table with " \
                                     "`python -m ppiad.config --markdown`"


def test_every_shipped_config_loads():
    config_dir = os.path.join(ROOT, "configs")
    names = [n for n in os.listdir(config_dir) if n.endswith((".yaml", ".yml"))]
    for name in names:
        load_config(os.path.join(config_dir, name))


def test_markdown_cli():
    out = subprocess.run([sys.executable, "-m", "ppiad.config", "--markdown"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "| `model.path` |" in out


def test_a_missing_configs_path_reads_the_shipped_config(tmp_path, monkeypatch):
    """After `pip install`, `-c configs/lriad_mvtec.yaml` from any folder reads the config shipped with ppiad; a
    local file of that name wins; an unknown name says which configs ship."""
    from ppiad.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/lriad_mvtec.yaml").distributed.sharding == "stage3"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "lriad_mvtec.yaml").write_text("run_name: mine\n")
    assert load_config("configs/lriad_mvtec.yaml").run_name == "mine"
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml' \(shipped with ppiad: "
                                          r"configs/demo.yaml, configs/lriad_mvtec.yaml"):
        load_config("configs/nope.yaml")
