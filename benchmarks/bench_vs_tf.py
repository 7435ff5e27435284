"""cosmolit against the study's TensorFlow networks on this machine, side by side (issue 5).

paper.md's TF step times were measured on one 2-core machine on 2026-11-28; the machines these
benchmarks run on change (AMD EPYC one session, Intel Xeon with AVX-512 the next), so a ratio is
only meaningful when both frameworks run on the same machine in the same hour. This script
alternates, round by round, the TF rebuild (benchmarks/tf_reference/study_tf.py, in its own
environment) and `cosmolit bench train` (eager and, with --compile, compiled), with the same
protocol for both: epochs of --epoch-images random stamps of the study's shapes, the first epoch
warm-up, the step time = median over the timed epochs of epoch time / steps per epoch. The VAE
decoder is timed decoding n latents at once (TF's `predict_on_batch`, `cosmolit bench generate`'s
`decode_time`), the median of --repeats calls after an untimed one.

    python3.11 -m venv tfvenv && tfvenv/bin/pip install -r benchmarks/tf_reference/requirements.txt
    python benchmarks/bench_vs_tf.py --tf-python tfvenv/bin/python --rounds 2 --out vs_tf.json

Prints a table of times (medians over rounds) and TF / cosmolit ratios (median of the per-round
ratios; above 1 means cosmolit is faster) and writes every figure to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TF_SCRIPT = HERE / "tf_reference" / "study_tf.py"
MODELS = ("cnn", "bnn", "decoder")


def _ints(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b]


# Each run returns {size: (figure, second figure)} in seconds. For cnn and bnn the size is the batch,
# the figure the time per step from whole epochs (the protocol of paper.md's TF figures, used for the
# ratios) and the second the median of the timed steps alone (leaving out data loading and Keras' or
# Lightning's bookkeeping between steps). For the decoder the size is the number of latents and
# both figures are the median time to decode them.
def run_tf(python: str, model: str, sizes: list[int], a, out: Path) -> dict[int, tuple[float, float]]:
    cmd = [python, str(TF_SCRIPT), "--model", model, "--out", str(out)]
    if model == "decoder":
        cmd += ["--n", ",".join(map(str, sizes)), "--repeats", str(a.repeats)]
    else:
        cmd += ["--batch-sizes", ",".join(map(str, sizes)), "--epochs", str(a.epochs),
                "--epoch-images", str(a.epoch_images)]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["results"]
    if model == "decoder":
        return {r["n"]: (r["decode_s"], r["decode_s"]) for r in rows}
    return {r["batch_size"]: (r["step_s"], r["batch_s_median"]) for r in rows}


def run_cosmolit(model: str, sizes: list[int], a, compiled: bool, out: Path) -> dict[int, tuple[float, float]]:
    c = [sys.executable, "-m", "cosmolit", "bench"]
    if model == "decoder":
        cmd = c + ["generate", "--accelerator", "cpu", "--n", ",".join(map(str, sizes)), "--repeats", str(a.repeats)]
    else:
        cmd = c + ["train", "--model", model, "--accelerator", "cpu", "--batch-sizes", ",".join(map(str, sizes)),
                   "--epochs", str(a.epochs), "--warmup-epochs", "1", "--epoch-images", str(a.epoch_images)]
    if model == "cnn":
        cmd += ["--loss", "mse"]  # the study's timing runs, and the TF rebuild's loss
    if compiled:
        cmd.append("--compile")
    subprocess.run(cmd + ["--out", str(out), "--force"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["results"]
    if model == "decoder":
        return {r["n"]: (r["decode_time"]["median"],) * 2 for r in rows}
    return {r["batch_size"]: (r["epoch_time"]["median"] / (a.epoch_images // r["batch_size"]), r["step_time"]["median"])
            for r in rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tf-python", required=True, help="python of an environment with benchmarks/tf_reference/requirements.txt")
    p.add_argument("--models", default="cnn,bnn,decoder")
    p.add_argument("--cnn-batch-sizes", default="2,8,32,128")
    p.add_argument("--bnn-batch-sizes", default="2,8,32")
    p.add_argument("--decoder-n", default="1,100,1000", help="numbers of latents decoded at once")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run, after one warm-up epoch")
    p.add_argument("--epoch-images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5, help="decoder: timed calls per n and run")
    p.add_argument("--compile", action="store_true", help="also time cosmolit's training steps with torch.compile")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if not Path(a.tf_python).exists():
        p.error(f"--tf-python {a.tf_python} does not exist; create the TF environment first (see this file's docstring)")
    models = [m for m in a.models.split(",") if m]
    if not models or set(models) - set(MODELS):
        p.error(f"--models must be a comma-separated subset of {','.join(MODELS)}, got {a.models!r}")
    try:
        sizes = {"cnn": _ints(a.cnn_batch_sizes), "bnn": _ints(a.bnn_batch_sizes), "decoder": _ints(a.decoder_n)}
    except ValueError:
        p.error("batch sizes and --decoder-n must be comma-separated integers")
    trained = [m for m in models if m != "decoder"]
    if min(a.rounds, a.epochs, a.repeats) < 1 or min(min(sizes[m]) for m in models) < 1 or \
            (trained and a.epoch_images < max(max(sizes[m]) for m in trained)):
        p.error("--rounds, --epochs, --repeats and sizes must be positive, --epoch-images at least the largest batch")
    sides = {m: ["tf", "eager"] + (["compiled"] if a.compile and m != "decoder" else []) for m in models}
    # times[model][side][size] = [(figure, second figure) in seconds, one per round]
    times = {m: {s: {b: [] for b in sizes[m]} for s in sides[m]} for m in models}
    tf_env = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(a.rounds):
            for m in models:
                for side in sides[m]:
                    out = tmp / f"{m}_{side}_{r}.json"
                    if side == "tf":
                        got = run_tf(a.tf_python, m, sizes[m], a, out)
                        tf_env = json.loads(out.read_text())["environment"]
                    else:
                        got = run_cosmolit(m, sizes[m], a, side == "compiled", out)
                    for b, t in got.items():
                        times[m][side][b].append(t)
                    print(f"round {r + 1} {m} {side:8s} " + "  ".join(
                        f"{b}: {t[0] * 1e3:.1f} ms" + (f" (steps alone {t[1] * 1e3:.1f})" if m != "decoder" else "")
                        for b, t in got.items()), flush=True)
    import torch

    from cosmolit.bench.env import cpu_model

    table = []
    for m in models:
        for b in sizes[m]:
            row = {"model": m, "size": b, "unit": "ms to decode n latents" if m == "decoder" else "ms per step"}
            for s in sides[m]:
                row[f"{s}_ms"] = statistics.median(t[0] for t in times[m][s][b]) * 1e3
                row[f"{s}_ms_rounds"] = [t[0] * 1e3 for t in times[m][s][b]]
                if m != "decoder":
                    row[f"{s}_step_alone_ms_rounds"] = [t[1] * 1e3 for t in times[m][s][b]]
            for s in sides[m][1:]:
                row[f"tf_over_{s}"] = statistics.median(t[0] / c[0] for t, c in zip(times[m]["tf"][b], times[m][s][b]))
            table.append(row)
    print("| network | batch or n | TF (ms) | cosmolit eager | cosmolit compiled | TF / eager | TF / compiled |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        cell = lambda k, f: f.format(row[k]) if k in row else "-"  # noqa: E731
        print(f"| {row['model']} | {row['size']} | {row['tf_ms']:.1f} | {cell('eager_ms', '{:.1f}')} | "
              f"{cell('compiled_ms', '{:.1f}')} | {cell('tf_over_eager', '{:.2f}')} | {cell('tf_over_compiled', '{:.2f}')} |")
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "tf": tf_env}
    Path(a.out).write_text(json.dumps({"schema": "cosmolit-vs-tf/1", "rounds": a.rounds, "epochs": a.epochs,
                                       "epoch_images": a.epoch_images, "repeats": a.repeats, "environment": env,
                                       "table": table}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
