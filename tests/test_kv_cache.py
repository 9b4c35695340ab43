"""The preallocated decode cache: same logits as the concatenating list cache, written in place, bounded."""
import numpy as np
import paddle
import pytest
from PIL import Image

from ppiad.models.kv_cache import StaticKVCache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ppiad.models.processor import Qwen2VLProcessor
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), seed=0)
    return Qwen2VLForConditionalGeneration.from_pretrained(path), Qwen2VLProcessor.from_pretrained(path)


def _prefill(model, proc):
    # two images of different sizes: the shorter prompt is left padded
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8))
              for i in range(2)]
    inputs = proc.build_inputs(images, ["pill", "screw"])
    pos, deltas = model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    out = model(**inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
    return inputs, out, deltas


def test_static_cache_decodes_like_the_list_cache(tiny):
    model, proc = tiny
    g, steps = 2, 6
    with paddle.no_grad():
        inputs, out, deltas = _prefill(model, proc)
        mask = inputs["attention_mask"]
        assert int(mask.sum()) < mask.size  # padding present
        t = mask.shape[1]
        listed = [(paddle.repeat_interleave(k, g, 0), paddle.repeat_interleave(v, g, 0)) for k, v in out.past_key_values]
        static = StaticKVCache.from_prefill(out.past_key_values, mask, capacity=t + steps, repeats=g)
        mask_l = paddle.repeat_interleave(mask, g, 0)
        deltas = paddle.repeat_interleave(deltas, g, 0)
        tok = paddle.to_tensor(np.arange(2 * g).reshape([2 * g, 1]) + 5, dtype="int64")
        ptr = static.keys[0].data_ptr()
        for step in range(steps):
            mask_l = paddle.concat([mask_l, paddle.ones([2 * g, 1], "int64")], axis=1)
            pos = deltas + t + step
            a = model(input_ids=tok, attention_mask=mask_l, position_ids=pos.unsqueeze(0).expand([3, 2 * g, 1]),
                      past_key_values=listed, use_cache=True)
            b = model(input_ids=tok, position_ids=pos, past_key_values=static, use_cache=True)
            listed = a.past_key_values
            np.testing.assert_allclose(b.logits.numpy(), a.logits.numpy(), rtol=1e-5, atol=1e-5)
            tok = paddle.argmax(a.logits[:, -1], axis=-1).unsqueeze(-1)
        assert static.length == t + steps and static.keys[0].data_ptr() == ptr  # written in place
        with pytest.raises(ValueError, match="full"):
            model(input_ids=tok, position_ids=pos + 1, past_key_values=static, use_cache=True)


def test_bias_marks_padding_filled_and_free_slots():
    k = paddle.ones([2, 1, 3, 4])
    mask = paddle.to_tensor([[0, 1, 1], [1, 1, 1]])
    cache = StaticKVCache.from_prefill([(k, k)], mask, capacity=5)
    neg = np.finfo(np.float32).min
    bias = cache.begin_step().numpy()[:, 0, 0]
    np.testing.assert_array_equal(bias, [[neg, 0, 0, 0, neg], [0, 0, 0, 0, neg]])
    key, _ = cache.write(0, paddle.full([2, 1, 1, 4], 7.0), paddle.full([2, 1, 1, 4], 7.0))
    assert key.shape == [2, 1, 5, 4] and float(key[0, 0, 3, 0]) == 7.0 and float(key[0, 0, 4, 0]) == 0.0
    cache.end_step()
    with pytest.raises(ValueError, match="smaller than the prompt"):
        StaticKVCache.from_prefill([(k, k)], mask, capacity=2)


def test_text_positions_give_the_same_rotary_as_three_equal_axes(tiny):
    model, _ = tiny
    pos = paddle.to_tensor([[7, 8], [300, 301]], dtype="int64")
    c2, s2 = model.model.rotary(pos, paddle.float32)
    c3, s3 = model.model.rotary(pos.unsqueeze(0).expand([3, 2, 2]), paddle.float32)
    np.testing.assert_array_equal(c2.numpy(), c3.numpy())
    np.testing.assert_array_equal(s2.numpy(), s3.numpy())
