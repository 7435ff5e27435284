"""`cosmolit fit`'s step with and without static-graph mode, side by side in one process.

Lightning's automatic optimization (one optimizer step per Lightning step) against the
static-graph step (cosmolit.backends.static through CosmolitModule.enable_static_graph: K optimizer
steps per Lightning step). On a GPU the static step replays a CUDA graph; on a CPU it runs the same
code path eager, so there the comparison shows what K device iterations save of Lightning's per-step
overhead. Rounds alternate the two sides; reported per optimizer step.

    python benchmarks/bench_static_fit.py --model cnn --batch-sizes 2,32 --k 1,8 --rounds 4
    python benchmarks/bench_static_fit.py --accelerator gpu --batch-sizes 2,12 --k 1,8
"""

from __future__ import annotations

import argparse
import json
import sys

from cosmolit.backends.memory import retain_freed_memory


def main(argv=None) -> int:
    retain_freed_memory()  # host memory as the cosmolit command sets it
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", choices=["cnn", "bnn"])
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--batch-sizes", default="2,32")
    p.add_argument("--k", default="1,8", help="device iterations of the static side")
    p.add_argument("--steps", type=int, default=48, help="timed optimizer steps per side and round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)

    from cosmolit.bench.overhead import _side_by_side
    from cosmolit.bench.train import TrainBenchConfig, time_training_raw

    def side(batch: int, k: int):
        static = k > 0
        cfg = TrainBenchConfig(model=a.model, accelerator=a.accelerator, batch_sizes=[batch],
                               steps=max(1, a.steps // max(k, 1)), warmup_steps=2, static_graph=static,
                               device_iterations=max(k, 1), loss="mse" if a.model == "cnn" else None)
        return lambda: time_training_raw(cfg, batch, echo=lambda m: None)[1]

    rows = []
    for batch in [int(b) for b in a.batch_sizes.split(",")]:
        for k in [int(k) for k in a.k.split(",")]:
            res = _side_by_side(side(batch, 0), side(batch, k), a.rounds)
            rows.append({"model": a.model, "batch": batch, "k": k, "lightning_ms": res["a"]["median"] * 1e3,
                         "static_ms": res["b"]["median"] * 1e3, "ratio": res["median_round_ratio"],
                         "round_ratios": res["round_ratios"]})
            r = rows[-1]
            print(f"{a.model} batch {batch:4d} K={k}: Lightning {r['lightning_ms']:8.2f} ms/step, static-graph step "
                  f"{r['static_ms']:8.2f} ms/step, Lightning / static {r['ratio']:.3f} "
                  f"(rounds {min(r['round_ratios']):.2f} to {max(r['round_ratios']):.2f})", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
