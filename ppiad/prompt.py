"""The LR-IAD prompt protocol: the prompt text, the option letters, and how a completion is read.

Two readings of a completion, kept apart on purpose:

* **Strict** (`ParsedCompletion.strict`, `.answer`, `format_reward_ok`): the whole completion, leading and
  trailing whitespace aside, is exactly

      <think>REASONING</think> <answer>X</answer>

  - REASONING may be empty (the prompt's own example is `<think></think>`) and may span lines, but must not
    contain another `<think>`, `</think>`, `<answer>` or `</answer>` tag (nested or repeated blocks fail);
  - any whitespace (or none) may sit between `</think>` and `<answer>`;
  - X is exactly `A` or `B`, upper case; whitespace around it inside the tags is allowed
    (`<answer> A </answer>`), anything else is not (`a`, `(A)`, `A or B`, `C`, `A. defect`);
  - tags are lower case; nothing may follow `</answer>`.
  This is the format reward and the verdict used for rewards and for the reported metrics:
  a non-strict completion counts as an invalid answer.

* **Lenient** (`ParsedCompletion.lenient_answer`): a best-effort guess of what the model meant, used only to
  report *why* answers were invalid (e.g. "right letter, wrong format"); never for rewards or metrics.
  1. The region read is the content of the last `<answer>` block (up to `</answer>`, or to the end if the
     closing tag is missing). Without an `<answer>` tag: the text after the last `</think>`; if a `<think>`
     was opened and never closed (truncated reasoning), there is no answer (None); with no tags at all, the
     whole text.
  2. Option letters decide first: `(A)`/`(B)` in any case, a region that is a single letter in any case
     (`a`, ` B. `), or an upper-case `A`/`B` standing alone (not the article "A" before a lower-case word).
  3. Only when no letter is found, words decide: "defect(s/ive)", "anomaly/anomalous", "abnormal" mean A;
     "normal" and negated defects ("no defect", "not defective", "without any anomaly") mean B.
  4. If the hits disagree (e.g. "A or B"), the answer is None.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

OPTIONS = {"A": "defect", "B": "normal"}

PROMPT_TEMPLATE = "\n".join([
    "This is an image containing a {object}. Analyze the given image and determine if there is any defect "
    "in the object.",
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags.",
    "Options: (A) defect (B) normal.",
    "The output answer format should be as follows:",
    "<think></think> <answer>A or B</answer>",
    "Please strictly follow the format.",
])


# The object name when the user gives none and the config names no single category: generic, still fluent
# ("This is an image containing a product.").
DEFAULT_OBJECT = "product"


def object_phrase(name: str, object_names: dict | None = None) -> str:
    """The prompt's object name for a category or folder name: `object_names` (cfg.data.object_names) may map
    it to a longer phrase; otherwise underscores read as spaces ("metal_nut" -> "metal nut")."""
    names = object_names or {}
    return str(names.get(name, name.replace("_", " ")))


def default_object(categories, object_names: dict | None = None) -> str:
    """The object name when none is given: the one category of cfg.data.eval.categories, else DEFAULT_OBJECT."""
    return object_phrase(categories[0], object_names) if len(categories or []) == 1 else DEFAULT_OBJECT


# k-shot (issue 17): the sentence put before f(o) when the user turn holds k normal reference images before
# the query image. k = 0 leaves the prompt exactly f(o).
REFERENCE_SENTENCE = ("The first {k} {images} {show} a normal {object} without any defect, for reference; "
                      "the last image is the one to inspect.")


def build_prompt(object_name: str, reference_images: int = 0) -> str:
    """The user-turn text for one image of `object_name` (e.g. "pill", "printed circuit board").

    `reference_images` = k >= 0 normal reference images placed before the query image in the same turn: for
    k > 0 the text is REFERENCE_SENTENCE, a newline, then f(o) (docs/method.md); k = 0 gives f(o) alone.
    Raises ValueError for an empty object name or a negative / non-integer k."""
    if not isinstance(object_name, str) or not object_name.strip():
        raise ValueError(f"object_name must be a non-empty string, got {object_name!r}")
    if isinstance(reference_images, bool) or not isinstance(reference_images, int) or reference_images < 0:
        raise ValueError(f"reference_images must be an integer >= 0, got {reference_images!r}")
    name = object_name.strip()
    # str.replace, not str.format: the template has no other braces today, but an object name must never
    # be able to inject format fields.
    text = PROMPT_TEMPLATE.replace("{object}", name)
    if reference_images == 0:
        return text
    k = reference_images
    intro = (REFERENCE_SENTENCE.replace("{k}", str(k)).replace("{images}", "image" if k == 1 else "images")
             .replace("{show}", "shows" if k == 1 else "show").replace("{object}", name))
    if k == 1:
        intro = intro.replace("The first 1 image", "The first image")
    return intro + "\n" + text


def answer_for_label(label: str) -> str:
    """The correct option letter for a dataset label: "defect" -> "A", "normal" -> "B"."""
    for letter, name in OPTIONS.items():
        if label == name:
            return letter
    raise ValueError(f"label must be one of {sorted(OPTIONS.values())}, got {label!r}")


@dataclass(frozen=True)
class ParsedCompletion:
    think: Optional[str]            # reasoning text of the first closed <think> block (stripped), else None
    answer: Optional[str]           # "A" / "B" when strict, else None
    strict: bool                    # the completion follows the required format exactly
    lenient_answer: Optional[str]   # best-effort "A" / "B" for reporting only (see module docstring)


_TAG = r"</?(?:think|answer)>"
_STRICT = re.compile(
    r"\s*<think>((?:(?!" + _TAG + r").)*)</think>\s*<answer>\s*([AB])\s*</answer>\s*",
    re.DOTALL,
)
_FIRST_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_LETTER_PAREN = re.compile(r"\(\s*([ab])\s*\)", re.IGNORECASE)
_LETTER_ONLY = re.compile(r"[\W_]*([ab])[\W_]*", re.IGNORECASE)
# An upper-case A/B not glued to a word, and not the article "A" in "A pill": it must be followed by the end,
# punctuation, an upper-case word or "or"/"and" (as in "A or B").
_LETTER_BARE = re.compile(r"(?<![\w(])([AB])(?!\w)(?=\s*(?:\Z|[^\w\s]|[A-Z]|(?:or|and)\b))")
_NEGATED_DEFECT = re.compile(
    r"\b(?:no|not|without|free of|free from)\s+(?:any\s+|obvious\s+|visible\s+)?"
    r"(?:defect(?:s|ive)?|anomal(?:y|ies|ous))\b",
    re.IGNORECASE,
)
_DEFECT_WORD = re.compile(r"\b(?:defect(?:s|ive)?|anomal(?:y|ies|ous)|abnormal)\b", re.IGNORECASE)
_NORMAL_WORD = re.compile(r"\bnormal\b", re.IGNORECASE)


def _answer_region(text: str) -> Optional[str]:
    start = text.rfind("<answer>")
    if start >= 0:
        region = text[start + len("<answer>"):]
        end = region.find("</answer>")
        return region if end < 0 else region[:end]
    close = text.rfind("</think>")
    if close >= 0:
        return text[close + len("</think>"):]
    if "<think>" in text:
        return None  # reasoning was cut off before any verdict
    return text


def _single(hits: set) -> Optional[str]:
    return next(iter(hits)) if len(hits) == 1 else None


def _lenient_answer(text: str) -> Optional[str]:
    region = _answer_region(text)
    if region is None:
        return None
    only = _LETTER_ONLY.fullmatch(region)
    if only:
        return only.group(1).upper()
    letters = {m.group(1).upper() for m in _LETTER_PAREN.finditer(region)}
    letters |= {m.group(1) for m in _LETTER_BARE.finditer(region)}
    if letters:
        return _single(letters)
    words = set()
    if _NEGATED_DEFECT.search(region):
        words.add("B")
    if _DEFECT_WORD.search(_NEGATED_DEFECT.sub(" ", region)):
        words.add("A")
    if _NORMAL_WORD.search(region):
        words.add("B")
    return _single(words)


def parse_completion(text: str) -> ParsedCompletion:
    """Read a completion strictly (for rewards and metrics) and leniently (for reporting only)."""
    if not isinstance(text, str):
        raise TypeError(f"completion must be a string, got {type(text).__name__}")
    m = _STRICT.fullmatch(text)
    if m:
        return ParsedCompletion(think=m.group(1).strip(), answer=m.group(2), strict=True,
                                lenient_answer=m.group(2))
    first = _FIRST_THINK.search(text)
    think = first.group(1).strip() if first else None
    return ParsedCompletion(think=think, answer=None, strict=False, lenient_answer=_lenient_answer(text))


def format_reward_ok(text: str) -> bool:
    """The format reward's test: does the completion follow the required format exactly?"""
    return parse_completion(text).strict
