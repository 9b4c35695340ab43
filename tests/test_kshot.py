"""k-shot prompts (issue 17): the wording, the reference pool, and k through evaluation, identity and infer."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from ppiad.config import load_config
from ppiad.data.references import ReferencePool, build_reference_pool, folder_pool
from ppiad.data.registry import DatasetError
from ppiad.data.sample import Sample
from ppiad.eval.predictor import Prediction
from ppiad.prompt import PROMPT_TEMPLATE, build_prompt
from tests.conftest import QWEN2_TOKENIZER_DIR, load_tool, require_shared


# ---------------------------------------------------------------------------------------------------------
# Wording and processor
# ---------------------------------------------------------------------------------------------------------
def test_zero_shot_prompt_is_f_of_o_unchanged():
    assert build_prompt("pill") == PROMPT_TEMPLATE.replace("{object}", "pill")
    assert build_prompt("pill", 0) == build_prompt("pill")


def test_k_shot_prompt_is_one_sentence_then_f_of_o():
    one, three = build_prompt("metal nut", 1), build_prompt("metal nut", 3)
    assert one == ("The first image shows a normal metal nut without any defect, for reference; the last image "
                   "is the one to inspect.\n" + build_prompt("metal nut"))
    assert three.startswith("The first 3 images show a normal metal nut without any defect")
    assert three.endswith(build_prompt("metal nut"))
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="reference_images"):
            build_prompt("pill", bad)


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    from ppiad.models.processor import Qwen2VLProcessor

    src = require_shared(QWEN2_TOKENIZER_DIR)
    d = tmp_path_factory.mktemp("kshot_proc")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), d / name)
    return Qwen2VLProcessor.from_pretrained(str(d), min_pixels=56 * 56, max_pixels=112 * 112)


def _img(w, h, value):
    return Image.new("RGB", (w, h), (value, 100, 50))


def test_no_references_gives_todays_inputs_byte_for_byte(proc):
    images, names = [_img(60, 40, 10), _img(90, 90, 200)], ["pill", "printed circuit board"]
    today = proc(text=[proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": build_prompt(n)}]}]) for n in names], images=images,
        return_tensors="np")
    for refs in (None, [[], []]):
        got = proc.build_inputs(images, names, return_tensors="np", references=refs)
        for key in today:
            np.testing.assert_array_equal(got[key], today[key])


def test_references_come_first_in_order_and_counts_may_differ(proc):
    r1, r2, q1, q2 = _img(56, 56, 1), _img(112, 56, 2), _img(56, 112, 3), _img(84, 84, 4)
    out = proc.build_inputs([q1, q2], ["pill", "wood"], return_tensors="np", references=[[r1, r2], []])
    grids = [tuple(g) for g in out["image_grid_thw"]]
    assert grids == [proc.image_processor.preprocess(im)[1] for im in (r1, r2, q1, q2)]
    text0 = proc.decode(out["input_ids"][0][out["attention_mask"][0] == 1])
    assert text0.count("<|vision_start|>") == 3 and build_prompt("pill", 2) in text0
    assert text0.index("<|vision_end|>" + build_prompt("pill", 2)) > text0.rindex("<|vision_start|>")
    text1 = proc.decode(out["input_ids"][1][out["attention_mask"][1] == 1])
    assert text1.count("<|vision_start|>") == 1 and build_prompt("wood") in text1
    with pytest.raises(ValueError, match="reference lists"):
        proc.build_inputs([q1, q2], ["pill", "wood"], references=[[r1]])


# ---------------------------------------------------------------------------------------------------------
# Reference pool
# ---------------------------------------------------------------------------------------------------------
def _s(path, category="pill", label="normal"):
    return Sample(path, category, category, label, "good" if label == "normal" else "crack", "train")


def test_draw_is_deterministic_same_category_never_the_query():
    normals = [f"/d/pill/good/{i:03d}.png" for i in range(20)]
    pool = ReferencePool({"pill": normals, "wood": ["/d/wood/good/0.png"] * 1}, 3, {"pool": "test"})
    for q in normals[:10]:
        refs = pool.draw(_s(q))
        assert len(refs) == len(set(refs)) == 3 and q not in refs and set(refs) <= set(normals)
        assert pool.draw(_s(q)) == refs   # seeded by the query's path
    assert len({tuple(pool.draw(_s(q))) for q in normals}) > 10   # not one fixed set for every query
    with pytest.raises(DatasetError, match="category 'wood'"):
        pool.draw(_s("/d/wood/test/x.png", "wood", "defect"))


def test_pool_never_holds_an_evaluation_image():
    normals = [f"/d/pill/good/{i}.png" for i in range(4)]
    pool = ReferencePool({"pill": normals}, 2, {"pool": "test"}, exclude=normals[:2])
    assert pool.by_category == {"pill": normals[2:]} and pool.excluded == 2
    assert set(pool.draw(_s("/d/pill/test/q.png", label="defect"))) == set(normals[2:])


def _write(path, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (32, 32), (value, value, value)).save(path)
    return str(path)


def _mvtec(root, values=range(4)):
    """A small MVTec-AD-like tree: pill/train/good, pill/test/{good,crack}."""
    for i in values:
        _write(os.path.join(root, "pill", "train", "good", f"{i}.png"), 10 + i)
    _write(os.path.join(root, "pill", "test", "good", "t0.png"), 100)
    _write(os.path.join(root, "pill", "test", "crack", "c0.png"), 200)
    return str(root)


def _cfg(tmp_path, *opts):
    return load_config(None, [f"data.train.root={tmp_path / 'ds'}", "data.train.split=train",
                              "data.train.dataset=mvtec", f"data.eval.root={tmp_path / 'ds'}",
                              "data.eval.split=test", "data.eval.dataset=mvtec", *opts])


def test_default_pool_is_the_training_partitions_normals(tmp_path):
    _mvtec(tmp_path / "ds")
    assert build_reference_pool(_cfg(tmp_path), "eval") is None   # k = 0
    pool = build_reference_pool(_cfg(tmp_path, "prompt.reference_images=2"), "eval")
    assert pool.k == 2 and [os.path.basename(p) for p in pool.by_category["pill"]] == [f"{i}.png" for i in range(4)]
    assert pool.source["pool"] == "normal images of data.train" and pool.source["split"] == "train"


def test_reference_root_pool(tmp_path):
    _mvtec(tmp_path / "ds")
    for i in range(3):
        _write(tmp_path / "refs" / "pill" / f"r{i}.png")
    cfg = _cfg(tmp_path, "prompt.reference_images=1", f"data.eval.reference_root={tmp_path / 'refs'}")
    pool = build_reference_pool(cfg, "eval")
    assert pool.source == {"pool": "data.eval.reference_root", "root": str(tmp_path / "refs")}
    assert len(pool.by_category["pill"]) == 3
    with pytest.raises(DatasetError, match="does not exist"):
        folder_pool(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------------
# Evaluation, identity, infer
# ---------------------------------------------------------------------------------------------------------
class RecordingPredictor:
    def __init__(self):
        self.calls = []

    def predict(self, images, object_names, references=None):
        self.calls.append(None if references is None else [len(r) for r in references])
        return [Prediction("<think></think> <answer>B</answer>", "", "B", True, 0.2) for _ in images]


def test_evaluation_draws_references_and_reports_k(tmp_path):
    from ppiad.data.registry import build_dataset
    from ppiad.eval.runner import run_evaluation
    from ppiad.utils.io import read_jsonl

    _mvtec(tmp_path / "ds")
    cfg = _cfg(tmp_path, "prompt.reference_images=2")
    samples = build_dataset(cfg.data.eval)
    pool = build_reference_pool(cfg, "eval", exclude=[s.path for s in samples])
    pred = RecordingPredictor()
    metrics = run_evaluation(samples, pred, str(tmp_path / "out"), batch_size=4, references=pool, progress=False)
    assert pred.calls == [[2, 2]]
    recs = read_jsonl(str(tmp_path / "out" / "predictions.jsonl"))
    for r in recs:
        assert r["references"] == pool.draw(next(s for s in samples if s.path == r["path"]))
        assert all("/train/good/" in p for p in r["references"])
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["reference_images"] == saved["reference_images"] == 2
    assert saved["reference_pool"]["pool"] == "normal images of data.train"
    assert saved["meta"]["reference images (k-shot)"] == 2
    assert "reference pool" in (tmp_path / "out" / "report.md").read_text()


def test_zero_shot_evaluation_passes_no_references(tmp_path):
    from ppiad.data.registry import build_dataset
    from ppiad.eval.runner import run_evaluation

    _mvtec(tmp_path / "ds")
    pred = RecordingPredictor()
    metrics = run_evaluation(build_dataset(_cfg(tmp_path).data.eval), pred, str(tmp_path / "out"), progress=False)
    assert pred.calls == [None] and metrics["reference_images"] == 0 and metrics["reference_pool"] is None


def test_identity_separates_k_and_pools(tmp_path, monkeypatch):
    import ppiad.eval.identity as eval_identity
    import ppiad.rl.identity as rl_identity
    from ppiad.eval.identity import evaluation_identity
    from ppiad.rl.identity import training_identity

    for mod in (eval_identity, rl_identity):   # no checkpoint here: the model's fingerprint is beside the point
        monkeypatch.setattr(mod, "model_fingerprint", lambda path: "model")
    base = _cfg(tmp_path)
    zero, one = evaluation_identity(base), evaluation_identity(_cfg(tmp_path, "prompt.reference_images=1"))
    assert not any("reference" in k for k in zero)   # 0-shot identities are what they were
    assert one["prompt.reference_images"] == 1 and one != zero
    other = evaluation_identity(_cfg(tmp_path, "prompt.reference_images=1", f"data.eval.reference_root={tmp_path}"))
    assert other["reference pool"] != one["reference pool"]
    assert training_identity(_cfg(tmp_path, "prompt.reference_images=1"))["prompt.reference_images"] == 1


def test_eval_tool_default_folder_names_k(tmp_path):
    eval_tool = load_tool("eval")
    assert eval_tool.default_output_dir(_cfg(tmp_path)).endswith("_base")
    assert eval_tool.default_output_dir(_cfg(tmp_path, "prompt.reference_images=1")).endswith("_base_1shot")


def test_infer_reference_flag(tmp_path):
    infer = load_tool("infer")
    query, ref1, ref2 = (_write(tmp_path / f"{n}.png") for n in ("q", "r1", "r2"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path}\n")
    pred = RecordingPredictor()
    args = ["-c", str(cfg), "--image", query, "--object", "pill"]
    assert infer.main(args + ["--reference", ref1, "--reference", ref2], predictor_factory=lambda c: pred) == 0
    assert pred.calls == [[2]]
    for bad, msg in ((["--reference", str(tmp_path / "missing.png")], "does not exist"),
                     (["-o", "prompt.reference_images=2", "--reference", ref1], "give 2 normal")):
        with pytest.raises(SystemExit) as exc:
            infer.main(args + bad, predictor_factory=lambda c: pred)
        assert exc.value.code == 2
