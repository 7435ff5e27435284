"""oneDNN convolutions (torch's default on CPU) against torch's native CPU convolutions
(torch.backends.mkldnn disabled) in a bare training loop of the shape CNN (MSE, the study's timing
loss, Adam), on synthetic stamps; rounds of the two alternate in one process, medians of the steps.

    python benchmarks/bench_conv_backend.py --batch-sizes 2,8,32 --rounds 4 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="2,8,32")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and side (after 3 untimed)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from cosmolit.backends.memory import retain_freed_memory
    from cosmolit.bench.train import build_bench_model, loss_function, model_optimizer, synthetic_pool

    retain_freed_memory()  # as the cosmolit command does
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; ms per training step, median")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        pool = max(64, 2 * batch)
        x, y = synthetic_pool(pool, 6, 64, 3, 0)
        torch.manual_seed(0)
        model = build_bench_model("cnn", loss="mse").train()
        loss_fn, opt = loss_function(model), model_optimizer(model)

        def step(i: int) -> None:
            start = (i * batch) % (pool - batch + 1)
            opt.zero_grad(set_to_none=True)
            loss_fn(x[start:start + batch], y[start:start + batch]).backward()
            opt.step()

        times: dict[str, list[float]] = {"oneDNN": [], "native": []}
        for _ in range(args.rounds):
            for side in times:
                with torch.backends.mkldnn.flags(enabled=side == "oneDNN"):
                    for i in range(3):
                        step(i)
                    for i in range(args.steps):
                        t0 = time.perf_counter()
                        step(i)
                        times[side].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"batch {batch}: oneDNN {med['oneDNN']:.1f}, native {med['native']:.1f}, "
              f"native / oneDNN {med['native'] / med['oneDNN']:.2f}", flush=True)


if __name__ == "__main__":
    main()
