"""The MMAD benchmark protocol (Jiang et al., "MMAD: A Comprehensive Benchmark for Multimodal Large Language Models
in Industrial Anomaly Detection", ICLR 2025; github.com/jam-cc/MMAD): loader, prompts and a strict scorer.

Layout of `mmad.json` (facts from the MMAD repository): one object keyed by the query image's path relative to the
MMAD root, `<source>/<category>/.../<file>` with source one of DS-MVTec, MVTec-AD, MVTec-LOCO, VisA, GoodsAD.
Each value holds
- `conversation`: a list of multiple-choice questions `{"type", "Question", "Options": {"A": text, ...},
  "Answer": letter}`; the first is the anomaly-detection question ("type": "Anomaly Detection", options yes / no),
  the others are the subtasks Defect Classification, Defect Localization, Defect Description, Defect Analysis,
  Object Classification and Object Structure / Object Details (scored together as Object Analysis);
- `random_templates` / `similar_templates`: paths (same root) of normal images of the same product, the
  k-shot references (MMAD's default: the first k of `random_templates`, k = 1).

Prompts are ppiad's own: the detection question is asked with LR-IAD's prompt (k-shot wording, ppiad.prompt),
whose A (defect) / B (normal) verdict is mapped onto MMAD's yes / no letters; every other question gets
`multiple_choice_prompt`. Scoring is strict: a completion that does not follow the format, or names a letter that is
not an option, is unparseable, counts as WRONG and is counted per subtask (MMAD's own script drops such answers,
which flatters a model that fails to answer).

Figures (`mmad_figures`), per source and their mean over sources, MMAD's definitions: accuracy per subtask, the
detection figure being the balanced accuracy (normal accuracy + defect accuracy) / 2; for detection also precision,
recall, F1 (defect = positive), overkill = false-alarm rate = 1 - normal accuracy, miss rate = 1 - defect accuracy.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

DETECTION = "Anomaly Detection"
SUBTASKS = (DETECTION, "Defect Classification", "Defect Localization", "Defect Description", "Defect Analysis",
            "Object Classification", "Object Analysis")
MERGED = {"Object Structure": "Object Analysis", "Object Details": "Object Analysis"}
TEMPLATE_KEYS = {"random": "random_templates", "similar": "similar_templates"}
YES, NO = "yes", "no"


class MMADError(ValueError):
    """mmad.json is not in MMAD's layout; the message names the file and the key at fault."""


@dataclass(frozen=True)
class MMADQuestion:
    type: str                  # MMAD's question type, Object Structure / Details merged into Object Analysis
    text: str
    options: dict              # {"A": text, "B": text, ...} in MMAD's order
    answer: str                # the correct letter
    index: int                 # position in the image's conversation


@dataclass(frozen=True)
class MMADItem:
    key: str                   # the image's key in mmad.json (relative path)
    path: str                  # absolute image path
    source: str                # first path component: DS-MVTec, MVTec-AD, MVTec-LOCO, VisA, GoodsAD
    category: str              # second path component, e.g. "bottle"
    label: str                 # "normal" / "defect" (from the detection question; see `_label`)
    references: tuple          # absolute paths of the k normal templates
    questions: tuple = field(default_factory=tuple)


def _yes_no(text: str) -> Optional[str]:
    word = re.sub(r"[^a-z]", "", str(text).lower())
    return YES if word == "yes" else NO if word == "no" else None


def detection_letters(q: MMADQuestion) -> dict:
    """{"A": MMAD letter meaning defect, "B": MMAD letter meaning normal} for a detection question.
    Raises MMADError when its options are not one yes and one no."""
    by_meaning = {_yes_no(t): letter for letter, t in q.options.items()}
    if set(by_meaning) != {YES, NO} or len(q.options) != 2:
        raise MMADError(f"detection question {q.text!r} must have exactly a yes and a no option, got {q.options}")
    return {"A": by_meaning[YES], "B": by_meaning[NO]}


def _label(key: str, questions: Sequence[MMADQuestion]) -> str:
    """The image's class: its detection question's correct option (yes = defect); without one, MMAD's rule
    (normal when "good" is in the path)."""
    for q in questions:
        if q.type == DETECTION:
            return "defect" if detection_letters(q)["A"] == q.answer else "normal"
    return "normal" if "good" in key else "defect"


def load_mmad(json_path: str, data_root: str | None = None, subtasks: str = "detection", shots: int = 1,
              templates: str = "random") -> list[MMADItem]:
    """MMAD items from `json_path` (images under `data_root`, default: the json's folder), sorted by key.

    subtasks: "detection" (the anomaly-detection question alone) or "all" (the seven subtasks).
    shots: k normal templates per item (0 = none); templates: "random" (MMAD's default) or "similar".
    Raises MMADError naming the file and key for anything not in MMAD's layout, and FileNotFoundError for a
    missing json. Image files are not opened here (a missing one is recorded when predicted)."""
    if subtasks not in ("detection", "all"):
        raise MMADError(f"subtasks must be 'detection' or 'all', got {subtasks!r}")
    if templates not in TEMPLATE_KEYS:
        raise MMADError(f"templates must be one of {sorted(TEMPLATE_KEYS)}, got {templates!r}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise MMADError(f"shots must be an integer >= 0, got {shots!r}")
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"MMAD file '{json_path}' does not exist (expected MMAD's mmad.json)")
    root = os.path.abspath(data_root or os.path.dirname(os.path.abspath(json_path)))
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:
        raise MMADError(f"'{json_path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise MMADError(f"'{json_path}' must be a non-empty object keyed by image path (MMAD's mmad.json)")
    items = []
    for key in sorted(data):
        entry, where = data[key], f"'{json_path}' [{key!r}]"
        parts = key.replace("\\", "/").split("/")
        if len(parts) < 3 or not isinstance(entry, dict):
            raise MMADError(f"{where}: expected a key <source>/<category>/.../<image> holding an object")
        conversation = entry.get("conversation")
        if not isinstance(conversation, list) or not conversation:
            raise MMADError(f"{where}: 'conversation' must be a non-empty list of questions")
        questions = []
        for i, qa in enumerate(conversation):
            at = f"{where}['conversation'][{i}]"
            if not isinstance(qa, dict) or not all(k in qa for k in ("type", "Question", "Options", "Answer")):
                raise MMADError(f"{at}: needs 'type', 'Question', 'Options' and 'Answer'")
            options = qa["Options"]
            if not isinstance(options, dict) or len(options) < 2 or qa["Answer"] not in options:
                raise MMADError(f"{at}: 'Options' must map at least two letters to texts and hold 'Answer' "
                                f"({qa['Answer']!r})")
            q = MMADQuestion(MERGED.get(qa["type"], qa["type"]), str(qa["Question"]),
                             {str(k): str(v) for k, v in options.items()}, str(qa["Answer"]), i)
            if q.type not in SUBTASKS:
                raise MMADError(f"{at}: unknown question type {qa['type']!r}; MMAD's: {', '.join(SUBTASKS)}")
            if q.type == DETECTION:
                try:
                    detection_letters(q)
                except MMADError as exc:
                    raise MMADError(f"{at}: {exc}") from None
            questions.append(q)
        refs = entry.get(TEMPLATE_KEYS[templates], [])
        if not isinstance(refs, list) or len(refs) < shots:
            raise MMADError(f"{where}: '{TEMPLATE_KEYS[templates]}' holds {len(refs) if isinstance(refs, list) else 0}"
                            f" paths, fewer than shots={shots}")
        if key in refs[:shots]:
            raise MMADError(f"{where}: the query image is its own template")
        asked = [q for q in questions if subtasks == "all" or q.type == DETECTION]
        if not asked:
            continue   # no detection question for this image
        items.append(MMADItem(key, os.path.join(root, key), parts[0], parts[1], _label(key, questions),
                              tuple(os.path.join(root, r) for r in refs[:shots]), tuple(asked)))
    if not items:
        raise MMADError(f"'{json_path}' holds no {'' if subtasks == 'all' else 'anomaly-detection '}question")
    return items


# ---------------------------------------------------------------------------------------------------------
# Prompts and strict reading
# ---------------------------------------------------------------------------------------------------------
def multiple_choice_prompt(object_name: str, question: MMADQuestion, shots: int) -> str:
    """ppiad's text for a non-detection MMAD question: the k-shot sentence (k > 0), the question, its options
    and LR-IAD's answer format with the option letters."""
    from ppiad.prompt import build_prompt

    intro = build_prompt(object_name, shots).split("\n", 1)[0] + "\n" if shots else ""
    letters = list(question.options)
    options = " ".join(f"({k}) {v}" for k, v in question.options.items())
    return (f"{intro}This is an image containing a {object_name}. Answer the question about it.\n"
            f"Question: {question.text}\nOptions: {options}.\n"
            "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.\n"
            "The output answer format should be as follows:\n"
            f"<think></think> <answer>{' or '.join(letters)}</answer>\n"
            "Please strictly follow the format.")


_STRICT_LETTER = re.compile(r"\s*<think>((?:(?!</?(?:think|answer)>).)*)</think>\s*<answer>\s*([A-Z])\s*</answer>\s*",
                            re.DOTALL)


def strict_letter(completion: Optional[str], options: Iterable[str]) -> Optional[str]:
    """The option letter of a completion exactly `<think>...</think> <answer>X</answer>` with X an option,
    else None (unparseable: scored wrong)."""
    if not isinstance(completion, str):
        return None
    m = _STRICT_LETTER.fullmatch(completion)
    return m.group(2) if m and m.group(2) in set(options) else None


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------
def _div(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def mmad_figures(records: Iterable[Mapping]) -> dict:
    """MMAD's figures from answer records {"source", "type", "label", "answer" (correct letter), "predicted"
    (letter or None = unparseable)}: {"per_source": {source: {...}}, "average": {...}}.

    Per source: "accuracy" {subtask: share correct}, with the detection entry the balanced accuracy;
    "unparseable" {subtask: count}; "n" {subtask: count}; "detection": precision, recall, f1, overkill (false-alarm
    rate), miss (miss rate), normal_accuracy, defect_accuracy, confusion [[tn, fp], [fn, tp]]; "average" = the
    mean over the subtasks present. The top-level "average" is the mean of each figure over sources (MMAD's table)."""
    per: dict = {}
    for r in records:
        s = per.setdefault(r["source"], {"n": {}, "correct": {}, "unparseable": {}, "tn": 0, "fp": 0, "fn": 0, "tp": 0})
        t = r["type"]
        ok = r.get("predicted") is not None and r["predicted"] == r["answer"]
        s["n"][t] = s["n"].get(t, 0) + 1
        s["correct"][t] = s["correct"].get(t, 0) + int(ok)
        s["unparseable"][t] = s["unparseable"].get(t, 0) + int(r.get("predicted") is None)
        if t == DETECTION:
            if r["label"] == "defect":
                s["tp" if ok else "fn"] += 1
            else:
                s["tn" if ok else "fp"] += 1
    out = {}
    for source, s in sorted(per.items()):
        acc = {t: s["correct"][t] / s["n"][t] for t in SUBTASKS if t in s["n"]}
        det = None
        if DETECTION in s["n"]:
            tn, fp, fn, tp = s["tn"], s["fp"], s["fn"], s["tp"]
            normal_acc, defect_acc = _div(tn, tn + fp), _div(tp, tp + fn)
            precision, recall = _div(tp, tp + fp), defect_acc
            f1 = (2 * precision * recall / (precision + recall) if precision and recall else
                  (0.0 if precision is not None and recall is not None else None))
            acc[DETECTION] = _mean([normal_acc, defect_acc])   # MMAD: (normal acc + anomaly acc) / 2
            det = {"precision": precision, "recall": recall, "f1": f1, "normal_accuracy": normal_acc,
                   "defect_accuracy": defect_acc, "overkill": None if normal_acc is None else 1 - normal_acc,
                   "miss": None if defect_acc is None else 1 - defect_acc, "confusion": [[tn, fp], [fn, tp]]}
        out[source] = {"accuracy": acc, "average": _mean(acc.values()), "n": dict(s["n"]),
                       "unparseable": dict(s["unparseable"]), "detection": det}
    average = {"accuracy": {t: _mean(o["accuracy"].get(t) for o in out.values()) for t in SUBTASKS
                            if any(t in o["accuracy"] for o in out.values())},
               "average": _mean(o["average"] for o in out.values())}
    dets = [o["detection"] for o in out.values() if o["detection"]]
    if dets:
        average["detection"] = {k: _mean(d[k] for d in dets) for k in
                                ("precision", "recall", "f1", "normal_accuracy", "defect_accuracy", "overkill", "miss")}
    return {"per_source": out, "average": average,
            "unparseable": sum(sum(o["unparseable"].values()) for o in out.values()),
            "n": sum(sum(o["n"].values()) for o in out.values())}


def mmad_markdown(figures: dict, ppiad_overall: Optional[dict] = None) -> str:
    """The report: MMAD's table (per source, subtasks in %) and, beside it, ppiad's detection figures."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"

    types = [t for t in SUBTASKS if t in figures["average"]["accuracy"]]
    lines = ["# MMAD", "", "Accuracy in % (detection: balanced accuracy); unparseable answers count as wrong.", "",
             "| source | " + " | ".join(types) + " | average | overkill | miss | unparseable |",
             "| --- |" + " --- |" * (len(types) + 4)]
    rows = list(figures["per_source"].items()) + [("**mean over sources**", figures["average"])]
    for name, o in rows:
        det = o.get("detection") or {}
        unp = o.get("unparseable", figures["unparseable"])
        unp = sum(unp.values()) if isinstance(unp, dict) else unp
        lines.append(f"| {name} | " + " | ".join(pct(o["accuracy"].get(t)) for t in types)
                     + f" | {pct(o['average'])} | {pct(det.get('overkill'))} | {pct(det.get('miss'))} | {unp} |")
    det = figures["average"].get("detection")
    if det:
        lines += ["", f"Detection, mean over sources: precision {pct(det['precision'])}, recall {pct(det['recall'])}, "
                      f"F1 {pct(det['f1'])}, false alarms (overkill) {pct(det['overkill'])}, misses {pct(det['miss'])}."]
    if ppiad_overall:
        o = ppiad_overall
        lines += ["", "## ppiad's figures (detection, all sources pooled)", "",
                  "| accuracy | F1-macro | balanced acc. | invalid rate |", "| --- | --- | --- | --- |",
                  f"| {pct(o.get('accuracy'))} | {pct(o.get('f1_macro'))} | {pct(o.get('balanced_accuracy'))} | "
                  f"{pct(o.get('invalid_rate'))} |"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Running a predictor (resumable)
# ---------------------------------------------------------------------------------------------------------
ANSWERS = "answers.jsonl"


def _object_name(item: MMADItem, object_names: Mapping[str, str] | None) -> str:
    from ppiad.data.registry import object_name_for

    return object_name_for(item.category, object_names)


def run_mmad(items: Sequence[MMADItem], predictor, out_dir: str, *, batch_size: int = 8,
             object_names: Mapping[str, str] | None = None, bit_depth: str = "auto", meta: dict | None = None,
             progress: bool = False) -> dict:
    """Answer every question of `items` with `predictor`, appending to `<out_dir>/answers.jsonl` (a re-run skips
    answered (image, question) pairs), then write `mmad_metrics.json` and `mmad_report.md`. Returns the metrics.

    Detection questions go through `predictor.predict(images, object_names, references)` (LR-IAD's prompt); the
    other subtasks through `predictor.complete(images, texts, references)` -> completions. An unreadable image
    or template is recorded with its error and left out of the figures (`metrics["unreadable"]`); a re-run
    asks its questions again."""
    from ppiad.eval.metrics import evaluate
    from ppiad.eval.runner import drop_torn_tail, try_load
    from ppiad.utils.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ANSWERS)
    drop_torn_tail(path)
    done = ({(r["image"], r["index"]) for r in read_jsonl(path) if not r.get("error")}
            if os.path.exists(path) else set())
    todo = [(item, q) for item in items for q in item.questions if (item.key, q.index) not in done]
    for start in range(0, len(todo), max(1, batch_size)):
        batch = todo[start:start + max(1, batch_size)]
        loaded = []
        for item, _ in batch:
            img, err = try_load(item.path, bit_depth)
            refs = []
            for r in item.references:
                ref, ref_err = try_load(r, bit_depth)
                err = err or (ref_err and f"template: {ref_err}")
                refs.append(ref)
            loaded.append((img, refs, err))
        ok = [i for i, (_, _, err) in enumerate(loaded) if err is None]
        results: dict[int, tuple] = {}
        det = [i for i in ok if batch[i][1].type == DETECTION]
        mc = [i for i in ok if batch[i][1].type != DETECTION]
        if det:
            kwargs = {"references": [loaded[i][1] for i in det]} if any(loaded[i][1] for i in det) else {}
            preds = predictor.predict([loaded[i][0] for i in det],
                                      [_object_name(batch[i][0], object_names) for i in det], **kwargs)
            for i, p in zip(det, preds):
                letter = detection_letters(batch[i][1]).get(p.answer) if p.answer else None
                results[i] = (p.completion, letter, p.answer, p.score)
        if mc:
            texts = [multiple_choice_prompt(_object_name(batch[i][0], object_names), batch[i][1],
                                            len(batch[i][0].references)) for i in mc]
            completions = predictor.complete([loaded[i][0] for i in mc], texts, [loaded[i][1] for i in mc])
            for i, c in zip(mc, completions):
                results[i] = (c, strict_letter(c, batch[i][1].options), None, None)
        for i, (item, q) in enumerate(batch):
            completion, letter, ab, score = results.get(i, (None, None, None, None))
            append_jsonl(path, {"image": item.key, "index": q.index, "source": item.source, "category": item.category,
                                "type": q.type, "label": item.label, "answer": q.answer, "predicted": letter,
                                "ppiad_answer": ab, "score": score, "completion": completion,
                                "references": list(item.references), "error": loaded[i][2]})
    wanted = {(item.key, q.index) for item in items for q in item.questions}
    records = {(r["image"], r["index"]): r for r in read_jsonl(path)}
    records = [records[k] for k in sorted(wanted)]
    # An unreadable image or template says nothing about the model: excluded from the figures and counted, as
    # in ppiad.eval.runner (an unparseable answer, by contrast, counts as wrong).
    errors = [r for r in records if r.get("error")]
    records = [r for r in records if not r.get("error")]
    if not records:
        raise RuntimeError(f"none of the {len(errors)} MMAD questions could be asked, e.g. {errors[0]['error']}")
    figures = mmad_figures(records)
    det = [{"category": f"{r['source']}/{r['category']}", "label": r["label"], "answer": r["ppiad_answer"],
            "score": r["score"]} for r in records if r["type"] == DETECTION]
    ppiad = evaluate(det) if det else None
    metrics = {"meta": dict(meta or {}), "mmad": figures, "ppiad_detection": ppiad,
               "images": len(items), "questions": len(records) + len(errors),
               "unreadable": {"n": len(errors), "images": sorted({r["image"] for r in errors})[:100]}}
    atomic_write_json(os.path.join(out_dir, "mmad_metrics.json"), metrics)
    atomic_write_text(os.path.join(out_dir, "mmad_report.md"),
                      mmad_markdown(figures, ppiad["overall"] if ppiad else None))
    return metrics
