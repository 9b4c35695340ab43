"""MMAD protocol (issue 17): loader for mmad.json's layout, strict scoring, MMAD's figures, the runner and the CLI,
on a small MMAD-format fixture written here (two sources, detection + multiple-choice questions)."""
import json
import os

import pytest
from PIL import Image

from ppiad.eval.mmad import (DETECTION, MMADError, detection_letters, load_mmad, mmad_figures, multiple_choice_prompt,
                             run_mmad, strict_letter)
from ppiad.eval.predictor import Prediction
from tests.conftest import load_tool

YES_NO = {"A": "Yes.", "B": "No."}


def _detect(defect: bool, options=YES_NO):
    yes = next(k for k, v in options.items() if v.lower().startswith("yes"))
    no = next(k for k, v in options.items() if v.lower().startswith("no"))
    return {"type": "Anomaly Detection", "Question": "Is there any defect in the object?", "Options": options,
            "Answer": yes if defect else no}


def write_fixture(root):
    """MVTec-AD: bottle good/000 (normal), bottle broken/000 (defect, 3 questions); VisA: pcb1 good (normal,
    detection options reversed: A = No), pcb1 bad (defect). Templates: two normal train images per category."""
    def png(rel, value):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (40, 30), (value, value, 0)).save(path)
        return rel

    t_bottle = [png(f"MVTec-AD/bottle/train/good/{i}.png", 200 + i) for i in range(2)]
    t_pcb = [png(f"VisA/pcb1/train/good/{i}.png", 210 + i) for i in range(2)]
    data = {
        png("MVTec-AD/bottle/test/good/000.png", 220): {
            "random_templates": t_bottle, "similar_templates": t_bottle[::-1],
            "conversation": [_detect(False), {"type": "Object Structure", "Question": "What shape is it?",
                                              "Options": {"A": "round", "B": "square"}, "Answer": "A"}]},
        png("MVTec-AD/bottle/test/broken/000.png", 30): {
            "random_templates": t_bottle, "similar_templates": t_bottle,
            "conversation": [_detect(True), {"type": "Defect Classification", "Question": "Which defect?",
                                             "Options": {"A": "crack", "B": "stain", "C": "none"}, "Answer": "A"},
                             {"type": "Object Details", "Question": "Colour?", "Options": {"A": "red", "B": "green"},
                              "Answer": "B"}]},
        png("VisA/pcb1/test/good/001.png", 230): {
            "random_templates": t_pcb, "similar_templates": t_pcb,
            "conversation": [_detect(False, {"A": "No.", "B": "Yes."})]},
        png("VisA/pcb1/test/bad/002.png", 40): {
            "random_templates": t_pcb, "similar_templates": t_pcb, "conversation": [_detect(True)]},
    }
    path = os.path.join(root, "mmad.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def test_loader_reads_the_layout(tmp_path):
    path = write_fixture(str(tmp_path))
    det = load_mmad(path)
    assert [i.key for i in det] == sorted(i.key for i in det) and len(det) == 4
    assert all(len(i.questions) == 1 and i.questions[0].type == DETECTION for i in det)
    by_key = {i.key: i for i in det}
    assert by_key["VisA/pcb1/test/good/001.png"].label == "normal"
    assert by_key["MVTec-AD/bottle/test/broken/000.png"].label == "defect"
    item = by_key["MVTec-AD/bottle/test/good/000.png"]
    assert (item.source, item.category) == ("MVTec-AD", "bottle")
    assert item.references == (os.path.join(str(tmp_path), "MVTec-AD/bottle/train/good/0.png"),)
    similar = {i.key: i for i in load_mmad(path, templates="similar")}
    assert similar["MVTec-AD/bottle/test/good/000.png"].references[0].endswith("1.png")
    assert all(i.references == () for i in load_mmad(path, shots=0))
    full = load_mmad(path, subtasks="all", shots=2)
    types = [q.type for i in full for q in i.questions]
    assert len(types) == 7 and types.count("Object Analysis") == 2   # Object Structure / Details merged


def test_loader_names_the_file_and_key_at_fault(tmp_path):
    path = write_fixture(str(tmp_path))
    data = json.load(open(path))
    key = "VisA/pcb1/test/bad/002.png"
    data[key]["conversation"][0].pop("Answer")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(MMADError, match=r"bad\.json.*002\.png.*\['conversation'\]\[0\].*'Answer'"):
        load_mmad(str(bad))
    with pytest.raises(MMADError, match="fewer than shots=3"):
        load_mmad(path, shots=3)
    data = json.load(open(path))
    data[key]["conversation"][0]["type"] = "Colour Guessing"
    bad.write_text(json.dumps(data))
    with pytest.raises(MMADError, match="unknown question type 'Colour Guessing'"):
        load_mmad(str(bad))
    with pytest.raises(FileNotFoundError):
        load_mmad(str(tmp_path / "none.json"))


def test_detection_letters_follow_the_options():
    from ppiad.eval.mmad import MMADQuestion

    q = MMADQuestion(DETECTION, "?", {"A": "No", "B": "Yes"}, "B", 0)
    assert detection_letters(q) == {"A": "B", "B": "A"}   # ppiad's A (defect) is MMAD's "Yes" = B here
    with pytest.raises(MMADError):
        detection_letters(MMADQuestion(DETECTION, "?", {"A": "Maybe", "B": "No"}, "B", 0))


def test_strict_letter():
    assert strict_letter("<think>x</think> <answer>C</answer>", "ABC") == "C"
    assert strict_letter("<think></think><answer> A </answer>\n", "AB") == "A"
    for bad in ("C", "Answer: A.", "<think></think> <answer>D</answer>", "<think></think> <answer>a</answer>",
                "<think><think></think> <answer>A</answer>", None):
        assert strict_letter(bad, "ABC") is None


def test_figures_match_hand_counts_and_unparseable_is_wrong():
    recs = [  # source S: 2 normal (1 right, 1 false alarm), 2 defect (1 found, 1 unparseable)
        {"source": "S", "type": DETECTION, "label": "normal", "answer": "B", "predicted": "B"},
        {"source": "S", "type": DETECTION, "label": "normal", "answer": "B", "predicted": "A"},
        {"source": "S", "type": DETECTION, "label": "defect", "answer": "A", "predicted": "A"},
        {"source": "S", "type": DETECTION, "label": "defect", "answer": "A", "predicted": None},
        {"source": "S", "type": "Defect Classification", "label": "defect", "answer": "C", "predicted": "C"},
        # source T: detection all right on 1 normal + 3 defects
        {"source": "T", "type": DETECTION, "label": "normal", "answer": "A", "predicted": "A"},
        *[{"source": "T", "type": DETECTION, "label": "defect", "answer": "B", "predicted": "B"}] * 3,
    ]
    f = mmad_figures(recs)
    s = f["per_source"]["S"]
    assert s["accuracy"][DETECTION] == pytest.approx(0.5)          # (1/2 + 1/2) / 2
    assert s["accuracy"]["Defect Classification"] == 1.0
    assert s["average"] == pytest.approx(0.75)
    d = s["detection"]
    assert (d["precision"], d["recall"], d["f1"], d["overkill"], d["miss"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert d["confusion"] == [[1, 1], [1, 1]] and s["unparseable"] == {DETECTION: 1, "Defect Classification": 0}
    assert f["per_source"]["T"]["accuracy"][DETECTION] == 1.0
    assert f["average"]["accuracy"][DETECTION] == pytest.approx(0.75)   # mean over sources
    assert f["average"]["detection"]["miss"] == pytest.approx(0.25) and f["unparseable"] == 1 and f["n"] == 9


def test_multiple_choice_prompt_lists_the_options():
    from ppiad.eval.mmad import MMADQuestion

    q = MMADQuestion("Defect Classification", "Which defect?", {"A": "crack", "B": "stain", "C": "none"}, "A", 1)
    text = multiple_choice_prompt("bottle", q, 1)
    assert text.startswith("The first image shows a normal bottle")
    assert "Question: Which defect?\nOptions: (A) crack (B) stain (C) none." in text
    assert "<answer>A or B or C</answer>" in text
    assert not multiple_choice_prompt("bottle", q, 0).startswith("The first")


class Fake:
    """Detection: 'defect' for dark images; multiple choice: always A, but unparseable for 'Colour?'."""

    def __init__(self):
        self.calls = {"predict": 0, "complete": 0, "refs": []}

    def predict(self, images, object_names, references=None):
        self.calls["predict"] += len(images)
        self.calls["refs"] += [len(r) for r in references or []]
        out = []
        for im in images:
            a = "A" if sum(im.getpixel((0, 0))) < 200 else "B"
            out.append(Prediction(f"<think></think> <answer>{a}</answer>", "", a, True, 0.9 if a == "A" else 0.1))
        return out

    def complete(self, images, prompts, references=None):
        self.calls["complete"] += len(images)
        return ["I think green" if "Colour?" in p else "<think></think> <answer>A</answer>" for p in prompts]


def test_run_mmad_scores_resumes_and_reports(tmp_path):
    path = write_fixture(str(tmp_path / "mmad"))
    items = load_mmad(path, subtasks="all")
    fake = Fake()
    out = str(tmp_path / "out")
    m = run_mmad(items, fake, out, batch_size=3)
    assert fake.calls["predict"] == 4 and fake.calls["complete"] == 3 and fake.calls["refs"] == [1, 1, 1, 1]
    f = m["mmad"]
    # detection right everywhere (the reversed VisA options included), Object Details unparseable -> wrong
    assert f["per_source"]["VisA"]["accuracy"][DETECTION] == 1.0
    assert f["per_source"]["MVTec-AD"]["accuracy"]["Object Analysis"] == 0.5
    assert f["per_source"]["MVTec-AD"]["unparseable"]["Object Analysis"] == 1 and f["unparseable"] == 1
    assert m["ppiad_detection"]["overall"]["accuracy"] == 1.0
    assert os.path.isfile(os.path.join(out, "mmad_report.md")) and os.path.isfile(os.path.join(out, "mmad_metrics.json"))
    again = Fake()
    assert run_mmad(items, again, out)["mmad"] == f and again.calls["predict"] == again.calls["complete"] == 0


def test_unreadable_images_are_excluded_counted_and_retried(tmp_path):
    path = write_fixture(str(tmp_path / "mmad"))
    broken = tmp_path / "mmad" / "VisA/pcb1/test/bad/002.png"
    broken.write_bytes(b"not a png")
    items = load_mmad(path)
    out = str(tmp_path / "out")
    m = run_mmad(items, Fake(), out)
    assert m["unreadable"] == {"n": 1, "images": ["VisA/pcb1/test/bad/002.png"]} and m["mmad"]["n"] == 3
    assert m["mmad"]["per_source"]["VisA"]["n"] == {DETECTION: 1}
    Image.new("RGB", (40, 30), (40, 40, 0)).save(broken)   # fixed: asked again, the others are not
    fake = Fake()
    m = run_mmad(items, fake, out)
    assert fake.calls["predict"] == 1 and m["unreadable"]["n"] == 0 and m["mmad"]["n"] == 4


def test_mmad_tool(tmp_path, capsys):
    path = write_fixture(str(tmp_path / "mmad"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path}\noutput_dir: {tmp_path / 'output'}\n")
    tool = load_tool("mmad")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"0")
    args = ["-c", str(cfg), "--mmad_json", path, "--output_dir", str(tmp_path / "o")]
    assert tool.main(args, predictor_factory=lambda c: Fake()) == 0
    assert "detection balanced accuracy 100.00" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:   # the same folder with other settings: refused
        tool.main(args + ["--shots", "0"], predictor_factory=lambda c: Fake())
    assert exc.value.code == 2
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        tool.main(["-c", str(cfg), "--mmad_json", str(tmp_path / "broken.json")], predictor_factory=lambda c: Fake())
    assert exc.value.code == 2 and "broken.json" in capsys.readouterr().err


def test_mmad_tool_stops_when_the_training_data_hold_mmad_images(tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("PPIAD_CACHE_DIR", str(tmp_path / "cache"))
    path = write_fixture(str(tmp_path / "mmad"))
    train = tmp_path / "train" / "bottle"
    (train / "train" / "good").mkdir(parents=True)
    shutil.copy(tmp_path / "mmad" / "MVTec-AD/bottle/test/broken/000.png", train / "train" / "good" / "copy.png")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path}\ndata:\n  train:\n    dataset: mvtec\n    root: {tmp_path / 'train'}\n")
    tool = load_tool("mmad")
    args = ["-c", str(cfg), "--mmad_json", path, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        tool.main(args, predictor_factory=lambda c: Fake())
    assert exc.value.code == 2 and "1 evaluation image(s) identical to training images" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert tool.main(args + ["-o", "data.allow_overlap=true"], predictor_factory=lambda c: Fake()) == 0
