#!/usr/bin/env bash
# Issue 30 item 6, one H200, about 8 minutes of device time with model init: Qwen3-30B-A3B at full size (random
# init on the GPU, all 48 layers, 61 GB of bf16 weights), LoRA r=16 on the attention and the experts (router
# frozen), seq 2048.
#  1. bench/moe_kernels.py: two full-size layers, the experts' LoRA through peft (the adapter folded into the whole
#     expert weight per forward) and through grouped GEMMs: step time, memory kept for the backward, same values.
#  2. bench/bench.py: ours (moe_lora_kernel grouped, eager and with compiled layers whose experts stay eager, then
#     peft's) against HF Trainer + PEFT on the same targets
#     (transformers' default experts path; with checkpointing: without it peft keeps a full-size expert weight per
#     layer for the backward, 54 GiB) and with Liger where it applies; MFU on the active parameters (4N active +
#     attention); three profiled steps of the first ours and HF cases.
# JSON under $OUT (or .), rewritten as each case finishes: moe_kernels_h200.json, moe_h200.json.
#   bash bench/moe_h200.sh
#   bash bench/moe_h200.sh --model builtin:tiny-qwen3-moe --seq-len 256 --budget 300     # the cases on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${FTL_PYTHON:-python}"
OUT="${OUT:-.}"
if [ "$#" -eq 0 ]; then
    timeout 120 "$PYTHON" bench/moe_kernels.py --layers 2 --seq-len 2048 --json "$OUT/moe_kernels_h200.json" || true
fi
exec "$PYTHON" bench/bench.py --model random:qwen3-30b-a3b --seq-len 2048 --micro-batch 1 --grad-accum 4 \
    --steps 6 --cases ours-grouped,ours-grouped-compiled,hf-gc,ours,hf-liger \
    --profile ours-grouped,ours-grouped-compiled,hf-gc --budget 420 \
    --case-timeout 240 --json "$OUT/moe_h200.json" "$@"
