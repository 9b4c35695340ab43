"""Parity with transformers 4.51.3 for prompts holding several images (k-shot references, issue 17).

tests/ref/make_reference_multi_image.py builds a tiny random Qwen2-VL / Qwen2.5-VL and runs a left-padded batch
of a 1-shot prompt (reference 300x500, query 640x480) and a 0-shot prompt (one 200x260 image): different image
counts and sizes per row. ppiad builds the same batch with `build_inputs(..., references=...)` and must give the
same ids and pixels, positions (rope_deltas), logits within 1e-4 and 16 greedy tokens, also through
`generate` with G = 3 samples per prompt (the vision tower runs once per image, shared by the G rows).
"""
import json
import os
import subprocess

import numpy as np
import paddle
import pytest

from tests import conftest
from tests.test_qwen2_vl_parity import _greedy
from ppiad.models import AutoModel, AutoProcessor

MAKE_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref", "make_reference_multi_image.py")
TOL = 1e-4


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def reference(request, tmp_path_factory):
    conftest.require_shared(conftest.QWEN2_TOKENIZER_DIR)
    ref_python = conftest.require_ref_python()
    out = tmp_path_factory.mktemp(f"multi_image_{request.param}")
    proc = subprocess.run([ref_python, MAKE_REFERENCE, str(out), "--family", request.param], capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"reference script failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    ref = dict(np.load(out / "reference.npz"))
    model = AutoModel.from_pretrained(str(out / "model"))
    processor = AutoProcessor.from_pretrained(str(out / "model"))
    spec = json.loads((out / "prompts.json").read_text())
    images = [[str(out / f) for f in s["images"]] for s in spec]
    inputs = processor.build_inputs([i[-1] for i in images], [s["object"] for s in spec],
                                    references=[i[:-1] for i in images])
    return ref, model, processor, inputs


def test_batch_holds_different_image_counts_and_sizes(reference):
    ref, _, _, inputs = reference
    assert ref["image_grid_thw"].tolist() == [[1, 36, 22], [1, 34, 46], [1, 18, 14]]
    ids = ref["input_ids"]
    assert [int((row == 151652).sum()) for row in ids] == [2, 1]   # <|vision_start|> per prompt
    assert ref["attention_mask"][:, -1].all() and not ref["attention_mask"][1, 0]   # row 1 is left padded
    assert float(ref["greedy_min_gap"]) > 1e-3   # no near-ties: a fair token comparison


def test_ids_and_pixels_match(reference):
    ref, _, _, inputs = reference
    np.testing.assert_array_equal(inputs["input_ids"].numpy(), ref["input_ids"])
    np.testing.assert_array_equal(inputs["attention_mask"].numpy(), ref["attention_mask"])
    np.testing.assert_array_equal(inputs["image_grid_thw"].numpy(), ref["image_grid_thw"])
    np.testing.assert_allclose(inputs["pixel_values"].numpy(), ref["pixel_values"], atol=1e-5, rtol=0)


def test_positions_and_logits_match(reference):
    ref, model, _, inputs = reference
    _, deltas = model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    np.testing.assert_array_equal(deltas.numpy(), ref["rope_deltas"])
    with paddle.no_grad():
        logits = model(**inputs).logits.numpy()
    picked = np.stack([logits[i, idx] for i, idx in enumerate(ref["logit_index"])])
    np.testing.assert_allclose(picked, ref["logits"], atol=TOL, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_match(reference, use_cache):
    ref, model, _, inputs = reference
    tokens = _greedy(model, inputs, ref["greedy_tokens"].shape[1], use_cache=use_cache)
    np.testing.assert_array_equal(tokens, ref["greedy_tokens"])


def test_generate_shares_images_across_samples(reference, monkeypatch):
    ref, model, processor, inputs = reference
    from ppiad.models.generation import generate

    calls = []
    real = model.get_image_embeds
    monkeypatch.setattr(model, "get_image_embeds", lambda pv, grid: calls.append(grid.numpy().tolist()) or real(pv, grid))
    steps = ref["greedy_tokens"].shape[1]
    res = generate(model, inputs, num_samples=3, max_new_tokens=steps, do_sample=False, eos_token_ids=[-1],
                   pad_token_id=processor.pad_token_id)
    assert calls == [ref["image_grid_thw"].tolist()]   # one vision pass: each image once, not once per sample
    seqs = res.sequences.numpy()
    assert seqs.shape == (6, steps)
    np.testing.assert_array_equal(seqs, np.repeat(ref["greedy_tokens"], 3, axis=0))


def test_padded_batch_gives_what_the_prompt_gives_alone(reference):
    ref, _, _, _ = reference
    np.testing.assert_array_equal(ref["greedy_tokens"][0], ref["alone0.greedy_tokens"][0])
