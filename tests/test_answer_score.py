"""The verdict's score P(A) is read at the token that decides the verdict, for every spelling the strict parser
accepts (issue 12, item 2), with Qwen2's real tokenizer, the tiny one, and a tokenizer without ">A"/">B"."""
import itertools
import math
import re

import numpy as np
import pytest

from ppiad.models.generation import UNSCORABLE, AnswerTokens, generate
from ppiad.prompt import parse_completion

from tests.conftest import QWEN2_TOKENIZER_DIR, require_shared
from tests.test_generation import _expected_score, _inputs, _scripted, tiny  # noqa: F401  (fixture)

# Every whitespace character Python's `\s` (the strict parser's) matches.
WHITESPACE = [chr(c) for c in range(0x3001) if re.fullmatch(r"\s", chr(c))]


def strict_spellings():
    """A grid over what ppiad.prompt's strict reading accepts: whitespace before, between the blocks, around
    the letter inside <answer>, after; each letter."""
    pads = ["", " ", "\n", "  ", "\t", "\r\n", " \n "]
    for lead, mid, before, after, tail, letter in itertools.product(
            ["", "\n"], ["", " ", "\n\n"], pads, pads, ["", "\n"], "AB"):
        yield f"{lead}<think>a scratch on the rim</think>{mid}<answer>{before}{letter}{after}</answer>{tail}"
    for think in ["", "边缘有划痕 (a scratch)", "it says <answer B or <answer A in the manual", "\n\n"]:
        for letter in "AB":   # reasoning that is empty, multi-byte, or holds "<answer" without the tag
            yield f"<think>{think}</think> <answer> {letter}</answer>"
    for ch in WHITESPACE:   # every single whitespace character on either side of the letter
        for letter in "AB":
            yield f"<think>ok</think> <answer>{ch}{letter}{ch}</answer>"


@pytest.fixture(scope="module")
def qwen():
    from ppiad.models.tokenizer import QwenTokenizer

    tok = QwenTokenizer.from_pretrained(require_shared(QWEN2_TOKENIZER_DIR))
    return tok, AnswerTokens.from_tokenizer(tok)


def _letter_index(text: str) -> int:
    return re.search(r"<answer>\s*([AB])", text).start(1)


def _check_decided_at_letter(tok, answer, ids, text):
    """The decision is the token holding the verdict letter, scored against its own twin."""
    hit = answer.find_decision(ids)
    assert hit is not None and hit != UNSCORABLE, (text, [tok.decode([i]) for i in ids])
    step, pair = hit
    before = len(tok.decode(ids[:step]))
    piece = tok.decode([ids[step]])
    letter = _letter_index(text)
    assert before <= letter < before + len(piece), (text, piece)   # the step holds the letter
    twin = piece.replace("A", "#").replace("B", "A").replace("#", "B")
    a_text, b_text = (piece, twin) if text[letter] == "A" else (twin, piece)
    assert [tok.decode([i]) for i in answer.pairs[pair]] == [a_text, b_text]


def test_issue_example_spaced_letter_is_scored_at_the_spaced_token(qwen):
    tok, answer = qwen
    text = "<think>the rim is smooth</think> <answer> A </answer>"
    assert parse_completion(text).strict
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    assert " A" in pieces and ">A" not in pieces and "A" not in pieces   # the letter is the token " A"
    step, pair = answer.find_decision(ids)
    assert pieces[step] == " A"
    assert answer.pairs[pair] == (tok.token_to_id("ĠA"), tok.token_to_id("ĠB"))   # " A" vs " B" (byte-level names)


def test_qwen2_letter_pairs(qwen):
    tok, answer = qwen
    texts = sorted((tok.decode([a]), tok.decode([b])) for a, b in answer.pairs)
    assert texts == [("\tA", "\tB"), (" A", " B"), (">A", ">B"), ("A", "B")]
    assert answer.merged_ids == (tok.token_to_id(">A"), tok.token_to_id(">B"))
    assert answer.split_ids == (tok.token_to_id("A"), tok.token_to_id("B"))


def test_every_strict_spelling_is_scored_at_its_letter_token(qwen):
    tok, answer = qwen
    n = 0
    for text in strict_spellings():
        assert parse_completion(text).strict, repr(text)
        ids = tok.encode(text)
        _check_decided_at_letter(tok, answer, ids, text)
        # The model need not emit the canonical tokenization: the same text with ">" and the letter as separate
        # tokens ("<answer", ">", "A") is decided at "A" with the "A"/"B" pair.
        merged = [i for i, t in enumerate(ids) if tok.decode([t]) in (">A", ">B")]
        if merged:
            i = merged[0]
            split = ids[:i] + tok.encode(">") + tok.encode(tok.decode([ids[i]])[1:]) + ids[i + 1:]
            assert tok.decode(split) == text
            _check_decided_at_letter(tok, answer, split, text)
        n += 1
    assert n > 1000


def test_non_strict_completions_keep_a_score_position(qwen):
    tok, answer = qwen
    split = answer.letter_pairs[tok.token_to_id("A")]
    merged = answer.letter_pairs[tok.token_to_id(">A")]
    for text in ["<think>x</think> <answer>a</answer>", "<think>x</think> <answer>(A)</answer>",
                 "<think>x</think> <answer>"]:
        assert not parse_completion(text).strict
        ids = tok.encode(text)
        step, pair = answer.find_decision(ids)
        before = tok.decode(ids[:step])   # where the canonical letter would stand
        assert (before.endswith("<answer>") and pair == split) or (before.endswith("<answer") and pair == merged)
    assert answer.find_decision(tok.encode("<think>no verdict yet")) is None


def test_a_strict_letter_without_twin_is_unscorable_not_scored_elsewhere(qwen):
    tok, answer = qwen
    # Pretend " A" had no " B" twin: the strict completion "<answer> A" must not be scored at another step.
    a = tok.token_to_id("ĠA")
    crippled = AnswerTokens(**{**answer.__dict__, "letter_pairs": {k: v for k, v in answer.letter_pairs.items()
                                                                   if k != a}})
    assert crippled.find_decision(tok.encode("<think>x</think> <answer> A </answer>")) == UNSCORABLE


def _tokenizer_without_merges(tmp_path):
    """The tiny byte-level BPE trained on text where ">" never precedes a letter: no ">A"/">B" tokens."""
    from ppiad.models.tiny import task_corpus, train_task_tokenizer
    from ppiad.models.tokenizer import QwenTokenizer

    texts = [t.replace("<answer>A", "<answer> A").replace("<answer>B", "<answer> B") for t in task_corpus()]
    texts = [t.replace(">", "> ") for t in texts]
    path = tmp_path / "tokenizer.json"
    path.write_text(train_task_tokenizer(512, texts).to_str())
    tok = QwenTokenizer.from_pretrained(str(tmp_path))
    assert not tok.has_token(">A") and not tok.has_token(">B")
    return tok


def test_tokenizer_without_merged_letters(tmp_path):
    tok = _tokenizer_without_merges(tmp_path)
    answer = AnswerTokens.from_tokenizer(tok)          # used to raise KeyError from token_to_id(">A")
    assert answer.merged_ids is None
    assert answer.split_ids == (tok.token_to_id("A"), tok.token_to_id("B"))
    for text in ["<think>x</think> <answer>A</answer>", "<think>x</think><answer> B </answer>",
                 "<think>x</think><answer>\nA\n</answer>"]:
        _check_decided_at_letter(tok, answer, tok.encode(text), text)


def test_tiny_model_score_equals_a_full_forward_at_the_letter_token(tiny, monkeypatch):  # noqa: F811
    """End to end in generate(): the spaced spelling's score is P(" A") / (P(" A") + P(" B")) at the " A" step."""
    model, proc = tiny
    tok = proc.tokenizer
    inputs = _inputs(proc)
    end = tok.token_to_id("<|im_end|>")
    spaced = tok.encode("<think>ok</think> <answer>") + [tok.token_to_id("ĠA")] + tok.encode(" </answer>")
    assert tok.decode(spaced) == "<think>ok</think> <answer> A </answer>"
    newline = tok.encode("<think>ok</think> <answer>\n") + [tok.token_to_id("B")] + tok.encode("</answer>")
    _scripted(monkeypatch, [spaced + [end], newline + [end]])
    res = generate(model, inputs, max_new_tokens=40, eos_token_ids=proc.eos_token_ids, tokenizer=tok)
    assert res.forced_score == [False, False]
    at0 = spaced.index(tok.token_to_id("ĠA"))
    at1 = newline.index(tok.token_to_id("B"))
    want = [_expected_score(model, inputs, 0, spaced[:at0], (tok.token_to_id("ĠA"), tok.token_to_id("ĠB"))),
            _expected_score(model, inputs, 1, newline[:at1], (tok.token_to_id("A"), tok.token_to_id("B")))]
    np.testing.assert_allclose(res.answer_scores.numpy(), want, atol=1e-5)
    # ... and not the old reading (A vs B at the step after "<answer>"), which differs on random weights
    old = _expected_score(model, inputs, 0, spaced[:at0], (tok.token_to_id("A"), tok.token_to_id("B")))
    assert not math.isclose(old, want[0], abs_tol=1e-4)


def test_tiny_model_unscorable_strict_letter_gives_nan(tiny, monkeypatch):  # noqa: F811
    model, proc = tiny
    tok = proc.tokenizer
    answer = AnswerTokens.from_tokenizer(tok)
    a = tok.token_to_id("ĠA")
    crippled = AnswerTokens(**{**answer.__dict__, "letter_pairs": {k: v for k, v in answer.letter_pairs.items()
                                                                   if k != a}})
    inputs = _inputs(proc, 1)
    spaced = tok.encode("<think>ok</think> <answer>") + [a] + tok.encode(" </answer>")
    _scripted(monkeypatch, [spaced + [tok.token_to_id("<|im_end|>")]])
    res = generate(model, inputs, max_new_tokens=40, eos_token_ids=proc.eos_token_ids, tokenizer=tok,
                   answer_token_ids=crippled)
    assert res.forced_score == [False] and np.isnan(res.answer_scores.numpy()[0])
