"""Reference half of bench/real_dims.py: transformers 4.51.3 (torch, CPU). Runs ONLY in the reference virtualenv.

    python bench/ref_real_dims.py build DIR            # random bf16 weights for DIR/config.json, sharded
    python bench/ref_real_dims.py run DIR INPUTS.npz NEW_TOKENS PHASES

`build` creates `Qwen2VLForConditionalGeneration` from DIR/config.json with transformers' own random
initialisation (seed 0) in bfloat16 and writes it with `save_pretrained` (sharded safetensors, as on the hub).
`run` times the phases named in PHASES (comma-separated: load, prefill, decode1, decode4, grpo) on the inputs
ppiad's processor produced, printing one JSON line per phase (the layout bench/real_dims.py reads).
Threads: torch's default (its intra-op pool = the physical cores) unless the caller's environment says otherwise.
"""
import json
import os
import sys
import time

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2VLConfig, Qwen2VLForConditionalGeneration


def status_mb(field):
    """A memory line of /proc/self/status in MB: VmRSS (now) or VmHWM (this program's peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))


def emit(phase, **fields):
    fields.update(phase=phase, peak_rss_mb=status_mb("VmHWM:"), rss_mb=status_mb("VmRSS:"))
    print(json.dumps(fields), flush=True)


def build(directory):
    cfg = Qwen2VLConfig.from_pretrained(directory)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    start = time.perf_counter()
    model = Qwen2VLForConditionalGeneration(cfg)
    model.save_pretrained(directory, max_shard_size="4GB", safe_serialization=True)
    emit("build", seconds=time.perf_counter() - start, params=sum(p.numel() for p in model.parameters()))


class StepClock(LogitsProcessor):
    """Called once per generated token: the gaps between calls are the decode step times."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def matmul_gflops(m=586, k=1536, n=8960, repeats=5):
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * m * k * n / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rows(inputs, n):
    """The one-prompt inputs repeated for n rows (pixel values and grids once per row)."""
    return {k: v.repeat(n, 1) for k, v in inputs.items()}


class LoRALinear(torch.nn.Module):
    """y = base(x) + dropout(x) A^T B^T * alpha / r (Hu et al. 2021); B starts at zero as in PEFT."""

    def __init__(self, base, r=4, alpha=16, dropout=0.1):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.drop = torch.nn.Dropout(dropout)
        self.scale = alpha / r
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + (self.drop(x) @ self.lora_A.T @ self.lora_B.T) * self.scale
        return y


def token_logprobs(model, full, attention_mask, inputs, t_prompt):
    """log p of each completion token, one full forward over prompt + completion (as TRL's GRPO does)."""
    out = model(input_ids=full, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"])
    logits = out.logits[:, t_prompt - 1:-1].float()
    return torch.gather(logits.log_softmax(-1), -1, full[:, t_prompt:].unsqueeze(-1))[..., 0]


def run(directory, inputs_path, new_tokens, phases):
    emit("threads", threads=torch.get_num_threads(), matmul_gflops=matmul_gflops())
    start = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(directory, torch_dtype=torch.float32).eval()
    emit("load", seconds=time.perf_counter() - start)
    data = np.load(inputs_path)
    inputs = {k: torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    t_prompt = inputs["input_ids"].shape[1]
    if "prefill" in phases:
        for run_index in range(2):
            with torch.no_grad():
                t0 = time.perf_counter()
                model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
                t1 = time.perf_counter()
                model(**inputs, use_cache=True)
                t2 = time.perf_counter()
            emit("prefill", run=run_index, vision_seconds=t1 - t0, forward_seconds=t2 - t1,
                 decoder_seconds=(t2 - t1) - (t1 - t0))
    for name, n in (("decode1", 1), ("decode4", 4)):
        if name not in phases:
            continue
        batch = rows(inputs, n)
        clock = StepClock()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        total = time.perf_counter() - start
        steps = np.diff(clock.stamps)
        emit(name, rows=n, seconds=total, decode_step_seconds=steps.tolist(),
             tokens=out[:, t_prompt:].numpy().tolist())
    if "grpo" in phases:
        grpo_step(model, inputs, new_tokens, t_prompt)


def grpo_step(model, inputs, new_tokens, t_prompt, g=4):
    """One GRPO step as a transformers user writes it: rollout with generate(), reference and policy log-probs
    by full forwards over prompt + completion (one row at a time, so memory stays at one row's activations),
    clipped surrogate + k3 KL, AdamW on the LoRA parameters (q_proj, v_proj; r 4, alpha 16, dropout 0.1)."""
    for layer in model.model.layers:
        layer.self_attn.q_proj = LoRALinear(layer.self_attn.q_proj)
        layer.self_attn.v_proj = LoRALinear(layer.self_attn.v_proj)
    for p in model.parameters():
        p.requires_grad_(False)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    params = [p for m in loras for p in (m.lora_A, m.lora_B)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch = rows(inputs, g)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        full = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                              temperature=1.0, top_p=1.0, top_k=0, eos_token_id=None, pad_token_id=0)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(full[:, t_prompt:])], 1)
    rewards = torch.rand(g)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    t1 = time.perf_counter()
    ref = []
    with torch.no_grad():
        for m in loras:
            m.enabled = False
        for i in range(g):
            ref.append(token_logprobs(model, full[i:i + 1], mask[i:i + 1], inputs, t_prompt))
        for m in loras:
            m.enabled = True
    t2 = time.perf_counter()
    model.train()
    for i in range(g):
        logp = token_logprobs(model, full[i:i + 1], mask[i:i + 1], inputs, t_prompt)
        ratio = torch.exp(logp - logp.detach())
        surrogate = torch.minimum(ratio * adv[i], torch.clamp(ratio, 0.8, 1.2) * adv[i])
        kl = torch.exp(ref[i] - logp) - (ref[i] - logp) - 1
        loss = -(surrogate - 0.04 * kl).mean() / g
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    model.eval()
    t3 = time.perf_counter()
    emit("grpo", rollout_seconds=t1 - t0, reference_seconds=t2 - t1, update_seconds=t3 - t2, seconds=t3 - t0)


def main():
    if sys.argv[1] == "build":
        build(sys.argv[2])
    elif sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5].split(","))
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}: build or run")


if __name__ == "__main__":
    main()
