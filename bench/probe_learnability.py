"""How learnable is the demo's task for the tiny stand-in? Two diagnostics that bound what GRPO can reach.

    .venv/bin/python bench/probe_learnability.py features     # linear probe on the frozen vision features
    .venv/bin/python bench/probe_learnability.py answer --steps 150 [--targets q_proj v_proj]
    .venv/bin/python bench/probe_learnability.py policy --steps 200 [--balanced] [--no-class-weights]

`features`: mean/max/min/std-pooled image embeddings of the warm-started model (model.path), a balanced
logistic regression fitted on the training tree, AUROC on the held-out tree: is the defect information in the
random vision tower's output at all?
`answer`: supervised training of the answer token alone (binary cross-entropy on logit(A) - logit(B) after a
fixed think text) through LoRA with the demo's targets, on class-balanced batches of 8, then held-out AUROC
of P(A): the best case for the image path, with every label known and no sampling noise. GRPO sees the
same path with sampled answers and the natural 11% defect rate.
`policy`: the policy gradient on the answer token alone, as GRPO would give it without any think text: per
image G = 4 answers sampled from P(A), scored by the trainer's rewards and advantages (`compute_rewards`,
`weighted_advantages`; with the default config: focal class weights x (2(1 - share right))^2), 16
natural-ratio images a step (`--balanced`: 8 half-defect; `--no-class-weights`: format + accuracy rewards,
plain group advantages). Between `answer` and the trainer.
Both use configs/demo.yaml's data and model (run `make demo` first, or anything that prepares them).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import paddle  # noqa: E402

from ppiad.config import load_config  # noqa: E402
from ppiad.data.images import load_image  # noqa: E402
from ppiad.data.registry import build_dataset  # noqa: E402
from ppiad.demo.warmstart import THINK_TEXT  # noqa: E402
from ppiad.eval.metrics import roc_auc  # noqa: E402
from ppiad.models import AutoModel, AutoProcessor  # noqa: E402


def pooled_features(model, processor, samples, batch=50) -> np.ndarray:
    out = []
    for i in range(0, len(samples), batch):
        b = samples[i:i + batch]
        inputs = processor.build_inputs([load_image(s.path) for s in b], [s.object_name for s in b])
        with paddle.no_grad():
            e = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"]).numpy()
        e = e.reshape(len(b), -1, e.shape[-1])
        out.append(np.concatenate([e.mean(1), e.max(1), e.min(1), e.std(1)], axis=1))
    return np.concatenate(out)


def probe_features(cfg, model, processor, train, test) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_tr, x_te = pooled_features(model, processor, train), pooled_features(model, processor, test)
    y_tr = np.array([s.is_defect for s in train])
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced").fit(scaler.transform(x_tr), y_tr)
    scores = clf.decision_function(scaler.transform(x_te))
    print(f"linear probe on pooled vision features ({x_tr.shape[1]} dims, {cfg.model.max_pixels} px): "
          f"held-out AUROC {100 * roc_auc(np.array([s.is_defect for s in test], dtype=float), scores):.1f}")


def answer_logits(model, processor, samples, think: str):
    """logit(A) - logit(B) at the answer position after a fixed completion prefix."""
    from ppiad.models.generation import completion_logprobs

    tok = processor.tokenizer
    seq_a, seq_b = tok.encode(think + "<answer>A"), tok.encode(think + "<answer>B")
    inputs = processor.build_inputs([load_image(s.path) for s in samples], [s.object_name for s in samples])
    n = len(samples)
    mask = paddle.zeros([n, len(seq_a)])
    mask[:, -1] = 1.0
    lp_a = completion_logprobs(model, inputs, paddle.to_tensor([seq_a] * n, dtype="int64"), mask, 1)[:, -1]
    lp_b = completion_logprobs(model, inputs, paddle.to_tensor([seq_b] * n, dtype="int64"), mask, 1)[:, -1]
    return lp_a - lp_b


def held_out(model, processor, test, think: str) -> str:
    """Held-out AUROC and mean of P(A) (two-way, after the fixed think text), as a log fragment."""
    model.eval()
    with paddle.no_grad():
        scores = np.concatenate([answer_logits(model, processor, test[i:i + 32], think).numpy()
                                 for i in range(0, len(test), 32)])
    model.train()
    auroc = roc_auc(np.array([s.is_defect for s in test], dtype=float), scores)
    return f"held-out AUROC {100 * auroc:.1f}, mean P(A) {np.mean(1 / (1 + np.exp(-scores))):.2f}"


def probe_answer(cfg, model, processor, train, test, steps: int, lr: float, targets) -> None:
    from ppiad.models.lora import apply_lora, lora_parameters

    apply_lora(model, cfg.lora.r, cfg.lora.alpha, 0.0, targets)
    optimizer = paddle.optimizer.AdamW(learning_rate=lr, parameters=lora_parameters(model), weight_decay=0.0)
    defects, normals = [s for s in train if s.is_defect], [s for s in train if not s.is_defect]
    rng = random.Random(cfg.seed)
    think = f"<think>{THINK_TEXT}</think> "  # the demo warm start's fixed think
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = [rng.choice(defects) for _ in range(4)] + [rng.choice(normals) for _ in range(4)]
        y = paddle.to_tensor([1.0] * 4 + [0.0] * 4)
        loss = paddle.nn.functional.binary_cross_entropy_with_logits(answer_logits(model, processor, batch, think), y)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        if step % 25 == 0 or step == steps:
            print(f"step {step} ({8 * step} labelled images, {4 * step} defects): "
                  f"{held_out(model, processor, test, think)}   ({time.perf_counter() - t0:.0f} s)", flush=True)


def probe_policy(cfg, model, processor, train, test, steps: int, lr: float, targets, balanced: bool,
                 class_weights: bool, group: int = 4) -> None:
    import copy

    from ppiad.models.lora import apply_lora, lora_parameters
    from ppiad.rl.grpo import weighted_advantages
    from ppiad.rl.rewards import compute_rewards, factors_from_config
    from ppiad.rl.trainer import check_grpo_objective

    apply_lora(model, cfg.lora.r, cfg.lora.alpha, 0.0, targets)
    optimizer = paddle.optimizer.AdamW(learning_rate=lr, parameters=lora_parameters(model), weight_decay=0.0)
    defects, normals = [s for s in train if s.is_defect], [s for s in train if not s.is_defect]
    rewards_cfg = copy.deepcopy(cfg.rewards)
    if not class_weights:  # correctness alone: plain group advantages
        rewards_cfg["focal_weight"], rewards_cfg["accuracy_weight"] = 0.0, 1.0
    factors = factors_from_config(cfg.rewards.focal, train)  # as the trainer does
    rng, sampler = random.Random(cfg.seed), np.random.default_rng(cfg.seed)
    think = f"<think>{THINK_TEXT}</think> "  # the demo warm start's fixed think
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if balanced:
            batch = [rng.choice(defects) for _ in range(4)] + [rng.choice(normals) for _ in range(4)]
        else:
            batch = [train[rng.randrange(len(train))] for _ in range(16)]
        d = answer_logits(model, processor, batch, think)
        p_a = 1.0 / (1.0 + np.exp(-d.numpy()))
        said_a = (sampler.random((len(batch), group)) < p_a[:, None]).astype(float)
        # The trainer's own rewards and advantages, on the completions these answers stand for.
        texts = [f"{think}<answer>{'A' if a else 'B'}</answer>" for a in said_a.reshape(-1)]
        total, _, weights, weighted = compute_rewards(rewards_cfg, texts, batch, group,
                                                      token_p=np.repeat(p_a, group), class_factors=factors)
        adv = weighted_advantages(total, weights, group, check_grpo_objective(cfg.grpo)[0], cfg.grpo.std_eps,
                                  weighted_part=weighted).reshape(len(batch), group)
        weight_a = paddle.to_tensor((adv * said_a).sum(1), dtype="float32")
        weight_b = paddle.to_tensor((adv * (1 - said_a)).sum(1), dtype="float32")
        log_sig = paddle.nn.functional.log_sigmoid
        loss = -(weight_a * log_sig(d) + weight_b * log_sig(-d)).sum() / (len(batch) * group)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        if step % 25 == 0 or step == steps:
            print(f"step {step}: {held_out(model, processor, test, think)}   ({time.perf_counter() - t0:.0f} s)",
                  flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=["features", "answer", "policy"])
    p.add_argument("-c", "--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("-o", "--opt", nargs="+", action="extend", default=[])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--targets", nargs="+", default=None, help="LoRA targets (default: the config's)")
    p.add_argument("--balanced", action="store_true", help="policy: balanced batches of 8")
    p.add_argument("--no-class-weights", dest="class_weights", action="store_false",
                   help="policy: plain group advantages, no focal class weights")
    args = p.parse_args()
    cfg = load_config(args.config, args.opt)
    model = AutoModel.from_pretrained(cfg.model.path)
    processor = AutoProcessor.from_config(cfg)
    model.eval()
    train = build_dataset(cfg.data.train, cfg.data.object_names)
    test = build_dataset(cfg.data.eval, cfg.data.object_names)
    if args.probe == "features":
        probe_features(cfg, model, processor, train, test)
    elif args.probe == "answer":
        probe_answer(cfg, model, processor, train, test, args.steps, args.lr, args.targets or cfg.lora.target_modules)
    else:
        probe_policy(cfg, model, processor, train, test, args.steps, args.lr, args.targets or cfg.lora.target_modules,
                     args.balanced, args.class_weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
