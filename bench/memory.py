"""Per-process training memory, measured on CPU and predicted by `ppiad.utils.memory.estimate`.

For each sharding mode (none / stage1 / stage2 / stage3; stages 2 and 3 by CPU emulation,
PPIAD_EMULATE_SHARDING_ON_CPU=1) x recompute off/on, two processes (`paddle.distributed.launch`, gloo) train a
random-weight stand-in of the tiny or medium size for 2 GRPO steps (G=4, 1 prompt per process, 2 micro-batches,
beta 0.04, 24 new tokens, every rollout decoded to full length). After step 2 each process reports the bytes it holds between steps (parameters,
gradients, optimizer state; Paddle's own tensors, not the Python process) and the peak of Paddle's host
allocator during step 2 (`host_memory_stat_peak_value`); the table shows the larger of the two processes'
figures (stage 2 gives them different shares of the adapters) with the estimator's figure beside each.

    .venv/bin/python bench/memory.py                 # tiny and medium, all modes (~3 min on 2 cores)
    .venv/bin/python bench/memory.py --sizes tiny --modes stage3
    .venv/bin/python bench/memory.py --plan [--attn sdpa]   # docs/models.md: estimates for Qwen2-VL-2B/7B on GPUs
    .venv/bin/python bench/memory.py --coefficients         # re-measure the estimator's activation coefficients
CPU emulation of Paddle's sharding classes: evidence of ppiad's logic and of the estimator, not of GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SIZES = {
    "tiny": {},   # tiny_model_config's defaults: hidden 64, 2 layers, vision 32 x 2
    "medium": {"hidden_size": 512, "layers": 4, "heads": 8, "kv_heads": 2, "intermediate_size": 1536,
               "vision_depth": 2, "vision_embed_dim": 128, "vision_heads": 4},
}
SEGMENT = 4096          # stage 3 segment size for these small models (elements)
MAX_NEW_TOKENS = 24


def _overrides(model_dir, data_dir, out_dir, mode, recompute):
    return [f"model.path={model_dir}", f"data.train.root={data_dir}", f"output_dir={out_dir}",
            f"run_name={mode}_{int(recompute)}", "train.max_steps=2", "train.save_every=100",
            "train.prompts_per_device=1", "train.grad_accum_steps=2", "grpo.num_generations=4",
            f"grpo.max_new_tokens={MAX_NEW_TOKENS}", "grpo.beta=0.04", "model.min_pixels=3136",
            "model.max_pixels=3136", f"distributed.sharding={mode}",
            f"distributed.stage3_segment_size={SEGMENT}", f"train.recompute={str(bool(recompute)).lower()}"]


def _worker(args) -> None:
    import paddle
    from paddle.base import core

    import ppiad.models.generation as generation
    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer
    from ppiad.utils import memory

    cfg = load_config(None, _overrides(args.model, args.data, args.out, args.mode, args.recompute))
    # every rollout decodes MAX_NEW_TOKENS tokens: no stop token (the figures then do not depend on sampling)
    real_generate = generation.generate
    generation.generate = lambda *a, **k: real_generate(*a, **{**k, "eos_token_ids": [-1]})
    probe = {}

    class Probe(GRPOTrainer):
        def _sample(self, step, micro, batch, draw=0):
            if micro == 0 and draw == 0:
                core.host_memory_stat_reset_peak_value("Allocated", 0)
                probe["start"] = core.host_memory_stat_current_value("Allocated", 0)
            res = super()._sample(step, micro, batch, draw)
            probe["prompt_tokens"] = int(res["inputs"]["input_ids"].shape[1])
            return res

        def _update(self, buffer):
            out = super()._update(buffer)
            probe["peak"] = core.host_memory_stat_peak_value("Allocated", 0)
            probe.update(memory.measure(self.core, self.wrapped, self.optimizer))
            return out

    tr = Probe(cfg)
    tr.train()
    est = memory.estimate(cfg, paddle.distributed.get_world_size(), prompt_tokens=probe["prompt_tokens"],
                          completion_tokens=MAX_NEW_TOKENS)
    probe["estimate"] = est
    with open(os.path.join(args.out, f"rank{paddle.distributed.get_rank()}.json"), "w") as f:
        json.dump(probe, f)


def _assets(root: str, size: str) -> tuple[str, str]:
    from ppiad.data.synthetic import generate_synthetic
    from ppiad.models.tiny import build_tiny_checkpoint

    model = os.path.join(root, f"model_{size}")
    if not os.path.isfile(os.path.join(model, "model.safetensors")):
        build_tiny_checkpoint(model, seed=0, **SIZES[size])
    data = os.path.join(root, "data")
    if not os.path.isdir(data):
        generate_synthetic(data, num_images=16, defect_ratio=0.25, size=56, seed=0)
    return model, data


def _run(root, size, mode, recompute) -> list[dict]:
    model, data = _assets(root, size)
    out = tempfile.mkdtemp(dir=root, prefix=f"{size}_{mode}_{recompute}_")
    env = dict(os.environ, PYTHONPATH=ROOT, PPIAD_EMULATE_SHARDING_ON_CPU="1")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           os.path.join(out, "log"), os.path.abspath(__file__), "--worker", "--model", model, "--data", data,
           "--out", out, "--mode", mode, "--recompute", str(recompute)]
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        logs = "".join(open(os.path.join(out, "log", f), errors="replace").read()[-3000:]
                       for f in sorted(os.listdir(os.path.join(out, "log"))))
        raise RuntimeError(f"{size} {mode} recompute={recompute} failed:\n{proc.stderr[-2000:]}\n{logs}")
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]


FIELDS = ("params", "grads", "optimizer", "peak")
CARDS = (24, 48, 80)     # GB
HEADROOM = 0.9           # a plan fits a card when its peak is at most 90 % of it (CUDA context, fragmentation)


def plan(attn: str = "eager") -> None:
    """docs/models.md's tables: estimated peak GB per GPU for Qwen2-VL-2B/7B, bf16, LoRA r 4 on q/v, G 4,
    1 prompt per GPU, 1,024-token prompts (512 image tokens of a 401,408-pixel image), 256 new tokens."""
    from ppiad.config import load_config
    from ppiad.utils.memory import estimate, qwen2_vl_config

    for name in ("2B", "7B"):
        mc = qwen2_vl_config(name)
        print(f"\nQwen2-VL-{name}, attention {attn}: estimated step peak per GPU, GB (smallest card it fits, "
              f"{int(HEADROOM * 100)} % rule)\n")
        print("| sharding | recompute | 1 GPU | 2 GPUs | 4 GPUs | 8 GPUs |")
        print("| --- | --- | --- | --- | --- | --- |")
        for mode in ("none", "stage1", "stage2", "stage3"):
            for rc in (False, True):
                cells = []
                for n in (1, 2, 4, 8):
                    cfg = load_config(None, ["model.dtype=bfloat16", f"model.attn_implementation={attn}",
                                             f"distributed.sharding={mode}", f"train.recompute={str(rc).lower()}",
                                             "grpo.num_generations=4", "grpo.max_new_tokens=256",
                                             "model.max_prompt_length=1024", "model.max_pixels=401408",
                                             "train.prompts_per_device=1"])
                    gb = estimate(cfg, n, model_config=mc, prompt_tokens=1024, gpu=True)["peak"] / 1e9
                    card = next((f"{c}" for c in CARDS if gb <= HEADROOM * c), "-")
                    cells.append(f"{gb:.1f} ({card})")
                print(f"| {mode} | {'on' if rc else 'off'} | " + " | ".join(cells) + " |")


def coefficients() -> None:
    """Re-measure the estimator's per-element activation coefficients (ppiad.utils.memory.PER_*): Paddle's
    allocator growth over a teacher-forced policy forward with gradient (completion_logprobs, LoRA r 4 on q/v,
    1 prompt x G 4, fp32, one process) at 5 prompt/completion lengths for the tiny and medium stand-ins, fitted by
    least squares to L x sum over the two passes (prompt; completions on its cache) of per-layer hidden, MLP,
    attention-score and key/value element counts, plus the logits."""
    import numpy as np
    import paddle
    from paddle.base import core

    from ppiad.models.generation import completion_logprobs
    from ppiad.models.lora import apply_lora
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    root = os.path.join(ROOT, "output", "bench_memory")
    os.makedirs(root, exist_ok=True)
    rows, ys = [], []
    for size in ("tiny", "medium"):
        model_dir, _ = _assets(root, size)
        m = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
        apply_lora(m, 4, 16, 0.1)
        m.train()
        mc = m.config
        for p_len, c_len in ((64, 16), (131, 24), (256, 24), (131, 64), (400, 48)):
            rng = np.random.default_rng(0)
            inputs = {"input_ids": paddle.to_tensor(rng.integers(10, 200, size=(1, p_len))),
                      "attention_mask": paddle.ones([1, p_len], dtype="int64")}
            seqs = paddle.to_tensor(rng.integers(10, 200, size=(4, c_len)))
            before = core.host_memory_stat_current_value("Allocated", 0)
            logp = completion_logprobs(m, inputs, seqs, paddle.ones([4, c_len]), 4)
            ys.append(core.host_memory_stat_current_value("Allocated", 0) - before)
            del logp
            passes = ((1, p_len, p_len), (4, c_len, p_len + c_len))
            L = mc.num_hidden_layers
            rows.append([4 * L * sum(r * t * mc.hidden_size for r, t, _ in passes),
                         4 * L * sum(r * t * mc.intermediate_size for r, t, _ in passes),
                         4 * L * sum(r * mc.num_attention_heads * t * k for r, t, k in passes),
                         4 * L * sum(r * mc.num_key_value_heads * k * mc.head_dim for r, t, k in passes),
                         4 * 4 * c_len * mc.vocab_size])
    x, y = np.array(rows, float), np.array(ys, float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    names = ("PER_HIDDEN", "PER_INTERMEDIATE", "PER_SCORE", "PER_KV", "PER_LOGIT")
    print(", ".join(f"{n} {c:.2f}" for n, c in zip(names, coef)))
    print(f"max relative error of the fit: {np.max(np.abs(x @ coef - y) / y):.2%} over {len(y)} forwards")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model"), ap.add_argument("--data"), ap.add_argument("--out")
    ap.add_argument("--mode"), ap.add_argument("--recompute", type=int, default=0)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=sorted(SIZES))
    ap.add_argument("--modes", nargs="+", default=["none", "stage1", "stage2", "stage3"])
    ap.add_argument("--workdir", default=os.path.join(ROOT, "output", "bench_memory"))
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--plan", action="store_true", help="print the estimated GPU plan for Qwen2-VL-2B/7B instead")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="attention for --plan")
    ap.add_argument("--coefficients", action="store_true", help="re-measure the estimator's activation coefficients")
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.coefficients:
        coefficients()
        return
    if args.plan:
        plan(args.attn)
        return
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    print("| size | sharding | recompute | params MB | grads MB | optimizer MB | step peak MB | worst error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        for mode in args.modes:
            for rc in (0, 1):
                ranks = _run(args.workdir, size, mode, rc)
                r = {k: max(x[k] for x in ranks) for k in FIELDS}   # the larger process
                est = ranks[0]["estimate"]
                cells, worst = [], 0.0
                for k in FIELDS:
                    err = (est[k] - r[k]) / r[k] if r[k] else 0.0
                    worst = max(worst, abs(err))
                    cells.append(f"{r[k] / 2 ** 20:.3f} (est {est[k] / 2 ** 20:.3f})")
                print(f"| {size} | {mode} | {'on' if rc else 'off'} | " + " | ".join(cells) + f" | {worst:.1%} |",
                      flush=True)
                rows.append({"size": size, "sharding": mode, "recompute": bool(rc), "measured": ranks,
                             "worst_error": worst})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
