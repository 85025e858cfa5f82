#!/usr/bin/env bash
# The embedded defaults of the vision-language and diffusion recipes (LoRA and QLoRA) through the real launchers on
# whatever GPUs this machine has (a smoke run, not a benchmark). Each case gets LIMIT seconds; a case still running
# then has every Python process of it dump its stacks (faulthandler on SIGABRT) into its log, so a hang says where.
#   bash bench/gpu_smoke.sh OUT_DIR [LIMIT]          (GPU_SMOKE_CASES="vl-lora sd-qlora" runs only those)
# OUT_DIR/<case>.log (launcher output), OUT_DIR/runs/<case>/ (the run), OUT_DIR/summary.json (exit code, seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash bench/gpu_smoke.sh OUT_DIR [LIMIT]}"
LIMIT="${2:-120}"
mkdir -p "$OUT/runs"
export PYTHONFAULTHANDLER=1
summary="$OUT/summary.json"
echo "{" > "$summary"

run_case() {
    local name="$1"; shift
    [ -z "${GPU_SMOKE_CASES:-}" ] || [[ " $GPU_SMOKE_CASES " == *" $name "* ]] || return 0
    local start; start=$(date +%s)
    setsid bash "$@" --output_dir "$OUT/runs" --run_name "$name" > "$OUT/$name.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - start )) -lt "$LIMIT" ]; do sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "[gpu_smoke] $name still running after ${LIMIT}s: stacks follow" >> "$OUT/$name.log"
        pkill -ABRT -s "$pid" python 2>/dev/null; sleep 5; kill -KILL -- -"$pid" 2>/dev/null
    fi
    wait "$pid"; local code=$?
    echo "  \"$name\": {\"exit\": $code, \"seconds\": $(( $(date +%s) - start ))}," >> "$summary"
    echo "[gpu_smoke] $name: exit $code in $(( $(date +%s) - start )) s"
}

run_case vl-lora launch/train_lora.sh configs/tiny_vl_lora.yaml
run_case vl-qlora launch/train_qlora.sh configs/tiny_vl_qlora.yaml
run_case sd-lora launch/train_diffusion.sh configs/tiny_sd_lora.yaml
run_case sd-qlora launch/train_diffusion.sh configs/tiny_sd_qlora.yaml
echo "  \"limit_s\": $LIMIT" >> "$summary"
echo "}" >> "$summary"
