"""torch.compile against eager for one training step of the shape CNN, the BNN or the VAE, side by side.

Two copies of the model (same initial weights), one with `compile_network`, trained on the same
synthetic batches; their steps alternate (eager, compiled, eager, ...) so that the load of a
shared machine falls on both alike. Prints the median step time of each and their ratio.

    python benchmarks/bench_compile.py --model cnn --batch-sizes 8,32,128 --steps 20 [--out r.json] [--system-malloc]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    import torch

    from cosmolit.backends.memory import malloc_mode, retain_freed_memory
    from cosmolit.bench.train import build_bench_model, loss_function, model_optimizer, synthetic_pool

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", choices=["cnn", "bnn", "vae"])
    ap.add_argument("--batch-sizes", default="8,32,128")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loss", default=None, help="cnn: mse, nll or decoupled (default: the bench's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--system-malloc", action="store_true", help="keep glibc's defaults (the cosmolit command retains freed memory)")
    args = ap.parse_args()
    if not args.system_malloc:
        retain_freed_memory()  # as the cosmolit command does
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        sides = []
        for compiled in (False, True):
            torch.manual_seed(0)
            model = build_bench_model(args.model, args.loss)
            model.train()
            if compiled:
                model.compile_network(True, print)
            sides.append((model, model_optimizer(model), loss_function(model)))
        x, y = synthetic_pool(max(64, batch), 6, 64, 3, seed=0)
        gen = torch.Generator().manual_seed(0)
        times = ([], [])
        t_first = [0.0, 0.0]
        for i in range(args.warmup + args.steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            xb = x[idx]
            yb = xb if args.model == "vae" else y[idx]  # the VAE's target: the stamp itself
            for k, (model, opt, loss_fn) in enumerate(sides):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_fn(xb, yb).backward()
                opt.step()
                dt = time.perf_counter() - t0
                if i == 0:
                    t_first[k] = dt
                if i >= args.warmup:
                    times[k].append(dt)
        eager, comp = (statistics.median(t) for t in times)
        row = {"model": args.model, "batch_size": batch, "eager_ms": eager * 1e3, "compiled_ms": comp * 1e3,
               "eager_over_compiled": eager / comp, "first_step_s": {"eager": t_first[0], "compiled": t_first[1]},
               "compile_status": sides[1][0].compile_status(), "steps": args.steps,
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "malloc": malloc_mode()}
        rows.append(row)
        print(f"{args.model} batch {batch:>3}: eager {eager * 1e3:7.1f} ms, compiled {comp * 1e3:7.1f} ms, "
              f"eager / compiled {eager / comp:.2f} (first compiled step {t_first[1]:.0f} s, {row['compile_status']})",
              flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
