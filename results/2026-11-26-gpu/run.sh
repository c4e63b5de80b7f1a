#!/usr/bin/env bash
# One GPU run that fits a 9-minute device lease, most important cells first.
# Every step appends to one records.jsonl (--resume); a step cut by the
# deadline loses only the cell in flight. Usage: run.sh OUT_DIR [SECONDS]
set -u
OUT_DIR=${1:?usage: run.sh OUT_DIR [SECONDS]}
BUDGET=${2:-500}
DEVICE=${BENCH_GPU_DEVICE:-gpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
START=$(date +%s)
(nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv) \
    > "$OUT_DIR/nvidia-smi.txt" 2>&1
$PY -c "import sys, numpy, torch, jax; print(sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__, 'jax', jax.__version__, jax.devices())" \
    > "$OUT_DIR/versions.txt" 2>&1

step() {  # step NAME ARGS...: run cells until the deadline
    local left=$(( START + BUDGET - $(date +%s) ))
    if [ "$left" -lt 20 ]; then echo "skip $1: ${left}s left" | tee -a "$OUT_DIR/steps.txt"; return; fi
    echo "step $1 ($(( $(date +%s) - START ))s in, ${left}s left)" | tee -a "$OUT_DIR/steps.txt"
    shift
    timeout -s TERM "$left" $PY -m bench run --preset quick --device "$DEVICE" --repeats 5 \
        --timeout 150 --out "$OUT_DIR" --resume "$@" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -n 40
}

R="--strategies fused levels loop recursive"
step torch-main   --frameworks torch --models elman lstm rvnn treelstm $R
step jax-main     --frameworks jax --models elman lstm rvnn treelstm --strategies fused compiled levels
step batch-sweep  --frameworks torch jax --models lstm --strategies fused --batch-sizes 1 100 400
step batch-sweep2 --frameworks torch jax --models treelstm --strategies levels --batch-sizes 1 100 400
step torch-compiled --frameworks torch --models lstm treelstm --strategies compiled
step tree-sweep   --frameworks torch --models lstm treelstm --strategies fused levels \
    --tasks synth-balanced-8 synth-balanced-64 synth-balanced-512 synth-left-8 synth-left-64 synth-left-512
step leftovers    --frameworks torch jax --models elman lstm rvnn treelstm
echo "done in $(( $(date +%s) - START ))s" | tee -a "$OUT_DIR/steps.txt"
