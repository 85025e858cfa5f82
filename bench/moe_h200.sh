#!/usr/bin/env bash
# Issue 30 item 6: Qwen3-30B-A3B at full size (random init on the GPU, all 48 layers, 61 GB of bf16 weights), LoRA
# r=16 on the attention and the experts (router frozen), seq 2048, on one H200: ours (moe_lora_kernel grouped, and
# peft's kernel) against HF Trainer + PEFT on the same targets (transformers' default experts path, with
# checkpointing: without it peft's full-size expert weight per layer is kept for the backward, 58 GB), and with
# Liger where it applies. MFU on the active parameters (4N active + attention); three profiled steps of the first
# ours and HF cases. One JSON, rewritten as each case finishes: $OUT/moe_h200.json (or ./moe_h200.json).
#   bash bench/moe_h200.sh                         # about 7 minutes of device time, model init included
#   bash bench/moe_h200.sh --model builtin:tiny-qwen3-moe --seq-len 256 --budget 300     # the same on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${FTL_PYTHON:-python}"
exec "$PYTHON" bench/bench.py --model random:qwen3-30b-a3b --seq-len 2048 --micro-batch 1 --grad-accum 4 \
    --steps 6 --cases ours-grouped,hf-gc,ours,hf-liger --profile ours-grouped,hf-gc --budget 450 \
    --case-timeout 240 --json "${OUT:-.}/moe_h200.json" "$@"
