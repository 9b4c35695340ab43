"""Numerical parity of ppiad's Paddle Qwen2.5-VL with transformers 4.51.3 on the same random weights.

tests/ref/make_reference_qwen2_5_vl.py runs once per session in the reference virtualenv: a tiny random
Qwen2.5-VL (4 vision blocks, full attention at 1 and 3, 112-px windows, real 151,936-row vocabulary) saved in HF
format with the real tokenizer, two non-square real-size images (640x480, 300x500) whose merged grids do not tile
into windows, a left-padded batch of the two prompts and each prompt alone. ppiad loads the directory through
AutoModel / AutoProcessor, processes the same PNGs and must reproduce ids, pixels, vision features, logits and
16 greedy tokens (with and without the KV cache); the padded batch must give what each prompt gives alone.
"""
import json
import os
import subprocess

import numpy as np
import paddle
import pytest

from tests import conftest
from tests.test_qwen2_vl_parity import _greedy
from ppiad.models import AutoModel, AutoProcessor, Qwen2_5_VLForConditionalGeneration

MAKE_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref", "make_reference_qwen2_5_vl.py")
TOL = 1e-4
PIXEL_TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    conftest.require_shared(conftest.QWEN2_TOKENIZER_DIR)
    ref_python = conftest.require_ref_python()
    out = tmp_path_factory.mktemp("qwen2_5_vl_ref")
    proc = subprocess.run([ref_python, MAKE_REFERENCE, str(out)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"reference script failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    ref = dict(np.load(out / "reference.npz"))
    model = AutoModel.from_pretrained(str(out / "model"))
    processor = AutoProcessor.from_pretrained(str(out / "model"))
    texts = json.loads((out / "texts.json").read_text())
    images = [str(out / f"image{i}.png") for i in range(len(texts))]
    return ref, model, processor, texts, images


def _inputs(processor, texts, images):
    return processor(text=texts, images=images)


def test_auto_model_is_qwen2_5_vl_with_window_attention(reference):
    ref, model, _, _, _ = reference
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    v = model.config.vision_config
    assert v.fullatt_block_indexes == [1, 3] and v.window_size == 112 and v.depth == 4
    # the two grids, in merged tokens 17 x 23 and 18 x 11, do not tile into 4 x 4 windows
    assert ref["image_grid_thw"].tolist() == [[1, 34, 46], [1, 36, 22]]
    mask = ref["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # a real left-padded batch
    assert float(ref["greedy_min_gap"]) > 1e-3  # no near-ties: token comparison is fair


def test_processor_matches(reference):
    ref, _, processor, texts, images = reference
    got = processor(text=texts, images=images, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], atol=PIXEL_TOL, rtol=0)


def test_vision_tower_matches(reference):
    ref, model, processor, texts, images = reference
    inputs = _inputs(processor, texts, images)
    with paddle.no_grad():
        emb = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"]).numpy()
    assert emb.shape == ref["image_embeds"].shape
    np.testing.assert_allclose(emb, ref["image_embeds"], atol=TOL, rtol=0)


def test_logits_hidden_states_and_rope_deltas_match(reference):
    ref, model, processor, texts, images = reference
    with paddle.no_grad():
        out = model(**_inputs(processor, texts, images))
    valid = ref["attention_mask"] == 1  # padded positions are masked out and undefined in both
    np.testing.assert_allclose(out.hidden_states.numpy()[valid], ref["hidden"][valid], atol=TOL, rtol=0)
    logits = out.logits.numpy()
    picked = np.stack([logits[i, idx] for i, idx in enumerate(ref["logit_index"])])
    np.testing.assert_allclose(picked, ref["logits"], atol=TOL, rtol=0)
    np.testing.assert_array_equal(out.rope_deltas.numpy(), ref["rope_deltas"])


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_greedy_tokens_match(reference, use_cache):
    ref, model, processor, texts, images = reference
    tokens = _greedy(model, _inputs(processor, texts, images), ref["greedy_tokens"].shape[1], use_cache=use_cache)
    np.testing.assert_array_equal(tokens, ref["greedy_tokens"])


def test_padded_batch_gives_what_each_prompt_gives_alone(reference):
    ref, model, processor, texts, images = reference
    batch = _inputs(processor, texts, images)
    with paddle.no_grad():
        batched = model(**batch, logits_to_keep=1).logits[:, -1].numpy()
    batched_tokens = _greedy(model, batch, 16, use_cache=True)
    for i in range(len(texts)):
        alone = _inputs(processor, texts[i:i + 1], images[i:i + 1])
        np.testing.assert_array_equal(alone["input_ids"].numpy(), ref[f"alone{i}.input_ids"])
        with paddle.no_grad():
            single = model(**alone, logits_to_keep=1).logits[:, -1].numpy()
        np.testing.assert_allclose(single, ref[f"alone{i}.last_logits"], atol=TOL, rtol=0)  # = reference alone
        np.testing.assert_allclose(batched[i], single[0], atol=TOL, rtol=0)  # = ppiad alone
        np.testing.assert_array_equal(_greedy(model, alone, 16, use_cache=True)[0], ref[f"alone{i}.greedy_tokens"][0])
        np.testing.assert_array_equal(batched_tokens[i], ref[f"alone{i}.greedy_tokens"][0])
