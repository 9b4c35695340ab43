"""Format-only warm start of the tiny stand-in model.

A random tiny model cannot write `<think>...</think> <answer>X</answer>` on its own, so GRPO would see no
format reward and no answers to compare. The warm start teaches the format and nothing else: the think text
is generic (it never mentions what the image shows) and the answer is drawn at random, independent of the
image. Whatever discrimination the model shows afterwards was learned by GRPO.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import paddle

from ppiad.data.images import load_image
from ppiad.data.sample import Sample

# One short generic sentence: it carries nothing about the verdict, and being the same for every image it is
# learned to near certainty, so GRPO's rollouts keep the format and the policy gradient is carried by the
# answer token. Short, because every think token is paid for in each rollout and update. (With three openers
# x three bodies drawn at random, ~15% of temperature-1 rollouts broke the format and their low-probability
# tokens swamped the answer's gradient; docs/results.md.)
THINK_TEXT = "I look for defects."


def format_only_completion(object_name: str, rng: random.Random) -> str:
    """One warm-start target: the generic reasoning and an answer drawn at random (A or B, 50/50). The object
    is named in the prompt already; the think text does not repeat it."""
    return f"<think>{THINK_TEXT}</think> <answer>{rng.choice('AB')}</answer>"


def warm_start(model, processor, samples: Sequence[Sample], *, steps: int, batch_size: int = 8,
               learning_rate: float = 1e-3, seed: int = 0, log=print, references=None) -> list[float]:
    """Supervised training on format-only targets (all weights of the tiny model); returns the losses.
    `references`: a ppiad.data.references.ReferencePool to warm-start on k-shot prompts (None = 0-shot)."""
    from ppiad.models.generation import completion_logprobs

    rng = random.Random(seed)
    paddle.seed(seed)
    model.train()
    params = [p for p in model.parameters() if not p.stop_gradient]
    optimizer = paddle.optimizer.AdamW(learning_rate=learning_rate, parameters=params, weight_decay=0.0)
    eos = processor.eos_token_ids[0]
    pad = processor.tokenizer.pad_token_id
    losses = []
    for step in range(steps):
        batch = [samples[rng.randrange(len(samples))] for _ in range(batch_size)]
        refs = None if references is None else [[load_image(p) for p in references.draw(s)] for s in batch]
        inputs = processor.build_inputs([load_image(s.path) for s in batch], [s.object_name for s in batch],
                                        references=refs)
        targets = [processor.tokenizer.encode(format_only_completion(s.object_name, rng)) + [eos] for s in batch]
        width = max(len(t) for t in targets)
        ids = np.full((len(batch), width), pad, dtype="int64")
        mask = np.zeros((len(batch), width), dtype="float32")
        for i, t in enumerate(targets):
            ids[i, : len(t)] = t
            mask[i, : len(t)] = 1.0
        mask_t = paddle.to_tensor(mask)
        logp = completion_logprobs(model, inputs, paddle.to_tensor(ids), mask_t, num_samples=1)
        loss = -(logp * mask_t).sum() / mask_t.sum()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"warm start step {step + 1}/{steps}: loss {np.mean(losses[-10:]):.3f}")
    model.eval()
    return losses
