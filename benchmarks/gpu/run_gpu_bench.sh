#!/usr/bin/env bash
# Every cosmolit GPU benchmark in one run (< 8 minutes on one H200), JSON + figures into $OUT.
# Needs: CUDA, torch, pytorch-lightning, pyro-ppl, matplotlib, typer, h5py (no GalSim).
#   OUT=/tmp/gpu-bench bash benchmarks/gpu/run_gpu_bench.sh           # full run
#   OUT=/tmp/gpu-bench bash benchmarks/gpu/run_gpu_bench.sh --quick   # a 1-minute smoke run
# BUNDLE=FILE.tar.gz also packs everything written into one file (about 20 files are written;
# the lent device machine sends back at most 8). On that machine, with pyro-ppl and pyro-api
# wheels (its image has the rest) in the ignored folder .whl (see the device tool's notes):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site || exit; O=$OUT; OUT=/tmp/gb BUNDLE=$O/gpu-bench.tar.gz \
#     bash benchmarks/gpu/run_gpu_bench.sh; cp /tmp/gb/summary.md /tmp/gb/log.txt $O/
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
OUT="${OUT:-$repo/runs/gpu-bench}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
"$PY" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'PL', pl.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/versions.txt"
rc=0
timeout 470 "$PY" "$here/run_gpu_bench.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt" || rc=$?
if [ -n "${BUNDLE:-}" ]; then
  tar czf "$BUNDLE" -C "$OUT" .
fi
exit "$rc"
