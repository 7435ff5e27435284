#!/usr/bin/env bash
# Every cosmolit GPU benchmark in one run (< 8 minutes on one H200), JSON + figures into $OUT.
# Needs: CUDA, torch, pytorch-lightning, pyro-ppl, matplotlib, typer, h5py (no GalSim).
#   OUT=/tmp/gpu-bench bash benchmarks/gpu/run_gpu_bench.sh           # full run
#   OUT=/tmp/gpu-bench bash benchmarks/gpu/run_gpu_bench.sh --quick   # a 1-minute smoke run
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
OUT="${OUT:-$repo/runs/gpu-bench}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
"$PY" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'PL', pl.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/versions.txt"
timeout 470 "$PY" "$here/run_gpu_bench.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
