#!/usr/bin/env bash
# All CPU benchmarks in one run, on a quiet machine (about 20 minutes on 2 cores).
# Results go to benchmarks/results/ (or $OUT); the figures are copied into benchmarks/RESULTS.md by hand.
#   bash benchmarks/run_cpu_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
C="python -m cosmolit"
$C bench train --model cnn --accelerator cpu --batch-sizes 2,8,32,128 --steps 10 --out "$OUT/cnn_cpu.json" --force
$C bench train --model cnn --accelerator cpu --batch-sizes 2,32 --steps 10 --channels-last --out "$OUT/cnn_cpu_cl.json" --force
$C bench train --model bnn --accelerator cpu --batch-sizes 2,8,32 --steps 8 --out "$OUT/bnn_cpu.json" --force
# the same with torch.compile (fit's trainer.compile), and both side by side, steps alternating in one process
$C bench train --model cnn --accelerator cpu --batch-sizes 2,8,32,128 --steps 10 --compile --label "cosmolit cpu, compiled" --out "$OUT/cnn_cpu_compile.json" --force
$C bench train --model bnn --accelerator cpu --batch-sizes 2,8,32 --steps 8 --compile --label "cosmolit cpu, compiled" --out "$OUT/bnn_cpu_compile.json" --force
$C bench overhead --accelerator cpu --parts compile --batch-size 2 --bnn-batch-size 2 --out "$OUT/compile_b2.json" --force
$C bench overhead --accelerator cpu --parts compile --out "$OUT/compile_b32.json" --force
$C bench generate --accelerator cpu --n 1,10,100,500,1000 --out "$OUT/gen_cpu.json" --force
$C bench overhead --accelerator cpu --parts lightning,pyro,mfu,malloc --out "$OUT/overhead_cpu.json" --force
# the same training steps under glibc's default malloc, for the side-by-side table
$C --system-malloc bench train --model cnn --accelerator cpu --batch-sizes 2,8,32,128 --steps 10 --out "$OUT/cnn_cpu_system_malloc.json" --force
$C --system-malloc bench train --model bnn --accelerator cpu --batch-sizes 2,8,32 --steps 8 --out "$OUT/bnn_cpu_system_malloc.json" --force
$C bench plot "$OUT/cnn_cpu.json" "$OUT/cnn_cpu_compile.json" --reference paper --baseline "TF 2-core" --out "$OUT/cnn_cpu.png" --force
$C bench plot "$OUT/gen_cpu.json" --reference paper --out "$OUT/gen_cpu.png" --force
python benchmarks/bench_conv_wgrad.py --batch-sizes 2,8,32 --rounds 8 | tee "$OUT/conv_wgrad.txt"
python benchmarks/bench_simulate.py --n 64 --repeats 3 --out "$OUT/simulate.json"
# fit's step in static-graph mode (on a CPU its eager fallback) against Lightning's own step
python benchmarks/bench_static_fit.py --batch-sizes 2,32 --k 1,8 --rounds 6 --out "$OUT/static_fit_cpu.json"
