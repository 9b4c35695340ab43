"""Reference sampling distributions of transformers 4.51.3's logits warpers, for tests/test_sampling.py.

Runs ONLY in the reference virtualenv (.venv-ref: torch + transformers 4.51.3), as a subprocess:
    python sampling_reference.py SPEC.json OUT.json
SPEC: {"cases": [{"logits": [[float, ...], ...], "temperature", "top_k", "top_p", "min_p"}, ...]}
OUT: {"cases": [{"probs": [[...]], "warpers": [class names in the order applied]}, ...]}
The warpers come from `generate`'s own list builder (`GenerationMixin._get_logits_processor`), so the order is
transformers', not a copy of it.
"""
import json
import sys
from types import SimpleNamespace

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.utils import GenerationMixin


class _Host(GenerationMixin):
    """Just enough of a model for `_get_logits_processor` (decoder-only, no extra processors)."""

    config = SimpleNamespace(is_encoder_decoder=False)


def warpers(case) -> LogitsProcessorList:
    cfg = GenerationConfig(do_sample=True, temperature=case["temperature"], top_k=case["top_k"],
                           top_p=case["top_p"], min_p=case["min_p"] or None)
    cfg._eos_token_tensor = None
    return _Host()._get_logits_processor(cfg, 1, None, None, LogitsProcessorList(), device="cpu", model_kwargs={})


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    out = []
    for case in spec["cases"]:
        lp = warpers(case)
        logits = torch.tensor(case["logits"], dtype=torch.float32)
        scores = lp(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits)
        out.append({"probs": scores.softmax(-1).tolist(), "warpers": [type(w).__name__ for w in lp]})
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"cases": out}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
