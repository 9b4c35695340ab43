"""How much of a GRPO step's gradient does the answer token carry?

    .venv/bin/python bench/grpo_gradient.py                        # configs/demo.yaml's model, data, top_p
    .venv/bin/python bench/grpo_gradient.py -o grpo.top_p=1.0 --batches 3

The verdict is one token; everything else in a completion (the think text, the tags) is the same for every
image when the policy has learned the format. Rollouts on a training batch (2 defect and 14 normal images,
the demo's 11 %), the demo's rewards and advantages, then the GRPO loss's gradient over the LoRA parameters
three ways: all completion tokens (what the trainer uses), the answer token alone, everything but the answer
token. Prints the norms and cos(all, answer): near 1 means the update is the answer's policy gradient; near
0 means other tokens (e.g. low-probability strays sampled from the vocabulary's tail) swamp it.
The LoRA B matrices start at small random values so that every adapter parameter has a gradient.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import paddle  # noqa: E402

from ppiad.config import load_config  # noqa: E402
from ppiad.data.images import load_image  # noqa: E402
from ppiad.data.registry import build_dataset  # noqa: E402
from ppiad.models.generation import AnswerTokens, completion_logprobs, generate  # noqa: E402
from ppiad.models.lora import apply_lora, lora_layers, lora_parameters  # noqa: E402
from ppiad.models import AutoModel, AutoProcessor  # noqa: E402
from ppiad.rl.grpo import grpo_loss, weighted_advantages  # noqa: E402
from ppiad.rl.trainer import check_grpo_objective  # noqa: E402
from ppiad.rl.rewards import compute_rewards, factors_from_config  # noqa: E402


def gradient(model, params, inputs, res, adv, mask, group_size, normalizer) -> np.ndarray:
    logp = completion_logprobs(model, inputs, res.sequences, res.completion_mask, group_size)
    loss, _ = grpo_loss(logp, None, None, adv, paddle.to_tensor(mask), beta=0.0, normalizer=normalizer)
    loss.backward()
    g = np.concatenate([(p.grad.numpy() if p.grad is not None else np.zeros(p.shape)).ravel() for p in params])
    for p in params:
        p.clear_gradient()
    return g


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("-o", "--opt", nargs="+", action="extend", default=[])
    p.add_argument("--batches", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(args.config, args.opt)
    g = cfg.grpo
    paddle.seed(cfg.seed)
    model = AutoModel.from_pretrained(cfg.model.path)
    processor = AutoProcessor.from_config(cfg)
    apply_lora(model, cfg.lora.r, cfg.lora.alpha, 0.0, cfg.lora.target_modules)
    for layer in lora_layers(model).values():
        layer.lora_B.set_value(paddle.randn(layer.lora_B.shape) * 0.01)
    params = lora_parameters(model)
    answer_tokens = AnswerTokens.from_tokenizer(processor.tokenizer)
    train = build_dataset(cfg.data.train, cfg.data.object_names)
    factors = factors_from_config(cfg.rewards.focal, train)  # as the trainer does
    defects, normals = [s for s in train if s.is_defect], [s for s in train if not s.is_defect]
    rng = random.Random(cfg.seed)
    print(f"model {cfg.model.path}, top_p {g.top_p}, temperature {g.temperature}, G {g.num_generations}")
    for trial in range(args.batches):
        batch = rng.sample(defects, 2) + rng.sample(normals, 14)
        inputs = processor.build_inputs([load_image(s.path) for s in batch], [s.object_name for s in batch])
        model.eval()
        res = generate(model, inputs, num_samples=g.num_generations, max_new_tokens=g.max_new_tokens,
                       do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                       eos_token_ids=processor.eos_token_ids, tokenizer=processor.tokenizer,
                       answer_token_ids=answer_tokens, seed=trial)
        total, per_reward, weights, weighted = compute_rewards(cfg.rewards, res.texts, batch, g.num_generations,
                                                               token_p=res.answer_scores.numpy(),
                                                               class_factors=factors)
        adv = weighted_advantages(total, weights, g.num_generations, check_grpo_objective(g)[0], g.std_eps,
                                  weighted_part=weighted)
        mask = res.completion_mask.numpy()
        answer = np.zeros_like(mask)
        for i, row in enumerate(res.sequences.numpy()):
            found = answer_tokens.find_decision([int(t) for t in row[: int(mask[i].sum())]])
            if found is not None:
                answer[i, found[0]] = 1.0
        model.train()
        n = float(mask.sum())
        full = gradient(model, params, inputs, res, adv, mask, g.num_generations, n)
        ans = gradient(model, params, inputs, res, adv, answer, g.num_generations, n)
        rest = gradient(model, params, inputs, res, adv, mask - answer, g.num_generations, n)
        cos = float(full @ ans / (np.linalg.norm(full) * np.linalg.norm(ans) + 1e-30))
        print(f"batch {trial}: format rate {np.mean(per_reward['format']):.2f}, answer found in "
              f"{int(answer.sum())}/{len(mask)} rows | gradient norm all {np.linalg.norm(full):.2e}, answer "
              f"token {np.linalg.norm(ans):.2e}, other tokens {np.linalg.norm(rest):.2e} | cos(all, answer) "
              f"{cos:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
