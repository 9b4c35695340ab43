"""Numerical parity of ppiad's Paddle Qwen2-VL with transformers 4.51.3 on the same random weights.

tests/ref/make_reference.py runs once per session in the reference virtualenv (torch + transformers): it
builds a tiny random Qwen2-VL (real 151,936-row vocabulary), saves it in HF format with the real tokenizer,
runs the HF processor on two synthetic images of different sizes (left-padded batch of 2) and dumps the
inputs, vision features, hidden states, logits and 16 greedy tokens. Here ppiad loads the saved directory and
must reproduce them.
"""
import os
import subprocess

import numpy as np
import paddle
import pytest

from tests import conftest
from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

MAKE_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref", "make_reference.py")
TOL = 1e-4


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    conftest.require_shared(conftest.QWEN2_TOKENIZER_DIR)
    ref_python = conftest.require_ref_python()
    out = tmp_path_factory.mktemp("qwen2vl_ref")
    proc = subprocess.run([ref_python, MAKE_REFERENCE, str(out)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"reference script failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    ref = dict(np.load(out / "reference.npz"))
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(out / "model"))
    inputs = {k: paddle.to_tensor(ref[k]) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    return ref, model, inputs


def test_inputs_are_a_real_left_padded_batch(reference):
    ref, _, _ = reference
    mask = ref["attention_mask"]
    assert mask.shape[0] == 2 and mask[:, -1].all() and not mask[:, 0].all()  # left padding in one row
    assert ref["image_grid_thw"].tolist() == [[1, 34, 46], [1, 36, 22]]  # 640x480 and 300x500
    assert float(ref["greedy_min_gap"]) > 1e-3  # greedy choices are not near-ties: a fair token comparison


def test_vision_tower_matches(reference):
    ref, model, inputs = reference
    with paddle.no_grad():
        emb = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"]).numpy()
    assert emb.shape == ref["image_embeds"].shape
    np.testing.assert_allclose(emb, ref["image_embeds"], atol=TOL, rtol=0)


def test_rope_index_matches(reference):
    ref, model, inputs = reference
    _, deltas = model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    np.testing.assert_array_equal(deltas.numpy(), ref["rope_deltas"])


def test_logits_and_hidden_states_match(reference):
    ref, model, inputs = reference
    with paddle.no_grad():
        out = model(**inputs)
    valid = ref["attention_mask"] == 1  # padded positions are masked out and undefined in both
    np.testing.assert_allclose(out.hidden_states.numpy()[valid], ref["hidden"][valid], atol=TOL, rtol=0)
    logits = out.logits.numpy()
    picked = np.stack([logits[i, idx] for i, idx in enumerate(ref["logit_index"])])
    np.testing.assert_allclose(picked, ref["logits"], atol=TOL, rtol=0)
    np.testing.assert_array_equal(out.rope_deltas.numpy(), ref["rope_deltas"])


def _greedy(model, inputs, steps, use_cache):
    ids, mask, grid = inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"]
    b, t = ids.shape
    with paddle.no_grad():
        image_embeds = model.get_image_embeds(inputs["pixel_values"], grid)
        out = model(ids, mask, image_embeds=image_embeds, image_grid_thw=grid, use_cache=use_cache,
                    logits_to_keep=1)
        deltas = out.rope_deltas
        tokens = []
        for step in range(steps):
            nxt = out.logits[:, -1].argmax(-1).unsqueeze(1)
            tokens.append(nxt)
            mask = paddle.concat([mask, paddle.ones([b, 1], mask.dtype)], axis=1)
            if use_cache:
                pos = (deltas + t + step).unsqueeze(0).expand([3, b, 1])
                out = model(nxt, mask, position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
            else:  # re-run the whole sequence: positions come from get_rope_index again
                ids = paddle.concat([ids, nxt], axis=1)
                out = model(ids, mask, image_embeds=image_embeds, image_grid_thw=grid, logits_to_keep=1)
    return paddle.concat(tokens, axis=1).numpy()


def test_greedy_with_kv_cache_matches_reference(reference):
    ref, model, inputs = reference
    tokens = _greedy(model, inputs, ref["greedy_tokens"].shape[1], use_cache=True)
    np.testing.assert_array_equal(tokens, ref["greedy_tokens"])


def test_greedy_without_cache_matches_reference(reference):
    ref, model, inputs = reference
    tokens = _greedy(model, inputs, ref["greedy_tokens"].shape[1], use_cache=False)
    np.testing.assert_array_equal(tokens, ref["greedy_tokens"])
