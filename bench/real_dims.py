"""ppiad vs transformers 4.51.3 at Qwen2-VL-2B-Instruct's real dimensions, side by side, on this CPU.

    .venv/bin/python bench/real_dims.py [--cache output/bench] [--new-tokens 64] [--phases load,prefill,decode1,decode4,grpo]
                                        [--sides ppiad,ref] [--lock FILE] [--load-rounds 3]

1. Builds once (cached under --cache, outside git) a random checkpoint with Qwen2-VL-2B-Instruct's real
   dimensions (config.json below: 28 decoder layers of width 1536, a 32-block vision tower of width 1280,
   151,936-token vocabulary, tied embeddings; 2.2 B parameters): transformers' own initialisation in
   bfloat16, `save_pretrained` sharded safetensors (bench/ref_real_dims.py build, run in .venv-ref), the real
   Qwen2 tokenizer from ../shared/assets/qwen2-tokenizer, the hub's preprocessor settings and ppiad's chat
   template.
2. Builds one prompt: a synthetic 900 x 900 image at max_pixels 401,408 (ppiad's default) with the task
   prompt, through ppiad's processor; both sides get the same arrays.
3. Runs each side in its own process, one after the other (each holds a ~9 GB float32 model; with --lock
   each process runs under `flock FILE`), with default settings: no thread or MKL variable is set here. Per
   side: load time (from_pretrained of the folder) and peak RSS while loading; the prefill (vision tower +
   decoder over the prompt; best of 2); greedy decoding of NEW_TOKENS tokens for 1 row and for G = 4 rows of
   the same prompt (decode tokens/s from the per-step times; transformers repeats the prompt 4 times, ppiad
   shares one prefill); one GRPO step with the paper's LoRA (q_proj, v_proj; r 4, alpha 16, dropout 0.1):
   rollout of G = 4 sampled completions, reference log-probs (adapters off), policy update (forward +
   backward + AdamW). Peak RSS per side. Then --load-rounds (default 3) more load-only processes per side,
   alternating the sides: one load moves by up to 2x with this VM's page-fault cost and with which process ran
   before it, so the load row is the median over all of a side's processes (each figure is printed too).
4. The physical limit of each phase: its FLOPs (counted from the config, below) over the fp32 matmul rate
   each side measures in its own process ([586 x 1536] x [1536 x 8960]); for decode steps also the time to
   stream the decoder and LM-head weights once per step at the memory read rate measured here (a decode step
   at small batch is bound by that, not by FLOPs).
Also printed: the time to read the checkpoint files from the page cache (the loading target is <= 2x that).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHILD_ENV = dict(os.environ)  # the user's environment as it was: nothing ppiad sets on import leaks into the sides
sys.path.insert(0, ROOT)

REF_PYTHON = os.environ.get("PPIAD_REF_PYTHON", os.path.join(ROOT, ".venv-ref", "bin", "python"))
TOKENIZER_DIR = os.path.join(os.path.dirname(ROOT), "shared", "assets", "qwen2-tokenizer")
BUILD_VERSION = 1  # bump when the recipe below changes, so a stale cache is rebuilt

# Qwen2-VL-2B-Instruct's config.json (Hugging Face hub), dimensions and token ids unchanged.
CONFIG_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
HUB_PREPROCESSOR = dict(min_pixels=3136, max_pixels=12845056)  # the hub's preprocessor_config.json
MAX_PIXELS = 401408
MATMUL = (586, 1536, 8960)


# ---------------------------------------------------------------------------------------------------------
# checkpoint
# ---------------------------------------------------------------------------------------------------------
def ensure_checkpoint(cache: str, lock: str | None) -> str:
    directory = os.path.join(cache, "qwen2_vl_2b_dims")
    marker = os.path.join(directory, ".complete")
    if os.path.isfile(marker) and open(marker).read().strip() == str(BUILD_VERSION):
        return directory
    for path in (os.path.join(TOKENIZER_DIR, "tokenizer.json"), REF_PYTHON):
        if not os.path.exists(path):
            sys.exit(f"needed to build the checkpoint but missing: {path}")
    work = directory + ".partial"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    with open(os.path.join(work, "config.json"), "w") as f:
        json.dump(CONFIG_2B, f, indent=2)
    print(f"building the 2B-dimension checkpoint in {directory} (once; a few minutes) ...", flush=True)
    run_child([REF_PYTHON, os.path.join(HERE, "ref_real_dims.py"), "build", work], lock)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), work)
    from ppiad.models.processor import DEFAULT_TEMPLATE_FILE, ImageProcessor

    with open(os.path.join(work, "preprocessor_config.json"), "w") as f:
        json.dump(ImageProcessor(**HUB_PREPROCESSOR).to_config(), f, indent=2)
    with open(DEFAULT_TEMPLATE_FILE, encoding="utf-8") as f:
        template = f.read()
    with open(os.path.join(work, "chat_template.json"), "w") as f:
        json.dump({"chat_template": template}, f)
    with open(os.path.join(work, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}, f)
    with open(os.path.join(work, ".complete"), "w") as f:
        f.write(str(BUILD_VERSION))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(work, directory)
    return directory


def make_inputs(model_dir: str, path: str) -> dict:
    """A synthetic 900 x 900 part photo (smooth shading, a texture, a dark scratch) -> ppiad's processor."""
    from PIL import Image

    from ppiad.models.processor import Qwen2VLProcessor

    yy, xx = np.mgrid[0:900, 0:900].astype(np.float32)
    rng = np.random.default_rng(0)
    base = 150 + 40 * np.sin(xx / 60.0) * np.cos(yy / 80.0) + rng.normal(0, 6, (900, 900))
    base[(np.abs(yy - 0.8 * xx - 100) < 3) & (xx > 300) & (xx < 600)] = 40
    img = Image.fromarray(np.clip(np.stack([base, base * 0.95, base * 0.9], -1), 0, 255).astype(np.uint8))
    proc = Qwen2VLProcessor.from_pretrained(model_dir, max_pixels=MAX_PIXELS)
    inputs = proc.build_inputs([img], ["metal plate"], return_tensors="np")
    np.savez(path, **inputs)
    return inputs


def page_cache_read_seconds(model_dir: str) -> tuple[float, int]:
    """Seconds to read every safetensors file once from the page cache (read twice, the second timed)."""
    files = [os.path.join(model_dir, f) for f in sorted(os.listdir(model_dir)) if f.endswith(".safetensors")]
    buf = bytearray(64 << 20)
    best, total = float("inf"), 0
    for _ in range(2):
        start, total = time.perf_counter(), 0
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    total += n
        best = min(best, time.perf_counter() - start)
    return best, total


def memory_read_gbs(n_bytes: int = 1 << 30) -> float:
    """GB/s of one pass reading a large float32 array (sum), best of 3: the rate that bounds a decode step."""
    a = np.ones(n_bytes // 4, np.float32)
    best = min(_timed(lambda: a.sum()) for _ in range(3))
    return n_bytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# FLOPs (multiply-adds x 2), from the config; attention counted in full (causal masking saves nothing here)
# ---------------------------------------------------------------------------------------------------------
def flops(cfg: dict, n_patches: int, t_prompt: int, new_tokens: int, g: int) -> dict:
    v = cfg["vision_config"]
    e, hid, vocab, n_layers = v["embed_dim"], cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    patch_in = v["in_chans"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    n_merged = n_patches // v["spatial_merge_size"] ** 2
    merged_dim = e * v["spatial_merge_size"] ** 2
    vision = (2 * n_patches * patch_in * e
              + v["depth"] * (2 * n_patches * (4 * e * e + 2 * v["mlp_ratio"] * e * e) + 4 * n_patches ** 2 * e)
              + 2 * n_merged * merged_dim * (merged_dim + hid))
    kv = hid // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_token_linear = n_layers * 2 * (2 * hid * hid + 2 * hid * kv + 3 * hid * cfg["intermediate_size"])

    def decoder(tokens, context):  # `tokens` new tokens attending to `context` keys each (summed over rows)
        return tokens * per_token_linear + n_layers * 4 * tokens * context * hid

    prefill = decoder(t_prompt, t_prompt) + 2 * hid * vocab
    mid = t_prompt + new_tokens // 2

    def decode(rows):
        return rows * (new_tokens - 1) * (per_token_linear + n_layers * 4 * mid * hid + 2 * hid * vocab)

    completion = decoder(g * new_tokens, mid) + g * new_tokens * 2 * hid * vocab  # teacher-forced, all logits
    teacher = prefill + completion  # one prompt pass shared by the G rows (ppiad's way; the least work)
    return {"vision": vision, "prefill_decoder": prefill, "prefill": vision + prefill, "decode1": decode(1),
            "decode4": decode(g), "rollout": vision + prefill + decode(g), "reference": teacher,
            "update": 2 * teacher,  # backward of frozen weights: input gradients only, ~1x the forward
            "decode_weight_bytes": 4 * (per_token_linear // 2 + hid * vocab)}


# ---------------------------------------------------------------------------------------------------------
# the ppiad side (run in its own process)
# ---------------------------------------------------------------------------------------------------------
def status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB: VmRSS (now) or VmHWM (this program's peak; unlike ru_maxrss
    it does not include the parent's memory inherited through fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))


def emit(phase, **fields):
    fields.update(phase=phase, peak_rss_mb=status_mb("VmHWM:"), rss_mb=status_mb("VmRSS:"))
    print(json.dumps(fields), flush=True)


def ppiad_side(model_dir: str, inputs_path: str, new_tokens: int, phases: list[str]) -> None:
    from ppiad.utils import threads  # first: ppiad's thread default must be in place before Paddle loads

    import paddle

    from ppiad.models.generation import completion_logprobs, generate
    from ppiad.models.lora import adapters_disabled, apply_lora, lora_parameters
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.rl.grpo import grpo_loss

    m, k, n = MATMUL
    a, b = paddle.randn([m, k]), paddle.randn([k, n])
    paddle.matmul(a, b).numpy()
    best = min(_timed(lambda: paddle.matmul(a, b).numpy()) for _ in range(5))
    emit("threads", threads=threads.math_library_threads().get("mkl"), matmul_gflops=2 * m * k * n / best / 1e9)
    del a, b
    start = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    emit("load", seconds=time.perf_counter() - start)
    data = np.load(inputs_path)
    inputs = {key: paddle.to_tensor(data[key]) for key in ("input_ids", "attention_mask", "pixel_values",
                                                           "image_grid_thw")}
    if "prefill" in phases:
        for run_index in range(2):
            with paddle.no_grad():
                t0 = time.perf_counter()
                embeds = model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])
                embeds.numpy()
                t1 = time.perf_counter()
                pos, _ = model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            image_embeds=embeds, image_grid_thw=inputs["image_grid_thw"], position_ids=pos,
                            use_cache=True, logits_to_keep=1)
                out.logits.numpy()
                t2 = time.perf_counter()
            del out, embeds
            emit("prefill", run=run_index, vision_seconds=t1 - t0, decoder_seconds=t2 - t1,
                 forward_seconds=t2 - t0)
    for name, g in (("decode1", 1), ("decode4", 4)):
        if name not in phases:
            continue
        stamps = []
        hook = model.model.register_forward_pre_hook(lambda layer, args: stamps.append(time.perf_counter()))
        start = time.perf_counter()
        res = generate(model, inputs, num_samples=g, max_new_tokens=new_tokens, eos_token_ids=[-1], pad_token_id=0)
        total = time.perf_counter() - start
        hook.remove()
        emit(name, rows=g, seconds=total, decode_step_seconds=np.diff(stamps[1:]).tolist(),
             tokens=res.sequences.numpy().tolist())
        del res
    if "grpo" in phases:
        g = 4
        apply_lora(model, r=4, alpha=16, dropout=0.1, target_modules=("q_proj", "v_proj"))
        params = lora_parameters(model)
        opt = paddle.optimizer.AdamW(learning_rate=1e-5, parameters=params,
                                     grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
        t0 = time.perf_counter()
        res = generate(model, inputs, num_samples=g, max_new_tokens=new_tokens, do_sample=True, eos_token_ids=[-1],
                       pad_token_id=0, seed=0)
        rng = np.random.default_rng(0)
        rewards = rng.random(g)
        adv = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-4)
        t1 = time.perf_counter()
        with paddle.no_grad(), adapters_disabled(model):
            ref = completion_logprobs(model, inputs, res.sequences, res.completion_mask, g, res.image_embeds)
        t2 = time.perf_counter()
        model.train()
        logp = completion_logprobs(model, inputs, res.sequences, res.completion_mask, g, res.image_embeds)
        loss, _ = grpo_loss(logp, None, ref, adv.astype(np.float32), res.completion_mask, epsilon=0.2, beta=0.04)
        loss.backward()
        opt.step()
        opt.clear_grad()
        model.eval()
        t3 = time.perf_counter()
        emit("grpo", rollout_seconds=t1 - t0, reference_seconds=t2 - t1, update_seconds=t3 - t2, seconds=t3 - t0)


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def run_child(cmd: list[str], lock: str | None) -> list[dict]:
    if lock:
        cmd = ["flock", lock] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=CHILD_ENV, text=True, cwd=ROOT)
    rows = []
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()
                     if k not in ("tokens", "decode_step_seconds")}
            print("   ", json.dumps(shown), flush=True)
    if proc.wait() != 0:
        print(f"    (process exited with {proc.returncode}: {' '.join(cmd[-6:])})", flush=True)
    return rows


def summarise(side: list[dict]) -> dict:
    by = {}
    for r in side:
        by.setdefault(r["phase"], []).append(r)
    out = {"threads": by["threads"][0]["threads"], "gflops": by["threads"][0]["matmul_gflops"]}
    if "load" in by:
        out["load"] = by["load"][0]["seconds"]
        out["load_all"] = [by["load"][0]["seconds"]]
        out["load_peak_mb"] = by["load"][0]["peak_rss_mb"]
        out["model_rss_mb"] = by["load"][0]["rss_mb"]
    if "prefill" in by:
        best = min(by["prefill"], key=lambda r: r["forward_seconds"])
        out.update(prefill=best["forward_seconds"], vision=best["vision_seconds"], decoder=best["decoder_seconds"])
    for name in ("decode1", "decode4"):
        if name in by:
            r = by[name][0]
            steps = np.asarray(r["decode_step_seconds"])
            out[name] = r["rows"] * len(steps) / steps.sum()
            out[name + "_step_ms"] = (1000 * steps[:8].mean(), 1000 * steps[-8:].mean())
            out[name + "_tokens"] = r["tokens"]
    if "grpo" in by:
        r = by["grpo"][0]
        out.update(rollout=r["rollout_seconds"], reference=r["reference_seconds"], update=r["update_seconds"],
                   grpo=r["seconds"])
    out["peak_mb"] = max(r["peak_rss_mb"] for r in side)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=os.path.join(ROOT, "output", "bench"), help="checkpoint cache folder")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--phases", default="load,prefill,decode1,decode4,grpo")
    ap.add_argument("--sides", default="ppiad,ref")
    ap.add_argument("--lock", help="run each heavy process under `flock LOCK` (shared machines)")
    ap.add_argument("--load-rounds", type=int, default=3,
                    help="extra load-only processes per side, alternating sides; the load row is the median of all "
                         "(one load moves by 2x with the VM's page-fault cost and which side ran before)")
    ap.add_argument("--side-ppiad", nargs=2, metavar=("MODEL_DIR", "INPUTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    phases = args.phases.split(",")
    if args.side_ppiad:
        ppiad_side(args.side_ppiad[0], args.side_ppiad[1], args.new_tokens, phases)
        return 0
    model_dir = ensure_checkpoint(args.cache, args.lock)
    inputs_path = os.path.join(args.cache, "real_dims_inputs.npz")
    inputs = make_inputs(model_dir, inputs_path)
    t_prompt, n_patches = inputs["input_ids"].shape[1], inputs["pixel_values"].shape[0]
    read_s, n_bytes = page_cache_read_seconds(model_dir)
    mem_gbs = memory_read_gbs()
    print(f"prompt: {t_prompt} tokens ({n_patches} patches, grid {inputs['image_grid_thw'][0].tolist()}); "
          f"checkpoint {n_bytes / 1e9:.2f} GB read from the page cache in {read_s:.2f} s; memory read "
          f"{mem_gbs:.1f} GB/s", flush=True)
    def command(side, phases):
        if side == "ppiad":
            return [sys.executable, os.path.abspath(__file__), "--side-ppiad", model_dir, inputs_path,
                    "--new-tokens", str(args.new_tokens), "--phases", phases]
        if side == "ref":
            return [REF_PYTHON, os.path.join(HERE, "ref_real_dims.py"), "run", model_dir, inputs_path,
                    str(args.new_tokens), phases]
        sys.exit(f"unknown side {side!r}: ppiad or ref")

    results = {}
    sides = args.sides.split(",")
    for side in sides:
        print(f"{side}:", flush=True)
        rows = run_child(command(side, args.phases), args.lock)
        if rows:
            results[side] = summarise(rows)
    if "load" in phases and args.load_rounds > 0:
        print(f"load only, {args.load_rounds} rounds alternating the sides:", flush=True)
        for _ in range(args.load_rounds):
            for side in dict.fromkeys(sides):
                print(f"{side}:", flush=True)
                loads = [r["seconds"] for r in run_child(command(side, "load"), args.lock) if r["phase"] == "load"]
                if side in results and "load" in results[side]:
                    results[side]["load_all"] += loads
        for side in results:
            if "load_all" in results[side]:
                results[side]["load"] = float(np.median(results[side]["load_all"]))
    report(results, flops(CONFIG_2B, n_patches, t_prompt, args.new_tokens, 4), read_s, mem_gbs, args.new_tokens)
    return 0


def report(results: dict, fl: dict, read_s: float, mem_gbs: float, new_tokens: int) -> None:
    sides = [s for s in ("ppiad", "ref") if s in results]
    names = {"ppiad": "ppiad (Paddle)", "ref": "transformers 4.51.3"}
    print()
    print("| phase | " + " | ".join(f"{names[s]} | limit ({names[s].split()[0]})" for s in sides)
          + (" | ppiad / transformers |" if len(sides) == 2 else " |"))
    print("| --- " * (1 + 2 * len(sides) + (len(sides) == 2)) + "|")

    def limit(side, phase):
        return fl[phase] / (results[side]["gflops"] * 1e9)

    def decode_limit(side, phase, rows):
        per_step_flops = fl[phase] / (new_tokens - 1)
        step = max(per_step_flops / (results[side]["gflops"] * 1e9), fl["decode_weight_bytes"] / (mem_gbs * 1e9))
        return rows / step

    lines = [("threads (math library)", "threads", None, "{:.0f}", None),
             ("matmul GFLOP/s (fp32, 586x1536x8960)", "gflops", None, "{:.0f}", None),
             ("load s (median)", "load", None, "{:.1f}", "lower"),
             ("peak RSS while loading MB", "load_peak_mb", None, "{:.0f}", "lower"),
             ("prefill s (vision + decoder)", "prefill", "prefill", "{:.1f}", "lower"),
             ("  vision tower s", "vision", "vision", "{:.1f}", "lower"),
             ("  decoder s", "decoder", "prefill_decoder", "{:.1f}", "lower"),
             ("decode tok/s, 1 row", "decode1", ("decode1", 1), "{:.2f}", "higher"),
             ("decode tok/s, G=4 rows", "decode4", ("decode4", 4), "{:.2f}", "higher"),
             ("GRPO step s", "grpo", None, "{:.1f}", "lower"),
             ("  rollout s", "rollout", "rollout", "{:.1f}", "lower"),
             ("  reference s", "reference", "reference", "{:.1f}", "lower"),
             ("  update s", "update", "update", "{:.1f}", "lower"),
             ("peak RSS MB", "peak_mb", None, "{:.0f}", "lower")]
    for label, key, lim, fmt, better in lines:
        cells = []
        for s in sides:
            v = results[s].get(key)
            cells.append(fmt.format(v) if v is not None else "n/a")
            if lim is None:
                cells.append("")
            elif isinstance(lim, tuple):
                cells.append(fmt.format(decode_limit(s, *lim)))
            else:
                cells.append(fmt.format(limit(s, lim)))
        ratio = ""
        if len(sides) == 2 and better and results["ppiad"].get(key) and results["ref"].get(key):
            p, r = results["ppiad"][key], results["ref"][key]
            ratio = f"{(r / p if better == 'lower' else p / r):.2f}x"
        print(f"| {label} | " + " | ".join(cells) + (f" | {ratio} |" if len(sides) == 2 else " |"))
    print(f"\nChecking files from the page cache: {read_s:.2f} s (the load target is <= 2x). Ratio column: "
          f"> 1 = ppiad better. Limits: FLOPs / that side's matmul rate; decode limits also the weight "
          f"stream ({fl['decode_weight_bytes'] / 1e9:.1f} GB per step at {mem_gbs:.1f} GB/s).")
    for s in sides:
        if len(results[s].get("load_all", [])) > 1:
            print(f"load s, every process in order ({s}): " + ", ".join(f"{v:.2f}" for v in results[s]["load_all"]))
    for key in ("decode1", "decode4"):
        if all(results[s].get(key + "_tokens") for s in sides) and len(sides) == 2:
            same = np.mean(np.array(results["ppiad"][key + "_tokens"]) == np.array(results["ref"][key + "_tokens"]))
            print(f"{key}: greedy tokens equal on both sides: {same:.0%}; step ms first 8 -> last 8: "
                  + "; ".join(f"{s} {results[s][key + '_step_ms'][0]:.0f} -> {results[s][key + '_step_ms'][1]:.0f}"
                              for s in sides))


if __name__ == "__main__":
    sys.exit(main())
