#!/usr/bin/env bash
# The whole `gpu` preset (bench/config.py gpu(): torch and JAX) in one short lease, the most
# telling cells first. Every step appends to one records.jsonl (--resume) and stops at a
# deadline shared by all steps, so a cut loses only the cell in flight; rerunning the script
# (or `python -m bench run --preset gpu --device gpu --out OUT_DIR --resume`) completes the
# preset. The cells are exactly the preset's (no overrides), so both agree on what is done.
# Usage: run.sh OUT_DIR [SECONDS]   (SECONDS defaults to 540)
set -u
OUT_DIR=${1:?usage: run.sh OUT_DIR [SECONDS]}
BUDGET=${2:-540}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX: one persistent compilation cache for the run, outside OUT_DIR. A cell whose programs an
# earlier cell already compiled (the sweeps share the SST cells' shape classes) loads them;
# its record says cache "warm" and the report keeps its first call out of the compile column.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/bench-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# XLA's GEMM autotuning (on by default) compiles and times candidate kernels for every GEMM
# shape of every program; the last run spent 14-131 s per JAX cell compiling. Off here (XLA
# picks its default kernels, as torch's cuBLAS does); recorded in each JAX record
# (info.threads.xla_flags). Set XLA_FLAGS yourself, even empty, to keep XLA's defaults.
export XLA_FLAGS=${XLA_FLAGS-"--xla_gpu_autotune_level=0"}
mkdir -p "$OUT_DIR"
START=$(date +%s)
(nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv) \
    > "$OUT_DIR/nvidia-smi.txt" 2>&1
$PY -c "import sys, numpy, torch, jax; print(sys.version.split()[0], 'numpy', numpy.__version__, 'torch', torch.__version__, 'jax', jax.__version__, jax.devices())" \
    > "$OUT_DIR/versions.txt" 2>&1
echo "XLA_FLAGS=$XLA_FLAGS JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR" >> "$OUT_DIR/versions.txt"

step() {  # step NAME ARGS...: the preset's cells that ARGS select, until the deadline
    local left=$(( START + BUDGET - $(date +%s) ))
    if [ "$left" -lt 20 ]; then echo "skip $1: ${left}s left" | tee -a "$OUT_DIR/steps.txt"; return; fi
    echo "step $1 ($(( $(date +%s) - START ))s in, ${left}s left)" | tee -a "$OUT_DIR/steps.txt"
    shift
    timeout -s TERM "$left" $PY -m bench run --preset gpu --out "$OUT_DIR" --resume "$@" 2>&1 \
        | tr '\r' '\n' | grep -v '^\s*$' | tail -n 40
}

SST="--tasks sst --batch-sizes 25"
SYNTH="--tasks synth-balanced-8 synth-balanced-64 synth-balanced-512 synth-left-8 synth-left-64 synth-left-512"
# 1. reference points (cheap, ~9 s a cell): torch's batched strategies
step torch-fast     --frameworks torch --strategies fused levels $SST
# 2. never measured on a GPU: the JAX tree models, levels (its training rewritten) and compiled
step jax-trees      --frameworks jax --models rvnn treelstm --strategies levels compiled $SST
# 3. never measured: torch.compile, every model
step torch-compiled --frameworks torch --strategies compiled $SST
# 4. JAX RNNs on bounded shapes (last run: 25 compiles a cell)
step jax-rnn        --frameworks jax --models elman lstm --strategies fused compiled $SST
# 5. the baselines, per step and per node
step baselines      --frameworks torch jax --strategies loop recursive $SST
# 6. batch sizes, then tree sizes (the JAX cells mostly load the SST cells' programs)
step batch-sweep    --frameworks torch jax --models lstm treelstm --strategies fused levels --tasks sst --batch-sizes 1 100 400
step tree-sweep     --frameworks torch jax --models lstm treelstm --strategies fused levels $SYNTH
# 7. anything of the preset still missing (a cell cut by an earlier step's deadline)
step leftovers
echo "done in $(( $(date +%s) - START ))s" | tee -a "$OUT_DIR/steps.txt"
