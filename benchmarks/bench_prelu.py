"""torch's PReLU backward against cosmolit's CPU backward (cosmolit.nn.trunk._CPUPReLU), side by side.

1. The trunk's eight PReLUs alone: forward + backward of torch._prelu_kernel and of _CPUPReLU on
   each feature-map shape at --batch, alternating in rounds; the minimum over rounds of the median
   of 40 calls.
2. With --step: the shape CNN's training step (bare loop, MSE, Adam; --model bnn for the BNN's ELBO)
   with each backward, two copies of the model with the same weights, rounds alternating.

    python benchmarks/bench_prelu.py --batch 2
    python benchmarks/bench_prelu.py --batch 32 --step --rounds 4
"""

from __future__ import annotations

import argparse
import statistics

import torch

from cosmolit.backends.memory import retain_freed_memory

SHAPES = [(32, 64), (32, 32), (64, 32), (64, 16), (128, 16), (128, 8), (256, 8), (256, 4)]  # (C, H = W)


def _median_ms(fn, calls: int = 40) -> float:
    from cosmolit.bench.overhead import call_times

    return statistics.median(call_times(fn, calls, warmup=5)) * 1e3


def layers(batch: int, rounds: int) -> None:
    from cosmolit.nn.trunk import _CPUPReLU

    total = {"torch": 0.0, "cosmolit": 0.0}
    for c, h in SHAPES:
        x = torch.randn(batch, c, h, h, requires_grad=True)
        a = torch.full((c, h, h), 0.25, requires_grad=True)
        g = torch.randn(batch, c, h, h)
        fns = {"torch": lambda: torch.autograd.grad(torch._prelu_kernel(x, a), (x, a), g),
               "cosmolit": lambda: torch.autograd.grad(_CPUPReLU.apply(x, a), (x, a), g)}
        best = {k: min(_median_ms(f) for _ in range(rounds)) for k, f in fns.items()}
        for k, v in best.items():
            total[k] += v
        print(f"{batch} x {c} x {h} x {h}: torch {best['torch']:.3f} ms, cosmolit {best['cosmolit']:.3f} ms")
    print(f"all eight, forward + backward: torch {total['torch']:.2f} ms, cosmolit {total['cosmolit']:.2f} ms, "
          f"ratio {total['torch'] / total['cosmolit']:.2f}")


def step(model_kind: str, batch: int, rounds: int) -> None:
    """Whole training steps with each backward, through cosmolit.bench.overhead's bare loop and its
    alternating rounds (the order swapped every round)."""
    import cosmolit.nn.trunk as trunk
    from cosmolit.bench.overhead import _side_by_side, time_loop
    from cosmolit.bench.train import build_bench_model, loss_function, model_optimizer, synthetic_pool

    custom = trunk._CPUPReLU

    class TorchBackward:
        @staticmethod
        def apply(x, a):
            return torch._prelu_kernel(x, a)

    x, y = synthetic_pool(2 * batch, 6, 64, 3, 0)
    batches = [(x[:batch], y[:batch]), (x[batch:], y[batch:])]

    def side(backward):
        torch.manual_seed(0)
        model = build_bench_model(model_kind, loss="mse" if model_kind == "cnn" else None).train()
        loss_fn, opt = loss_function(model), model_optimizer(model)

        def run() -> list[float]:
            trunk._CPUPReLU = backward
            try:
                return time_loop(loss_fn, opt, batches, steps=10, warmup=3, device=None)
            finally:
                trunk._CPUPReLU = custom

        return run

    res = _side_by_side(side(TorchBackward), side(custom), rounds)
    print(f"{model_kind} training step, batch {batch}: torch's backward {res['a']['median'] * 1e3:.2f} ms, "
          f"cosmolit's {res['b']['median'] * 1e3:.2f} ms; torch / cosmolit {res['ratio']:.3f}, per round "
          + ", ".join(f"{r:.3f}" for r in res["round_ratios"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step", action="store_true", help="also time whole training steps")
    p.add_argument("--model", choices=("cnn", "bnn"), default="cnn", help="network of --step")
    a = p.parse_args(argv)
    if a.batch < 1 or a.rounds < 1 or a.threads < 1:
        p.error("--batch, --rounds and --threads must be positive")
    retain_freed_memory()
    torch.set_num_threads(a.threads)
    layers(a.batch, a.rounds)
    if a.step:
        step(a.model, a.batch, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
