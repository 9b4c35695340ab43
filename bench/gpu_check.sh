#!/usr/bin/env bash
# GPU end-to-end check of LR-IAD training (UNTESTED here: the development machines have no GPU).
#
#   bash bench/gpu_check.sh /path/to/Qwen2-VL-2B-Instruct [GPUS, default: all visible]
#
# On a local Qwen2-VL-2B checkpoint and a small synthetic dataset: bf16, sharding stage 3 (when several GPUs)
# with recompute, 5 GRPO steps (64 new tokens, G 4), a checkpoint at step 4; then a second run resumed from
# that checkpoint that must end with the same adapters (exact resume of one step). Prints one table: peak GPU
# memory per GPU, time, loss, adapter hashes. About 5-10 minutes on 1 or 4 GPUs. Exit code 0 = all checks hold.
set -euo pipefail
MODEL=${1:?usage: bash bench/gpu_check.sh MODEL_DIR [GPUS]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
if [ -n "${2:-}" ]; then GPUS=$2; else
  N=$($PY -c "import paddle; print(paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0)")
  [ "$N" -ge 1 ] || { echo "gpu_check: no GPU visible to Paddle"; exit 2; }
  GPUS=$(seq -s, 0 $((N - 1)))
fi
NGPU=$(echo "$GPUS" | tr ',' '\n' | wc -l)
SHARDING=none; [ "$NGPU" -gt 1 ] && SHARDING=stage3
WORK=${WORK:-$ROOT/output/gpu_check}
mkdir -p "$WORK"
[ -d "$WORK/data" ] || $PY "$ROOT/tools/prepare_data.py" synth --out "$WORK/data" --num_images $((16 * NGPU)) --size 224
COMMON=(model.path="$MODEL" model.dtype=bfloat16 data.train.root="$WORK/data" output_dir="$WORK"
        distributed.sharding=$SHARDING train.recompute=true train.max_steps=5 train.save_every=4
        train.prompts_per_device=1 train.grad_accum_steps=2 grpo.num_generations=4 grpo.max_new_tokens=64
        grpo.beta=0.04 model.max_pixels=200704)
rm -rf "$WORK/straight" "$WORK/resumed"
$PY -m paddle.distributed.launch --gpus "$GPUS" --log_dir "$WORK/log_straight" "$ROOT/bench/gpu_check.py" \
    "${COMMON[@]}" run_name=straight
$PY -m paddle.distributed.launch --gpus "$GPUS" --log_dir "$WORK/log_resumed" "$ROOT/bench/gpu_check.py" \
    "${COMMON[@]}" run_name=resumed train.resume="$WORK/straight/checkpoints/step_000004"
echo
echo "sharding=$SHARDING, $NGPU GPU(s), bf16, recompute on"
$PY "$ROOT/bench/gpu_check.py" --table "$WORK" straight resumed
