"""The tiny checkpoint builder: complete HF-format directory, task tokenizer, determinism, loadability."""
import hashlib
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from ppiad.models.processor import Qwen2VLProcessor
from ppiad.models.tiny import SPECIAL_TOKENS, build_tiny_checkpoint, train_task_tokenizer
from ppiad.prompt import build_prompt
from tests.conftest import require_ref_python

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "preprocessor_config.json", "chat_template.json", "generation_config.json")


def _digest(path):
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"), seed=0)


def test_directory_is_complete_and_consistent(tiny):
    assert sorted(os.listdir(tiny)) == sorted(FILES)
    cfg = json.load(open(os.path.join(tiny, "config.json")))
    proc = Qwen2VLProcessor.from_pretrained(tiny)
    tok = proc.tokenizer
    assert cfg["model_type"] == "qwen2_vl" and cfg["vocab_size"] == len(tok)
    assert 300 <= len(tok) <= 2100
    assert cfg["image_token_id"] == tok.token_to_id("<|image_pad|>") == proc.image_token_id
    assert cfg["video_token_id"] == tok.token_to_id("<|video_pad|>")
    assert cfg["vision_start_token_id"] == tok.token_to_id("<|vision_start|>")
    assert cfg["eos_token_id"] == tok.token_to_id("<|im_end|>") == proc.eos_token_ids[0]
    assert proc.pad_token_id == tok.token_to_id("<|endoftext|>") == proc.eos_token_ids[1]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert 2 * sum(cfg["rope_scaling"]["mrope_section"]) == head_dim
    # special tokens come after the learned vocabulary, like Qwen's
    assert sorted(tok.token_to_id(t) for t in SPECIAL_TOKENS) == list(range(len(tok) - len(SPECIAL_TOKENS), len(tok)))


def test_processor_builds_task_inputs(tiny):
    proc = Qwen2VLProcessor.from_pretrained(tiny)
    out = proc.build_inputs([Image.new("RGB", (640, 480), (90, 90, 90)), Image.new("RGB", (64, 64))],
                            ["pill", "printed circuit board"], return_tensors="np")
    ids, grids = out["input_ids"], out["image_grid_thw"]
    assert ids.shape[0] == 2 and out["pixel_values"].shape == (int(grids.prod(axis=1).sum()), 1176)
    for row, mask, g in zip(ids, out["attention_mask"], grids):
        text_tokens = int(mask.sum()) - int(g.prod()) // 4
        assert text_tokens < 200  # the task tokenizer keeps the prompt short
        assert (row == proc.image_token_id).sum() == g.prod() // 4


def test_tokenizer_round_trip_and_answer_tokens(tiny):
    tok = Qwen2VLProcessor.from_pretrained(tiny).tokenizer
    samples = [build_prompt("metal nut"), build_prompt("an unseen gadget"),
               "<think>A deep scratch crosses the surface.</think> <answer>A</answer>",
               "<|im_start|>assistant\n<think>\nLooks clean.\n</think>\n<answer>B</answer><|im_end|>",
               "Ünïcödé 缺陷 ✓ 12345"]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text
    prompt_ids = tok.encode(build_prompt("pill"))
    assert len(prompt_ids) < len(build_prompt("pill")) / 2.5  # the BPE really learned the task text
    # The verdict is a single token after an identical prefix, distinct for A and B.
    a, b = tok.encode("<think>x</think> <answer>A</answer>"), tok.encode("<think>x</think> <answer>B</answer>")
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    assert len(a) == len(b) and len(diff) == 1
    tok_a, tok_b = tok.id_to_token(a[diff[0]]), tok.id_to_token(b[diff[0]])
    assert tok_a != tok_b and tok_a.endswith("A") and tok_b.endswith("B")
    assert tok.encode("<answer>A")[-1] == a[diff[0]]


def test_tokenizer_training_is_deterministic():
    assert train_task_tokenizer().to_str() == train_task_tokenizer().to_str()


def test_same_seed_same_files_other_seed_other_weights(tiny, tmp_path):
    again = build_tiny_checkpoint(str(tmp_path / "again"), seed=0)
    assert _digest(again) == _digest(tiny)
    other = build_tiny_checkpoint(str(tmp_path / "other"), seed=1)
    d_tiny, d_other = _digest(tiny), _digest(other)
    assert d_other["model.safetensors"] != d_tiny["model.safetensors"]
    assert d_other["tokenizer.json"] == d_tiny["tokenizer.json"]


def test_model_loads_and_runs_on_processor_output(tiny):
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny)
    proc = Qwen2VLProcessor.from_pretrained(tiny)
    inputs = proc.build_inputs([Image.new("RGB", (120, 90), (10, 200, 30))], ["screw"])
    logits = model(**inputs).logits
    assert list(logits.shape) == [1, inputs["input_ids"].shape[1], len(proc.tokenizer)]
    assert np.isfinite(logits.numpy()).all()


def test_transformers_reads_the_tiny_processor_files(tiny, tmp_path):
    """transformers 4.51.3 loads the tiny tokenizer/processor files and produces the same ids and pixels."""
    ref_python = require_ref_python()
    Image.new("RGB", (300, 200), (200, 40, 40)).save(tmp_path / "img.png")
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(n)}]}]
            for n in ("pill", "metal nut")]
    case = {"name": "tiny", "images": [str(tmp_path / "img.png")] * 2, "messages": msgs}
    (tmp_path / "spec.json").write_text(json.dumps({"dir": tiny, "cases": [case], "texts": [build_prompt("wood")]}))
    res = subprocess.run([ref_python, os.path.join(HERE, "ref", "processor_reference.py"), str(tmp_path / "spec.json"),
                          str(tmp_path / "ref.npz")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = dict(np.load(tmp_path / "ref.npz"))
    meta = json.loads(bytes(ref["meta"]).decode("utf-8"))
    proc = Qwen2VLProcessor.from_pretrained(tiny)
    texts = [proc.apply_chat_template(m) for m in msgs]
    assert texts == meta["prompts"]["tiny"]
    out = proc(text=texts, images=[Image.open(tmp_path / "img.png")] * 2, return_tensors="np")
    np.testing.assert_array_equal(out["input_ids"], ref["tiny.input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ref["tiny.attention_mask"])
    np.testing.assert_allclose(out["pixel_values"], ref["tiny.pixel_values"], atol=1e-5, rtol=0)
    assert proc.tokenizer.encode(build_prompt("wood")) == meta["encoded"][0]
