#!/usr/bin/env bash
# The issue-3 quality runs on CPU, end to end: simulate train and test sets (never trained on),
# fit the shape CNN (isolated, blended), the Pyro BNN and the VAE with the configs/ presets, evaluate
# each with `cosmolit evaluate`. About 9 h and 25 GB of disk on 2 cores (the two VAEs 1 h 50 min, the
# blended CNN 2 h 40 min on 60,000 blends with their scenes, the
# 40,000-stamp recalibration and test 1 h); only iso_train and iso_test keep the noiseless stamps
# (the VAE's). Figures are copied into benchmarks/RESULTS.md by hand.
#   bash benchmarks/run_quality.sh [WORKDIR]      (default: quality-runs/, created)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-quality-runs}
mkdir -p "$W" && cd "$W"
C="cosmolit"
CFG="$ROOT/configs"
step() { echo "== $(date -u +%H:%M:%S) $*"; }
sim() { [ -f "$1" ] || { step "simulate $1"; $C simulate --out "$@" --workers 2 -q; }; }

sim iso_train.h5 --n 10000 --seed 100
sim iso_test.h5 --n 2000 --seed 200
sim iso_test500.h5 --n 500 --seed 300 --no-clean
sim mixed_test500.h5 --n 500 --seed 400 --blend-fraction 0.5 --no-clean
sim iso_cal40k.h5 --n 40000 --seed 700 --no-clean  # calibration and test sets for m and c (4 GB each)
sim iso_test40k.h5 --n 40000 --seed 800 --no-clean
sim iso_cal2k.h5 --n 2000 --seed 900 --no-clean  # calibration set of the BNN
sim iso_test2k.h5 --n 2000 --seed 310 --no-clean  # the BNN's coverage to ±0.005

step "fit cnn (isolated)"
$C fit --model cnn --data iso_train.h5 --config "$CFG/cnn.yaml" --epochs 12 --accelerator cpu --out cnn_iso --force -q
$C evaluate --ckpt cnn_iso/model.ckpt --data iso_test.h5 --out eval_cnn_iso --force -q
step "recalibrate the cnn on 40,000 stamps, m and c on 40,000 others"
$C calibrate --ckpt cnn_iso/model.ckpt --data iso_cal40k.h5 --out cnn_iso/model-cal40k.ckpt --force -q
$C evaluate --ckpt cnn_iso/model-cal40k.ckpt --data iso_test40k.h5 --no-hsm --out eval_cnn_cal40k --force -q

step "fit bnn (isolated)"
$C fit --model bnn --data iso_train.h5 --config "$CFG/bnn.yaml" --epochs 10 --batch-size 32 --accelerator cpu --out bnn_iso --force -q
$C evaluate --ckpt bnn_iso/model.ckpt --data iso_test500.h5 --samples 32 --out eval_bnn_iso --force -q
$C evaluate --ckpt bnn_iso/model.ckpt --data mixed_test500.h5 --samples 32 --no-hsm --out eval_bnn_mixed --force -q
$C calibrate --ckpt bnn_iso/model.ckpt --data iso_cal2k.h5 --out bnn_iso/model-cal2k.ckpt --force -q
$C evaluate --ckpt bnn_iso/model-cal2k.ckpt --data iso_test500.h5 --samples 32 --out eval_bnn_cal2k_iso500 --force -q
$C evaluate --ckpt bnn_iso/model-cal2k.ckpt --data mixed_test500.h5 --samples 32 --no-hsm --out eval_bnn_cal2k_mixed --force -q
$C evaluate --ckpt bnn_iso/model-cal2k.ckpt --data iso_test2k.h5 --samples 32 --out eval_bnn_cal2k_iso2k --force -q  # 30 min

sim blend_train30k_scene.h5 --n 30000 --seed 510 --config "$CFG/simulate/blends.yaml" --no-clean --scene
sim blend_test.h5 --n 2000 --seed 600 --config "$CFG/simulate/blends.yaml" --no-clean
step "fit cnn (blends)"  # 24,000 + 6,000 blends, cosine schedule, fresh noise, 24 epochs (55 min)
$C fit --model cnn --data blend_train30k_scene.h5 --config "$CFG/cnn_blends.yaml" --accelerator cpu --out cnn_blend_renoise --force -q
$C evaluate --ckpt cnn_blend_renoise/model.ckpt --data blend_test.h5 --out eval_cnn_blend_renoise --force -q
step "resume cnn (blends) to 40 epochs"  # the cosine rate restarts from 0.29e-3 (38 min)
$C fit --model cnn --data blend_train30k_scene.h5 --config "$CFG/cnn_blends.yaml" --epochs 40 --accelerator cpu --out cnn_blend_renoise --resume -q
$C evaluate --ckpt cnn_blend_renoise/model.ckpt --data blend_test.h5 --out eval_cnn_blend_renoise_e40 --force -q
step "resume cnn (blends) to 50 epochs"  # 24 min
$C fit --model cnn --data blend_train30k_scene.h5 --config "$CFG/cnn_blends.yaml" --epochs 50 --accelerator cpu --out cnn_blend_renoise --resume -q
$C evaluate --ckpt cnn_blend_renoise/model.ckpt --data blend_test.h5 --out eval_cnn_blend_renoise_e50 --force -q
step "resume cnn (blends) on 30,000 new blends to 64 epochs"  # a copy of the run, 14 epochs (31 min)
sim blend_train30k_s511.h5 --n 30000 --seed 511 --config "$CFG/simulate/blends.yaml" --no-clean --scene
rm -rf cnn_blend_ft && cp -r cnn_blend_renoise cnn_blend_ft
$C fit --model cnn --data blend_train30k_s511.h5 --config "$CFG/cnn_blends.yaml" --epochs 64 --accelerator cpu --out cnn_blend_ft --resume -q
$C evaluate --ckpt cnn_blend_ft/model.ckpt --data blend_test.h5 --out eval_cnn_blend_ft --force -q

step "fit vae (the study's denoiser, one sigma per stamp and band)"  # 24 epochs at batch 32 (50 min)
$C fit --model vae --data iso_train.h5 --config "$CFG/vae.yaml" --accelerator cpu --out vae_iso --force -q
$C evaluate --ckpt vae_iso/model.ckpt --data iso_test.h5 --n-generate 1000 --out eval_vae --force -q
step "fit vae (noiseless inputs, one sigma per stamp and band)"  # 24 epochs at batch 32 (1 h)
$C fit --model vae --data iso_train.h5 --config "$CFG/vae_clean.yaml" --accelerator cpu --out vae_clean --force -q
$C evaluate --ckpt vae_clean/model.ckpt --data iso_test.h5 --n-generate 1000 --out eval_vae_clean --force -q
step done
