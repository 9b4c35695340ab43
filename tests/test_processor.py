"""Qwen2-VL processor: image preprocessing, chat template, batching, and parity with transformers 4.51.3."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ppiad.models.processor import (IMAGE_TOKEN, DEFAULT_TEMPLATE_FILE, ImageProcessor, Qwen2VLProcessor,
                                    smart_resize)
from ppiad.prompt import build_prompt
from tests.conftest import QWEN2_TOKENIZER_DIR, require_ref_python, require_shared

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_PIXELS = 401408


def _image(width, height, seed=0):
    """Gradients plus noise, so resampling and channel order both matter."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / max(width - 1, 1), y * 255.0 / max(height - 1, 1),
                     (x + y) * 127.0 / max(width + height - 2, 1)], axis=-1)
    arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _user(text, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """The real Qwen2 tokenizer + ppiad's preprocessor_config.json and chat_template.json."""
    src = require_shared(QWEN2_TOKENIZER_DIR)
    d = tmp_path_factory.mktemp("qwen_proc")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), d / name)
    proc = Qwen2VLProcessor.from_pretrained(str(d), min_pixels=56 * 56, max_pixels=MAX_PIXELS)
    proc.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def proc(qwen_dir):
    return Qwen2VLProcessor.from_pretrained(qwen_dir)


# ---------------------------------------------------------------------------------------------------------
# Unit tests (no reference needed)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w", [(480, 640), (300, 1000), (56, 56), (2000, 2000), (20, 20), (28, 5000)])
def test_smart_resize_bounds(h, w):
    rh, rw = smart_resize(h, w, 28, 3136, MAX_PIXELS)
    assert rh % 28 == 0 and rw % 28 == 0
    assert 3136 <= rh * rw <= MAX_PIXELS
    assert abs(rh / rw - h / w) / (h / w) < 0.35  # aspect ratio roughly kept


def test_smart_resize_known_values():
    assert smart_resize(480, 640, 28, 3136, MAX_PIXELS) == (476, 644)
    assert smart_resize(2000, 2000, 28, 3136, MAX_PIXELS) == (616, 616)
    assert smart_resize(56, 56, 28, 3136, MAX_PIXELS) == (56, 56)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_patch_order_matches_merge_windows():
    """Row k of pixel_values is patch (window row, window col, inner row, inner col), features (C, T, y, x)."""
    ip = ImageProcessor(min_pixels=56 * 56, max_pixels=112 * 84, do_normalize=False)
    img = _image(84, 112, seed=3)
    patches, (t, gh, gw) = ip.preprocess(img)
    assert (t, gh, gw) == (1, 8, 6)
    arr = (np.asarray(img).astype(np.float64) / 255).astype(np.float32).transpose(2, 0, 1)  # C, H, W
    m, p = 2, 14
    k = 0
    for wy in range(gh // m):
        for wx in range(gw // m):
            for iy in range(m):
                for ix in range(m):
                    y0, x0 = (wy * m + iy) * p, (wx * m + ix) * p
                    block = arr[:, y0:y0 + p, x0:x0 + p]
                    expected = np.stack([block, block], axis=1).reshape(-1)  # C, T(=2 copies), y, x
                    np.testing.assert_array_equal(patches[k], expected)
                    k += 1
    assert k == patches.shape[0] == 48


def test_default_chat_template_is_qwen2_vl_format(proc):
    text = proc.apply_chat_template(_user("TEXT"))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>TEXT<|im_end|>\n<|im_start|>assistant\n")
    no_gen = proc.apply_chat_template(_user("TEXT"), add_generation_prompt=False)
    assert no_gen == text[: -len("<|im_start|>assistant\n")]
    system = [{"role": "system", "content": "Be brief."}] + _user("hi", image=False)
    assert proc.apply_chat_template(system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")


def test_template_without_chat_template_json_uses_shipped_one(tmp_path):
    src = require_shared(QWEN2_TOKENIZER_DIR)
    shutil.copy(os.path.join(src, "tokenizer.json"), tmp_path / "tokenizer.json")
    p = Qwen2VLProcessor.from_pretrained(str(tmp_path))
    assert p.chat_template_source == DEFAULT_TEMPLATE_FILE
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}\n[{{ m['role'] }}]\n{% endfor %}\n{% if add_generation_prompt %}>{% endif %}")}))
    p2 = Qwen2VLProcessor.from_pretrained(str(tmp_path))
    # trim_blocks / lstrip_blocks like transformers: block tags leave no newlines behind
    assert p2.apply_chat_template(_user("x")) == "[user]\n>"


def test_batch_is_left_padded_and_typed(proc):
    import paddle

    short, long = build_prompt("pill"), build_prompt("printed circuit board")
    texts = [proc.apply_chat_template(_user(long)), proc.apply_chat_template(_user(short))]
    out = proc(text=texts, images=[_image(100, 80), _image(64, 64, 1)])
    ids, mask = out["input_ids"].numpy(), out["attention_mask"].numpy()
    assert out["input_ids"].dtype == paddle.int64 and out["pixel_values"].dtype == paddle.float32
    assert out["image_grid_thw"].dtype == paddle.int64
    n_short = int(mask[1].sum())
    assert mask[0].all() and n_short < ids.shape[1]
    assert (mask[1, : ids.shape[1] - n_short] == 0).all() and (mask[1, ids.shape[1] - n_short:] == 1).all()
    assert (ids[1, : ids.shape[1] - n_short] == proc.pad_token_id).all()
    # one <|image_pad|> per merged patch
    grids = out["image_grid_thw"].numpy()
    for row, g in zip(ids, grids):
        assert (row == proc.image_token_id).sum() == g.prod() // 4
    assert out["pixel_values"].shape[0] == int(grids.prod(axis=1).sum())


def test_placeholder_count_must_match_images(proc):
    text = proc.apply_chat_template(_user("x"))
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholders but 2 images"):
        proc(text=[text], images=[_image(56, 56), _image(56, 56)])


def test_max_prompt_length_error_names_the_length(qwen_dir):
    p = Qwen2VLProcessor.from_pretrained(qwen_dir, max_pixels=MAX_PIXELS, max_prompt_length=100)
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens .*model.max_prompt_length=100"):
        p.build_inputs([_image(640, 480)], ["pill"])


def test_build_inputs_puts_image_first(proc):
    out = proc.build_inputs([_image(64, 64)], ["metal nut"], return_tensors="np")
    text = proc.tokenizer.decode(out["input_ids"][0])
    user = text.split("<|im_start|>user\n", 1)[1]
    assert user.startswith("<|vision_start|>" + IMAGE_TOKEN)
    assert "<|vision_end|>" + build_prompt("metal nut") + "<|im_end|>\n<|im_start|>assistant\n" in user


def test_tokenizer_special_ids(proc):
    tok = proc.tokenizer
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>") == 151643
    assert proc.eos_token_ids == [151645, 151643]
    assert proc.image_token_id == 151655
    with pytest.raises(KeyError, match="not in the tokenizer"):
        tok.token_to_id("<|no_such_token|>")


def test_text_round_trip(proc):
    tok = proc.tokenizer
    for name in ("pill", "metal nut", "printed circuit board", "chewing gum"):
        prompt = proc.apply_chat_template(_user(build_prompt(name), image=False))
        ids = tok.encode(prompt)
        assert tok.decode(ids) == prompt
        assert tok.decode(ids, skip_special_tokens=True) == prompt.replace("<|im_start|>", "").replace(
            "<|im_end|>", "")
    completion = "<think>A scratch on the cap; Ünïcödé 缺陷 ✓.</think> <answer>A</answer>"
    assert tok.decode(tok.encode(completion)) == completion


def test_bad_directory_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        Qwen2VLProcessor.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Qwen2VLProcessor.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers 4.51.3 (reference venv, subprocess)
# ---------------------------------------------------------------------------------------------------------
PARITY_TEXTS = [
    build_prompt("pill"),
    "<think>The surface is smooth; no crack.</think> <answer>B</answer>",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Ünïcödé 缺陷 ✓  tabs\tand\n\nnewlines<|im_end|>",
]


@pytest.fixture(scope="module")
def parity(qwen_dir, tmp_path_factory):
    ref_python = require_ref_python()
    work = tmp_path_factory.mktemp("proc_parity")
    sizes = {"a": (640, 480), "b": (1000, 300), "c": (56, 56), "d": (2000, 2000), "e": (20, 20)}
    paths = {}
    for i, (key, (w, h)) in enumerate(sizes.items()):
        paths[key] = str(work / f"{key}.png")
        _image(w, h, seed=i).save(paths[key])
    cases = [
        {"name": "pair", "images": [paths["a"], paths["b"]],
         "messages": [_user(build_prompt("pill")), _user(build_prompt("printed circuit board"))]},
        {"name": "sizes", "images": [paths["c"], paths["d"]],
         "messages": [_user(build_prompt("screw")), _user("Is this zipper broken?")]},
        {"name": "small", "images": [paths["e"]], "messages": [_user(build_prompt("pcb"))], "lenient_small": True},
        {"name": "text", "images": [], "messages": [_user("hi", image=False), _user(build_prompt("wood"), False)]},
    ]
    spec = {"dir": qwen_dir, "cases": cases, "texts": PARITY_TEXTS}
    (work / "spec.json").write_text(json.dumps(spec))
    out = work / "ref.npz"
    res = subprocess.run([ref_python, os.path.join(HERE, "ref", "processor_reference.py"), str(work / "spec.json"),
                          str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = dict(np.load(out))
    meta = json.loads(bytes(ref.pop("meta")).decode("utf-8"))
    return cases, ref, meta


def test_parity_prompts_ids_pixels(proc, parity):
    cases, ref, meta = parity
    for case in cases:
        name = case["name"]
        texts = [proc.apply_chat_template(m) for m in case["messages"]]
        for ours, theirs in zip(texts, meta["prompts"][name]):
            assert ours == theirs, (name, ours[-300:], theirs[-300:], len(ours), len(theirs))
        images = [Image.open(p).convert("RGB") for p in case["images"]] or None
        out = proc(text=texts, images=images, return_tensors="np")
        np.testing.assert_array_equal(out["input_ids"], ref[f"{name}.input_ids"], err_msg=name)
        np.testing.assert_array_equal(out["attention_mask"], ref[f"{name}.attention_mask"], err_msg=name)
        if images:
            np.testing.assert_array_equal(out["image_grid_thw"], ref[f"{name}.image_grid_thw"], err_msg=name)
            np.testing.assert_allclose(out["pixel_values"], ref[f"{name}.pixel_values"], rtol=0, atol=1e-5,
                                       err_msg=name)
        else:
            assert out["pixel_values"] is None and f"{name}.pixel_values" not in ref


def test_parity_covers_padding_and_resize_limits(parity):
    _, ref, meta = parity
    assert (ref["pair.attention_mask"] == 0).any()  # the two prompts differ in length: left pads present
    assert ref["pair.attention_mask"][:, -1].all()
    grids = ref["sizes.image_grid_thw"]
    assert grids[1].prod() * 14 * 14 <= MAX_PIXELS < 2000 * 2000  # 2000x2000 was downscaled
    assert ref["small.image_grid_thw"][0].prod() * 14 * 14 >= 56 * 56  # 20x20 was upscaled
    assert meta["ref_rejects_small"]  # the reference itself rejects it: our documented deviation


def test_parity_encode_decode(proc, parity):
    _, _, meta = parity
    tok = proc.tokenizer
    for text, ids, dec, dec_skip in zip(PARITY_TEXTS, meta["encoded"], meta["decoded"], meta["decoded_skip"]):
        assert tok.encode(text) == ids
        assert tok.decode(ids) == dec == text
        assert tok.decode(ids, skip_special_tokens=True) == dec_skip


def test_decode_accepts_paddle_and_numpy_ids(proc):
    import paddle

    text = "<think>ok</think> <answer>B</answer>"
    ids = proc.tokenizer.encode(text)
    assert proc.tokenizer.decode(paddle.to_tensor(ids)) == text
    assert proc.batch_decode(np.asarray([ids, ids])) == [text, text]
