"""cosmolit against the study's TensorFlow networks on this machine, side by side (issue 5).

paper.md's TF step times were measured on one 2-core machine on 2026-11-28; the machines these
benchmarks run on change (AMD EPYC one session, Intel Xeon with AVX-512 the next), so a ratio is
only meaningful when both frameworks run on the same machine in the same hour. This script
alternates, round by round, the TF rebuild (benchmarks/tf_reference/study_tf.py, in its own
environment) and `cosmolit bench train` (eager and, with --compile, compiled), with the same
protocol for both: epochs of --epoch-images random stamps of the study's shapes, the first epoch
warm-up, the step time = median over the timed epochs of epoch time / steps per epoch.

    python3.11 -m venv tfvenv && tfvenv/bin/pip install -r benchmarks/tf_reference/requirements.txt
    python benchmarks/bench_vs_tf.py --tf-python tfvenv/bin/python --rounds 2 --out vs_tf.json

Prints a table of per-step times (median over rounds) and TF / cosmolit ratios (median of the
per-round ratios; above 1 means cosmolit is faster) and writes every figure to --out.
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


def _ints(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b]


# Each run returns {batch: (seconds per step from whole epochs, median of the timed steps alone)}:
# the first is the protocol of paper.md's TF figures and of the ratios; the second leaves out what
# happens between steps (data loading, Keras' or Lightning's per-step bookkeeping).
def run_tf(python: str, model: str, batches: list[int], epochs: int, images: int, out: Path) -> dict[int, float]:
    subprocess.run([python, str(TF_SCRIPT), "--model", model, "--batch-sizes", ",".join(map(str, batches)),
                    "--epochs", str(epochs), "--epoch-images", str(images), "--out", str(out)], check=True,
                   stderr=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["results"]
    return {r["batch_size"]: (r["step_s"], r["batch_s_median"]) for r in rows}


def run_cosmolit(model: str, batches: list[int], epochs: int, images: int, compiled: bool, out: Path) -> dict[int, float]:
    cmd = [sys.executable, "-m", "cosmolit", "bench", "train", "--model", model, "--accelerator", "cpu",
           "--batch-sizes", ",".join(map(str, batches)), "--epochs", str(epochs), "--warmup-epochs", "1",
           "--epoch-images", str(images), "--out", str(out), "--force"]
    if model == "cnn":
        cmd += ["--loss", "mse"]  # the study's timing runs, and the TF rebuild's loss
    if compiled:
        cmd.append("--compile")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["results"]
    return {r["batch_size"]: (r["epoch_time"]["median"] / (images // r["batch_size"]), r["step_time"]["median"])
            for r in rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tf-python", required=True, help="python of an environment with benchmarks/tf_reference/requirements.txt")
    p.add_argument("--models", default="cnn,bnn")
    p.add_argument("--cnn-batch-sizes", default="2,8,32,128")
    p.add_argument("--bnn-batch-sizes", default="2,8,32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per run, after one warm-up epoch")
    p.add_argument("--epoch-images", type=int, default=1000)
    p.add_argument("--compile", action="store_true", help="also time cosmolit with torch.compile")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if not Path(a.tf_python).exists():
        p.error(f"--tf-python {a.tf_python} does not exist; create the TF environment first (see this file's docstring)")
    models = [m for m in a.models.split(",") if m]
    if not models or set(models) - {"cnn", "bnn"}:
        p.error(f"--models must be cnn, bnn or both, got {a.models!r}")
    batches = {"cnn": _ints(a.cnn_batch_sizes), "bnn": _ints(a.bnn_batch_sizes)}
    if a.rounds < 1 or a.epochs < 1 or a.epoch_images < max(max(batches[m]) for m in models):
        p.error("--rounds and --epochs must be positive and --epoch-images at least the largest batch size")
    sides = ["tf", "eager"] + (["compiled"] if a.compile else [])
    # times[model][side][batch] = [(epoch-based, steps-alone) seconds per step, one per round]
    times = {m: {s: {b: [] for b in batches[m]} for s in sides} for m in models}
    tf_env = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(a.rounds):
            for m in models:
                for side in sides:
                    out = tmp / f"{m}_{side}_{r}.json"
                    if side == "tf":
                        got = run_tf(a.tf_python, m, batches[m], a.epochs, a.epoch_images, out)
                        tf_env = json.loads(out.read_text())["environment"]
                    else:
                        got = run_cosmolit(m, batches[m], a.epochs, a.epoch_images, side == "compiled", out)
                    for b, t in got.items():
                        times[m][side][b].append(t)
                    print(f"round {r + 1} {m} {side:8s} " + "  ".join(
                        f"b{b} {t[0] * 1e3:.1f} ms (steps alone {t[1] * 1e3:.1f})" for b, t in got.items()), flush=True)
    import torch

    from cosmolit.bench.env import cpu_model

    table = []
    for m in models:
        for b in batches[m]:
            row = {"model": m, "batch_size": b}
            for s in sides:
                row[f"{s}_ms"] = statistics.median(t[0] for t in times[m][s][b]) * 1e3
                row[f"{s}_ms_rounds"] = [t[0] * 1e3 for t in times[m][s][b]]
                row[f"{s}_step_alone_ms_rounds"] = [t[1] * 1e3 for t in times[m][s][b]]
            for s in sides[1:]:
                row[f"tf_over_{s}"] = statistics.median(t[0] / c[0] for t, c in zip(times[m]["tf"][b], times[m][s][b]))
            table.append(row)
    head = "| network | batch | TF (ms/step) | " + " | ".join(f"cosmolit {s}" for s in sides[1:]) + " | " + \
           " | ".join(f"TF / {s}" for s in sides[1:]) + " |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(sides) - 1))
    for row in table:
        cells = [row["model"], str(row["batch_size"]), f"{row['tf_ms']:.1f}"]
        cells += [f"{row[f'{s}_ms']:.1f}" for s in sides[1:]] + [f"{row[f'tf_over_{s}']:.2f}" for s in sides[1:]]
        print("| " + " | ".join(cells) + " |")
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "tf": tf_env}
    Path(a.out).write_text(json.dumps({"schema": "cosmolit-vs-tf/1", "rounds": a.rounds, "epochs": a.epochs,
                                       "epoch_images": a.epoch_images, "environment": env, "table": table}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
