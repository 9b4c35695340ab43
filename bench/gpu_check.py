"""GPU end-to-end check of the LR-IAD training path (run by bench/gpu_check.sh; UNTESTED here: no GPU).

Worker (under `paddle.distributed.launch`): trains `--steps` GRPO steps with the given overrides and writes
this rank's peak GPU memory (`paddle.device.cuda.max_memory_allocated`) and the adapter sha256 to
<out>/<run>/gpu_rank<r>.json. `--table OUT RUN...` prints the summary table of the runs named."""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def worker(argv: list[str]) -> None:
    import time

    import paddle

    from ppiad.config import load_config
    from ppiad.rl.trainer import GRPOTrainer

    if not (paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0):
        raise SystemExit("gpu_check: no GPU visible to Paddle (install the GPU wheel, see README)")
    cfg = load_config(None, argv)
    t0 = time.time()
    summary = GRPOTrainer(cfg).train()
    rank = paddle.distributed.get_rank()
    out = {"rank": rank, "step": summary["step"], "adapter_sha256": summary["adapter_sha256"],
           "peak_gb": paddle.device.cuda.max_memory_allocated() / 1e9, "seconds": time.time() - t0,
           "loss": summary["metrics"].get("loss"), "grad_norm": summary["metrics"].get("grad_norm")}
    with open(os.path.join(summary["run_dir"], f"gpu_rank{rank}.json"), "w") as f:
        json.dump(out, f)


def table(out_dir: str, runs: list[str]) -> int:
    print("| run | GPUs | steps | seconds | peak GB per GPU | last loss | adapter sha256 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    digests = {}
    for run in runs:
        d = os.path.join(out_dir, run)
        ranks = sorted(f for f in os.listdir(d) if f.startswith("gpu_rank"))
        rows = [json.load(open(os.path.join(d, f))) for f in ranks]
        digests[run] = {r["adapter_sha256"] for r in rows}
        peaks = ", ".join(f"{r['peak_gb']:.1f}" for r in rows)
        print(f"| {run} | {len(rows)} | {rows[0]['step']} | {max(r['seconds'] for r in rows):.0f} | {peaks} | "
              f"{rows[0]['loss']:.4f} | {rows[0]['adapter_sha256'][:16]} |")
    ok = all(len(v) == 1 for v in digests.values())
    print(f"\nranks agree on the adapters: {'yes' if ok else 'NO'}")
    if len(runs) >= 2:
        same = digests[runs[0]] == digests[runs[1]]
        print(f"resumed run ends with the same adapters as the straight run: {'yes' if same else 'NO'}")
        ok = ok and same
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        sys.exit(table(sys.argv[2], sys.argv[3:]))
    worker(sys.argv[1:])
