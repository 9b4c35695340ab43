import os
import re

import pytest

from ppiad.prompt import (OPTIONS, PROMPT_TEMPLATE, ParsedCompletion, answer_for_label, build_prompt,
                          format_reward_ok, parse_completion)
from tests.conftest import SHARED

# A literal copy of DESIGN.md section 1 "Prompt", so the check also runs in a user's clone.
EXPECTED_TEMPLATE = (
    "This is an image containing a {object}. Analyze the given image and determine if there is any defect in "
    "the object.\n"
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.\n"
    "Options: (A) defect (B) normal.\n"
    "The output answer format should be as follows:\n"
    "<think></think> <answer>A or B</answer>\n"
    "Please strictly follow the format."
)


def test_template_matches_literal_copy():
    assert PROMPT_TEMPLATE == EXPECTED_TEMPLATE
    assert len(PROMPT_TEMPLATE.split("\n")) == 6
    assert not PROMPT_TEMPLATE.endswith("\n")


def test_template_matches_design_md():
    path = os.path.join(SHARED, "DESIGN.md")
    if not os.path.exists(path):
        pytest.skip("DESIGN.md from ../shared is absent (user's clone); the literal copy is checked above")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"\*\*Prompt\.\*\*.*?```\n(.*?)\n\s*```", text, re.DOTALL)
    assert m, "DESIGN.md has no prompt block"
    lines = [line.strip() for line in m.group(1).split("\n")]
    assert "\n".join(lines) == PROMPT_TEMPLATE


def test_build_prompt():
    p = build_prompt("pill")
    assert p.startswith("This is an image containing a pill. Analyze")
    assert "{object}" not in p
    assert build_prompt("printed circuit board").count("printed circuit board") == 1
    # braces in a name are text, not format fields
    assert "{x}" in build_prompt("odd {x} name")
    with pytest.raises(ValueError):
        build_prompt("  ")


def test_options_and_labels():
    assert OPTIONS == {"A": "defect", "B": "normal"}
    assert answer_for_label("defect") == "A"
    assert answer_for_label("normal") == "B"
    with pytest.raises(ValueError, match="label"):
        answer_for_label("good")


@pytest.mark.parametrize("text, answer, think", [
    ("<think>The pill has a crack.</think> <answer>A</answer>", "A", "The pill has a crack."),
    ("<think>looks fine</think><answer>B</answer>", "B", "looks fine"),
    ("  \n<think>\nmulti\nline\n</think>\n\n<answer>B</answer>\n ", "B", "multi\nline"),
    ("<think></think> <answer>A</answer>", "A", ""),                 # empty think is allowed
    ("<think>x</think> <answer> A </answer>", "A", "x"),             # whitespace inside answer tags
    ("<think>x</think>\t<answer>\nB\n</answer>", "B", "x"),
])
def test_strict_good(text, answer, think):
    p = parse_completion(text)
    assert p == ParsedCompletion(think=think, answer=answer, strict=True, lenient_answer=answer)
    assert format_reward_ok(text)


@pytest.mark.parametrize("text, lenient", [
    ("", None),                                                          # empty string
    ("<think>the surface shows a defect", None),                         # truncated in the reasoning
    ("<think>ok</think> <answer>A", "A"),                                # truncated: no closing tag
    ("<think>a<think>b</think>c</think> <answer>A</answer>", "A"),       # nested think
    ("<think>x</think> <answer>A</answer><answer>B</answer>", "B"),      # repeated answer: last one
    ("<think>x</think> <answer>A</answer> <answer>A</answer>", "A"),
    ("<think>x</think> <answer>a</answer>", "A"),                        # lower-case letter
    ("<think>x</think> <answer>A</answer> I hope this helps.", "A"),     # extra text after the answer
    ("<think>x</think> <answer>C</answer>", None),                       # not an option
    ("<think>x</think> <answer>A or B</answer>", None),                  # the template copied
    ("<think>x</think> <answer>(B)</answer>", "B"),
    ("<think>x</think> <answer>(B) normal</answer>", "B"),
    ("<think>x</think> <answer>defect</answer>", "A"),
    ("<think>x</think> <answer>Normal</answer>", "B"),
    ("<think>x</think> <answer>no defect found</answer>", "B"),
    ("<think>x</think> <answer>not defective, normal</answer>", "B"),
    ("<think>x</think> <answer></answer>", None),
    ("<think>x</think><think>y</think><answer>A</answer>", "A"),         # two think blocks
    ("<THINK>x</THINK> <ANSWER>A</ANSWER>", "A"),                        # upper-case tags: no tags at all
    ("<think>x</think> The answer is B.", "B"),                          # no answer tag
    ("<think>x</think> Answer: A pill with a scratch", None),            # article "A", no option word
    ("A pill with no defect.", "B"),                                     # article "A" is not an option
    ("The answer is (A).", "A"),
    ("x</think> <answer>A</answer>", "A"),                               # missing opening think tag
    ("<think>x</think> answer>A</answer>", "A"),
    ("<answer>B</answer>", "B"),                                         # no think block
    ("<think>x</think> <answer>AB</answer>", None),
])
def test_not_strict(text, lenient):
    p = parse_completion(text)
    assert not p.strict
    assert p.answer is None
    assert p.lenient_answer == lenient
    assert not format_reward_ok(text)


def test_think_of_non_strict():
    assert parse_completion("<think> why </think> <answer>C</answer>").think == "why"
    assert parse_completion("no tags").think is None


def test_frozen_and_type_checked():
    p = parse_completion("<think>x</think> <answer>A</answer>")
    with pytest.raises(Exception):
        p.answer = "B"
    with pytest.raises(TypeError):
        parse_completion(None)
