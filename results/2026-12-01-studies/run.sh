#!/bin/bash
# How results/2026-12-01-studies/raw was made, in order (from the repository root, /work/venv:
# numpy, torch 2.13.0, JAX 0.10.2, TensorFlow 2.21.0). Each step was run once, one after another.
set -eu
OUT=${1:-results/2026-12-01-studies}
QUICK=results/2026-11-26-cpu-2core/raw/quick     # strategy per framework and model, as for parity
export TF_CPP_MIN_LOG_LEVEL=2

# 1. gradient flow (NumPy reference, one thread)
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  python -m bench study gradients --out $OUT/raw/gradients

# 2. readout cells: 3 frameworks x 4 models x 3 tasks x 3 seeds, spectral radius 0.9
for FW in torch jax tensorflow; do
  python -m bench run --preset readout --frameworks $FW --fastest-from $QUICK/$FW \
    --out $OUT/raw/readout/$FW --resume
done

# 3. spectral-radius sensitivity: torch, seed 0
for RHO in 0.5 1.2 2.0; do
  python -m bench run --preset readout --frameworks torch --fastest-from $QUICK/torch \
    --spectral-radius $RHO --seeds 0 --out $OUT/raw/readout-radius/torch --resume
done

# 4. full training for torch on the same machine (the parity preset, 3 seeds)
python -m bench run --preset parity --frameworks torch --fastest-from $QUICK/torch \
  --out $OUT/raw/parity-fresh/torch --resume

# 5. the JAX and TensorFlow full-training rows: the 2026-11-26 parity records, copied
for FW in jax tensorflow; do
  mkdir -p $OUT/raw/parity-2026-11-26/$FW
  cp results/2026-11-26-cpu-2core/raw/parity/$FW/{records.jsonl,env.json} $OUT/raw/parity-2026-11-26/$FW/
done

# 6. the control and the report
python results/2026-12-01-studies/controls.py
python -m bench report $OUT/raw --out $OUT
