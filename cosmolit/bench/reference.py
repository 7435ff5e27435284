"""Every timing the reference study reported, to draw beside cosmolit's.

Sources:
- B. Arcelin, "Comparison of Graphcore IPUs and Nvidia GPUs for cosmology applications",
  arXiv:2106.02465 (2021); numbers from the notebook `notebooks/Plot training-inference time.ipynb`
  of its repository github.com/BastienArcelin/IPU-GPU. One Nvidia V100 GPU vs one Graphcore
  GC2 IPU, TensorFlow 2.1.
- The study's TensorFlow layer code rebuilt on TensorFlow 2.19.1 (CPU), timed on a 2-core
  machine like cosmolit's development machine (2026-11-28; /work/shared/reference/paper.md).
  These figures hold for that machine only (on a 2-core Intel Xeon the same TF code took 1.06x to
  1.34x as long, batch 2 to 128): benchmarks/bench_vs_tf.py times it beside cosmolit on yours.

Units: training in seconds per 100 epochs of 8,000 images (the study's unit); generation in
seconds for n images (latent flow sampling + decoding, after a warm-up of 100 samples).
"""

from __future__ import annotations

PAPER = "Arcelin 2021, arXiv:2106.02465 (github.com/BastienArcelin/IPU-GPU notebook)"
TF_CPU = "study's TF 2.19 layer code on a 2-core CPU (cosmolit reference notes, 2026-11-28)"

EPOCH_IMAGES = 8000
EPOCHS = 100

# Training, seconds per 100 epochs of 8,000 images: {model: {device: {batch: seconds}}}
TRAIN = {
    "cnn": {
        "GC2 IPU (paper)": {2: 189.24, 4: 162.52, 8: 250.53, 10: 172.22, 12: 151.53, 14: 186.95},
        "V100 GPU (paper)": {2: 2082.35, 4: 1079.45, 8: 589.62, 10: 484.49, 12: 474.81, 14: 442.94,
                             16: 369.18, 18: 370.87, 20: 318.01, 22: 336.10, 24: 323.82},
    },
    "bnn": {
        "GC2 IPU (paper)": {2: 373.44, 4: 271.09, 6: 234.27, 8: 219.62},
        "V100 GPU (paper)": {2: 3344.43, 4: 1717.58, 6: 1349.23, 8: 977.42, 10: 842.17, 12: 788.45,
                             14: 732.71, 16: 617.72, 18: 595.17, 20: 517.28, 22: 545.45, 24: 522.48},
    },
}

# VAE generation (flow sampling + decoding), seconds for n images: {device: {n: seconds}}
GENERATE = {
    "GC2 IPU (paper)": {1: 0.5189, 10: 0.6216, 100: 0.9435, 500: 1.7203, 1000: 2.4671, 5000: 7.6630},
    "V100 GPU (paper)": {1: 0.8849, 10: 0.8945, 100: 0.9842, 500: 1.3849, 1000: 1.7513, 5000: 3.3849},
}

# The study's networks in TensorFlow on 2 CPU cores: seconds per training step, {model: {batch: s}}
TF_CPU_STEP = {
    "cnn": {2: 0.0167, 8: 0.0399, 32: 0.139, 128: 0.569},
    "bnn": {2: 0.0403, 8: 0.0654, 32: 0.174, 128: 0.593},
}
# TF 2-core: decoder alone, seconds to decode n latents; flow sampling + decoding as the study timed it.
TF_CPU_DECODE = {1: 0.023, 100: 0.335, 1000: 2.99}
TF_CPU_GENERATE = {1: 0.46, 100: 0.86, 1000: 4.32}
# TF 2-core parameter counts (trainable).
TF_PARAMS = {"cnn": 1_517_205, "bnn": 2_726_229, "vae_decoder": 3_319_942, "flow": 725_504}

# Arithmetic cost: trunk forward at 64x64x6 about 0.2 GFLOP per image; training about 3x that.
FORWARD_GFLOP_PER_IMAGE = 0.2
TRAIN_GFLOP_PER_IMAGE = 0.6
TF_CPU_BOUND_IMAGES_PER_S = 225.0  # deterministic network from batch 32 upwards on 2 cores

# Goals for cosmolit on one H200 (issue 5): train in seconds per 100 epochs, generation in seconds.
H200_GOALS = {
    ("cnn", 2): 189.0, ("cnn", 12): 152.0,
    ("bnn", 2): 373.0, ("bnn", 8): 220.0,
    ("generate", 1000): 0.05,
}


def tf_cpu_train_seconds(model: str) -> dict[int, float]:
    """The TF 2-core step times converted to the study's unit (s per 100 epochs of 8,000 images)."""
    return {b: t * EPOCH_IMAGES / b * EPOCHS for b, t in TF_CPU_STEP[model].items()}


def train_series(model: str, include_cpu: bool = True) -> dict[str, dict[int, float]]:
    """Reference training curves for `model` ('cnn' or 'bnn'): {label: {batch: s per 100 epochs}}."""
    if model not in TRAIN:
        raise KeyError(model)
    series = {label: dict(points) for label, points in TRAIN[model].items()}
    if include_cpu:
        series["TF 2-core CPU (study code)"] = tf_cpu_train_seconds(model)
    return series


def generate_series(include_cpu: bool = True) -> dict[str, dict[int, float]]:
    """Reference generation curves: {label: {n: seconds}}."""
    series = {label: dict(points) for label, points in GENERATE.items()}
    if include_cpu:
        series["TF 2-core CPU (study code)"] = dict(TF_CPU_GENERATE)
    return series
