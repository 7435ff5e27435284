#!/usr/bin/env python
"""Reproduce the study's IPU measurements (Arcelin 2021, arXiv:2106.02465) on a real Graphcore IPU machine.

Needs the pinned stack (Python 3.10, torch 2.0.1, pytorch-lightning 2.0.9; constraints/ipu.txt),
poptorch from the Poplar SDK 3.3/3.4 (`source enable.sh`) and physical IPUs. Measures:

- training of the deterministic shape CNN, batch 2 to 14, and of the Pyro BNN, batch 2 to 8
  (median step time after a warm-up epoch, converted to the study's seconds per 100 epochs of
  8000 images);
- generation with the VAE decoder, 1 to 5000 images per call (one compiled graph per size).

Results are written in `cosmolit bench`'s JSON format (cosmolit.bench.results, schema cosmolit-bench/1),
one file per kind, so `cosmolit bench plot` reads them beside CPU and GPU runs.

    python benchmarks/ipu/run_ipu_bench.py --out runs/ipu-bench
    python benchmarks/ipu/run_ipu_bench.py --dry-run          # parse, validate and print the plan only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_BATCHES = {"cnn": "2,4,6,8,10,12,14", "bnn": "2,4,6,8"}
DEFAULT_GENERATE = "1,10,100,1000,5000"


def _ints(text: str, what: str) -> list:
    from cosmolit.cli._app import parse_int_list

    return parse_int_list(text, what)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("train", "generate", "all"), default="all")
    p.add_argument("--models", default="cnn,bnn", help="training benchmarks to run (cnn, bnn)")
    p.add_argument("--cnn-batch-sizes", default=DEFAULT_BATCHES["cnn"])
    p.add_argument("--bnn-batch-sizes", default=DEFAULT_BATCHES["bnn"])
    p.add_argument("--generate-sizes", default=DEFAULT_GENERATE, help="images per generation call")
    p.add_argument("--n-train", type=int, default=1600, help="synthetic training stamps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs (the first is warm-up and compilation)")
    p.add_argument("--repeats", type=int, default=20, help="timed generation calls per size")
    p.add_argument("--device-iterations", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1, help="IPUs (data-parallel replicas)")
    p.add_argument("--precision", default="32-true", choices=("32-true", "16-mixed"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/ipu-bench"))
    p.add_argument("--force", action="store_true", help="overwrite existing result files")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and print the plan; no IPU needed")
    args = p.parse_args(argv)
    from cosmolit.errors import UsageError

    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in DEFAULT_BATCHES]
    if bad:
        raise UsageError(f"--models: unknown {bad[0]!r}; choose from cnn, bnn")
    args.models = models
    args.batches = {"cnn": _ints(args.cnn_batch_sizes, "--cnn-batch-sizes"),
                    "bnn": _ints(args.bnn_batch_sizes, "--bnn-batch-sizes")}
    args.generate = _ints(args.generate_sizes, "--generate-sizes")
    for name in ("n_train", "epochs", "repeats", "device_iterations", "replicas"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.epochs < 2:
        raise UsageError("--epochs must be at least 2 (the first one compiles and is not timed)")
    return args


def plan(args) -> list:
    steps = []
    if args.what in ("train", "all"):
        steps += [f"train {m} batch {b}" for m in args.models for b in args.batches[m]]
    if args.what in ("generate", "all"):
        steps += [f"generate {n} images" for n in args.generate]
    return steps


def _ipu_options(args):
    from cosmolit.backends import IPUOptions

    return IPUOptions(device_iterations=args.device_iterations, replication_factor=args.replicas,
                      precision=args.precision, seed=args.seed)


def bench_train(kind: str, batch: int, args) -> dict:
    import numpy as np
    import pytorch_lightning as pl
    import torch

    from cosmolit.backends import trainer_kwargs
    from cosmolit.cli.ipu import build_model
    from cosmolit.bench.callbacks import TimingCallback, images_per_second, study_seconds

    pl.seed_everything(args.seed)
    model = build_model(kind, train_size=args.n_train)
    rng = np.random.default_rng(args.seed)
    n_targets = max(1, len(model.hparams.get("targets", []) or []))
    x = torch.from_numpy(rng.gamma(2.0, 40.0, size=(args.n_train, 6, 64, 64)).astype(np.float32))  # (N, 6, 64, 64)
    y = torch.from_numpy(rng.uniform(0.05, 0.6, size=(args.n_train, n_targets)).astype(np.float32))  # (N, T)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True,
                                         drop_last=True, generator=torch.Generator().manual_seed(args.seed))
    timer = TimingCallback(warmup_epochs=1, steps_per_call=args.device_iterations, sync=False)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[timer], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         **trainer_kwargs("ipu", args.replicas, args.precision, args.seed, ipu=_ipu_options(args)))
    trainer.fit(model, loader)
    summary = timer.summary()
    step = summary["step"]
    # one optimizer step consumes batch x replicas samples
    samples = batch * args.replicas
    return {"model": kind, "batch_size": batch, "mode": "ipu-lightning", "step_time": step,
            "images_per_second": images_per_second(step["median"], samples),
            "seconds_per_100_epochs": study_seconds(step["median"], samples),
            "steps_timed": step["n"], "device_iterations": args.device_iterations}


def bench_generate(n: int, args) -> dict:
    import poptorch
    import torch

    from cosmolit.cli.ipu import build_model
    from cosmolit.backends.ipu import poptorch_options
    from cosmolit.bench.callbacks import images_per_second, summarize

    vae = build_model("vae").eval()

    class Sampler(torch.nn.Module):
        """forward(dummy (n, 1)) -> n images decoded from N(0, I) latents drawn on the IPU."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, dummy):
            return self.vae.sample(dummy.shape[0], from_flow=False)

    opts = poptorch_options(_ipu_options(args), training=False, seed=args.seed)
    model = poptorch.inferenceModel(Sampler(vae), opts)
    dummy = torch.zeros(n * args.device_iterations * args.replicas, 1)
    model(dummy)  # compile + first run, not timed
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model(dummy)
        times.append((time.perf_counter() - t0) / args.device_iterations)
    model.destroy()
    stats = summarize(times)
    return {"n": n, "time": stats, "images_per_second": images_per_second(stats["median"], n * args.replicas),
            "mode": "ipu-poptorch", "repeats": args.repeats}


def main(argv=None) -> int:
    from cosmolit.errors import CosmolitError

    try:
        args = parse_args(argv)
        steps = plan(args)
        print(f"IPU benchmark plan ({len(steps)} runs, {args.replicas} IPU(s), device_iterations "
              f"{args.device_iterations}, {args.precision}):")
        for s in steps:
            print(f"  {s}")
        if args.dry_run:
            return 0
        from cosmolit.backends import check_ipu_stack
        from cosmolit.bench.env import capture_environment
        from cosmolit.bench.results import make_payload, write_results

        poptorch = check_ipu_stack()
        if not poptorch.ipuHardwareIsAvailable():
            raise CosmolitError("no IPU is attached (poptorch.ipuHardwareIsAvailable() is False)")
        args.out.mkdir(parents=True, exist_ok=True)
        env = capture_environment("ipu", args.precision, "ipu", replicas=args.replicas,
                                  device_iterations=args.device_iterations,
                                  poptorch=getattr(poptorch, "__version__", "?"))
        settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
        if args.what in ("train", "all"):
            rows = [bench_train(m, b, args) for m in args.models for b in args.batches[m]]
            write_results(args.out / "ipu_train.json", make_payload("train", rows, env, settings, "cosmolit ipu"),
                          force=args.force)
        if args.what in ("generate", "all"):
            rows = [bench_generate(n, args) for n in args.generate]
            write_results(args.out / "ipu_generate.json", make_payload("generate", rows, env, settings, "cosmolit ipu"),
                          force=args.force)
        print(f"results written to {args.out}")
        return 0
    except CosmolitError as exc:
        print(f"run_ipu_bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
