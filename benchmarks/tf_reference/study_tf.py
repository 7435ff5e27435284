"""The study's two shape networks rebuilt in TensorFlow 2.19 / tf-keras / TFP 0.25, timed on this machine.

Why: ../shared/reference/paper.md gives TF step times measured on some 2-core machine on 2026-11-28;
the development machines change between sessions (AMD EPYC, Intel Xeon), so cosmolit's figures are
only comparable with TF's when both run on the same machine, side by side. This script is the TF
side; benchmarks/bench_vs_tf.py alternates it with `cosmolit bench train`.

The layers follow paper.md (and the study's description of them): BatchNormalization on the
(64, 64, 6) channels-last input; for filters 32, 64, 128, 256: Conv2D 3x3 'same' + PReLU (one slope
per element, Keras' default), Conv2D 3x3 stride 2 'same' + PReLU; Flatten; Dense(9).

- cnn: Dense(9) trained on the squared error of its first 3 outputs (the study's timing runs used
  MSE; cosmolit's `--loss mse` trains the same 3 means of its 9-output head). 1,517,205 parameters.
- bnn: every convolution and the head TFP *Reparameterization layers with a mean-field Normal
  posterior (loc He-normal, untransformed scale N(-9, 0.1)), N(0, 1) prior, point-estimate biases,
  KL / 8,000; the head feeds tfp.layers.MultivariateNormalTriL(3); loss the negative log-likelihood
  plus the KL. 2,726,229 parameters.

- decoder: the VAE's decoder (paper.md): Dense(256) + PReLU, Dense(4 x 4 x 256) + PReLU, reshape,
  for filters 256, 128, 64, 32 a Conv2DTranspose stride 2 + PReLU and one stride 1 + PReLU, then
  Conv2D 3x3 to 6 bands, sigmoid. 3,319,942 parameters. Timed: `predict_on_batch` on n latents,
  the median of --repeats calls, after a warm-up call on 100 latents and one untimed call per n
  (Keras traces its predict function again for each new batch shape).

Protocol for the two shape networks (as paper.md's TF figures): Adam 1e-3, `model.fit` on random data of the study's shapes,
epochs of --epoch-images samples; the first epoch is warm-up and the per-step time is the median
over the later epochs of epoch time / steps per epoch. The median of per-batch times (Keras
callback) is written too.

Needs its own environment (TF and torch are not installed together):
    python3.11 -m venv tfvenv && tfvenv/bin/pip install -r benchmarks/tf_reference/requirements.txt
    tfvenv/bin/python benchmarks/tf_reference/study_tf.py --model cnn --batch-sizes 2,32 --out tf_cnn.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFP's layers need Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PARAMETERS = {"cnn": 1_517_205, "bnn": 2_726_229, "decoder": 3_319_942}  # the study's trainable-parameter counts (paper.md)
FILTERS = (32, 64, 128, 256)
TRAIN_SIZE = 8000  # the KL is divided by the study's training-set size


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _check_parameters(net, model: str) -> int:
    import tensorflow as tf

    n = int(sum(int(tf.size(w)) for w in net.trainable_weights))
    if n != PARAMETERS[model]:
        raise SystemExit(f"error: the {model} network has {n} trainable parameters, the study's has {PARAMETERS[model]}")
    return n


def build_decoder(latent: int = 32, bands: int = 6):
    import tf_keras as keras

    z = keras.Input((latent,))
    h = keras.layers.PReLU()(keras.layers.Dense(256)(z))
    h = keras.layers.PReLU()(keras.layers.Dense(4 * 4 * 256)(h))
    h = keras.layers.Reshape((4, 4, 256))(h)
    for f in (256, 128, 64, 32):
        h = keras.layers.PReLU()(keras.layers.Conv2DTranspose(f, 3, strides=2, padding="same")(h))
        h = keras.layers.PReLU()(keras.layers.Conv2DTranspose(f, 3, strides=1, padding="same")(h))
    out = keras.layers.Conv2D(bands, 3, padding="same", activation="sigmoid")(h)
    net = keras.Model(z, out)
    return net, _check_parameters(net, "decoder")


def time_decoder(ns: list[int], repeats: int, seed: int) -> list[dict]:
    import numpy as np
    import tensorflow as tf

    tf.random.set_seed(seed)
    net, n_params = build_decoder()
    rng = np.random.default_rng(seed)
    net.predict_on_batch(rng.standard_normal((100, 32)).astype(np.float32))  # warm-up, as the study
    rows = []
    for n in ns:
        z = rng.standard_normal((n, 32)).astype(np.float32)
        net.predict_on_batch(z)  # Keras traces its predict function again for each new batch shape
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net.predict_on_batch(z)
            times.append(time.perf_counter() - t0)
        rows.append({"n": n, "decode_s": statistics.median(times), "decode_s_all": times, "parameters": n_params})
    return rows


def build(model: str, bands: int = 6, stamp: int = 64):
    import tensorflow as tf
    import tf_keras as keras

    inp = keras.Input((stamp, stamp, bands))
    h = keras.layers.BatchNormalization()(inp)
    if model == "cnn":
        conv = lambda f, s: keras.layers.Conv2D(f, 3, strides=s, padding="same")  # noqa: E731
        head = keras.layers.Dense(9)
    else:
        import tensorflow_probability as tfp

        tfpl, tfd = tfp.layers, tfp.distributions
        posterior = tfpl.default_mean_field_normal_fn(
            loc_initializer=keras.initializers.HeNormal(),
            untransformed_scale_initializer=keras.initializers.RandomNormal(-9.0, 0.1))
        kl = lambda q, p, _: tfd.kl_divergence(q, p) / TRAIN_SIZE  # noqa: E731
        bayes = dict(kernel_posterior_fn=posterior, kernel_prior_fn=tfpl.default_multivariate_normal_fn,
                     kernel_divergence_fn=kl)
        conv = lambda f, s: tfpl.Convolution2DReparameterization(f, 3, strides=s, padding="same", **bayes)  # noqa: E731
        head = tfpl.DenseReparameterization(tfpl.MultivariateNormalTriL.params_size(3), **bayes)
    for f in FILTERS:
        h = keras.layers.PReLU()(conv(f, 1)(h))
        h = keras.layers.PReLU()(conv(f, 2)(h))
    out = head(keras.layers.Flatten()(h))
    if model == "cnn":
        net = keras.Model(inp, out)
        loss = lambda y, o: tf.reduce_mean(tf.square(y - o[:, :3]))  # noqa: E731
    else:
        out = tfp.layers.MultivariateNormalTriL(3)(out)
        net = keras.Model(inp, out)
        loss = lambda y, rv: -rv.log_prob(y)  # noqa: E731
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return net, _check_parameters(net, model)


class _BatchTimes:
    def __init__(self):
        import tf_keras as keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.epoch_start = time.perf_counter()
                outer.batches.append([])

            def on_epoch_end(self, epoch, logs=None):
                outer.epochs.append(time.perf_counter() - outer.epoch_start)

            def on_train_batch_begin(self, batch, logs=None):
                outer.batch_start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                outer.batches[-1].append(time.perf_counter() - outer.batch_start)

        self.epochs, self.batches, self.callback = [], [], Callback()


def time_batch(model: str, batch: int, epochs: int, epoch_images: int, seed: int) -> dict:
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed) if hasattr(tf.keras.utils, "set_random_seed") else tf.random.set_seed(seed)
    net, n_params = build(model)
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 40.0, size=(epoch_images, 64, 64, 6)).astype(np.float32)
    x = np.arcsinh(x / 40.0)  # roughly the normalised inputs cosmolit's network sees
    y = rng.uniform(-0.5, 0.5, size=(epoch_images, 3)).astype(np.float32)
    steps = epoch_images // batch
    timer = _BatchTimes()
    net.fit(x[: steps * batch], y[: steps * batch], batch_size=batch, epochs=1 + epochs, shuffle=True,
            verbose=0, callbacks=[timer.callback])
    per_epoch = [t / steps for t in timer.epochs[1:]]
    per_batch = [t for ep in timer.batches[1:] for t in ep]
    return {"batch_size": batch, "step_s": statistics.median(per_epoch), "step_s_epochs": per_epoch,
            "batch_s_median": statistics.median(per_batch), "steps_per_epoch": steps, "parameters": n_params}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("cnn", "bnn", "decoder"), required=True)
    p.add_argument("--batch-sizes", default="2,8,32,128")
    p.add_argument("--n", default="1,100,1000", help="decoder: numbers of latents decoded at once")
    p.add_argument("--repeats", type=int, default=10, help="decoder: timed calls per n")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    p.add_argument("--epoch-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        batches = [int(b) for b in a.batch_sizes.split(",")]
        ns = [int(n) for n in a.n.split(",")]
    except ValueError:
        p.error(f"--batch-sizes and --n must be comma-separated integers, got {a.batch_sizes!r}, {a.n!r}")
    if a.epochs < 1 or min(batches) < 1 or a.epoch_images < max(batches):
        p.error("--epochs and batch sizes must be positive and --epoch-images at least the largest batch")
    if a.repeats < 1 or min(ns) < 1:
        p.error("--repeats and --n must be positive")
    import tensorflow as tf
    import tensorflow_probability as tfp
    import tf_keras

    rows = []
    if a.model == "decoder":
        rows = time_decoder(ns, a.repeats, a.seed)
        for row in rows:
            print(f"TF decoder n {row['n']:5d}: {row['decode_s']:.4f} s", flush=True)
        batches = []
    for b in batches:
        row = time_batch(a.model, b, a.epochs, a.epoch_images, a.seed)
        print(f"TF {a.model} batch {b:4d}: {row['step_s'] * 1e3:8.2f} ms/step (epochs), "
              f"{row['batch_s_median'] * 1e3:8.2f} ms (median batch)", flush=True)
        rows.append(row)
    env = {"python": platform.python_version(), "tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
           "tensorflow_probability": tfp.__version__, "cpu_model": cpu_model(),
           "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
           "cpu_count": os.cpu_count()}
    with open(a.out, "w") as f:
        json.dump({"schema": "cosmolit-tf-reference/1", "model": a.model, "epochs": a.epochs,
                   "epoch_images": a.epoch_images, "environment": env, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
