"""Reference half of bench/generate.py: transformers 4.51.3 (torch, CPU) greedy generation timing.

Runs ONLY in the reference virtualenv (.venv-ref), started by bench/generate.py as a subprocess:
    python bench/ref_generate.py MODEL_DIR INPUTS.npz NEW_TOKENS REPEATS
Loads the HF-format checkpoint ppiad wrote, the exact processor outputs ppiad used, generates NEW_TOKENS
greedy tokens without stopping (the same work as ppiad's side) and prints one JSON line: best total seconds,
per-step decode seconds of the best run, and the generated tokens (to check both sides agree).
"""
import json
import os
import sys
import time

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2VLForConditionalGeneration


class StepClock(LogitsProcessor):
    """Called once per generated token: the gaps between calls are the per-step decode times."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def main():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model_dir, inputs_path, new_tokens, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    data = np.load(inputs_path)
    inputs = {k: torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    best, best_steps, tokens = None, None, None
    for run in range(repeats + 1):  # run 0 warms up and is not counted
        clock = StepClock()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        total = time.perf_counter() - start
        if run > 0 and (best is None or total < best):
            best, best_steps = total, np.diff(clock.stamps).tolist()
            tokens = out[:, inputs["input_ids"].shape[1]:].numpy().tolist()
    print(json.dumps({"seconds": best, "step_seconds": best_steps, "tokens": tokens,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    sys.exit(main())
