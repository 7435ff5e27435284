"""Overheads of cosmolit measured side by side in one run (the same as `cosmolit bench overhead`).

    python benchmarks/bench_overhead.py --out runs/overhead.json [--accelerator cpu] [--threads 2]

1. whole epochs of cosmolit's Lightning fit vs whole epochs of a bare PyTorch loop over the same
   DataLoader, with the same network and optimizer, at batch 2 and --batch-size (goal <= 1.10x at
   batch 32 on CPU);
2. the Pyro BNN step vs the hand-written reparameterised plain-torch BNN (goal <= 1.2x);
3. model FLOP/s (counted from conv / linear shapes) vs a dense matmul on the same machine (MFU),
   and the study's TensorFlow 2-core figures at the same batch;
4. with --parts ...,malloc: glibc's default malloc vs freed memory retained (cosmolit.backends.memory).
Prints one line per figure and writes a cosmolit-bench/1 JSON file (kind "overhead").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from cosmolit.errors import CosmolitError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bnn-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed steps per round and side")
    p.add_argument("--epoch-images", type=int, default=256, help="lightning: images of the timed epoch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--matmul-size", type=int, default=1024)
    p.add_argument("--parts", default="lightning,pyro,mfu")
    p.add_argument("--out", type=Path, default=Path("runs/overhead.json"))
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        from cosmolit.bench.overhead import OverheadConfig, run_overhead_bench
        from cosmolit.bench.results import write_results
        from cosmolit.dataset import check_output_path

        check_output_path(args.out, force=args.force, what="results file")
        try:
            cfg = OverheadConfig(accelerator=args.accelerator, batch_size=args.batch_size,
                                 bnn_batch_size=args.bnn_batch_size, steps=args.steps, epoch_images=args.epoch_images,
                                 rounds=args.rounds, threads=args.threads, matmul_size=args.matmul_size,
                                 parts=[s.strip() for s in args.parts.split(",") if s.strip()])
        except ValueError as exc:
            raise CosmolitError(str(exc)) from None
        from cosmolit.backends.memory import retain_freed_memory

        retain_freed_memory()  # as the cosmolit command does at start-up
        payload = run_overhead_bench(cfg)
        write_results(args.out, payload, force=args.force)
    except CosmolitError as exc:
        print(f"bench_overhead: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
