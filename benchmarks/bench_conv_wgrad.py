"""The convolution weight gradient as one matrix product (cosmolit.nn.conv) against oneDNN's, on CPU.

Two parts, in one process, reporting medians:
- layers: for each convolution of the shape trunk, oneDNN's `aten.convolution_backward` (weight
  and bias gradients, channels-last tensors, as in a compiled step) against
  `conv2d_weight_grad` + a bias sum compiled as they are in a compiled step (Inductor fuses the
  patch copy into one kernel), per batch size;
- step: the compiled training step of the shape CNN (MSE, the study's timing loss, cosmolit's
  Adam) with the trunk's convolutions as torch's nn.Conv2d against cosmolit's Conv2d, rounds
  alternating (cosmolit.bench.overhead's bare loop); prints the median of per-round ratios of the
  median step times (above 1: cosmolit's Conv2d is faster).

    python benchmarks/bench_conv_wgrad.py --batch-sizes 2,8,32 --rounds 8
"""
from __future__ import annotations

import argparse
import statistics


def _median_ms(fn, n: int) -> float:
    from cosmolit.bench.overhead import call_times

    return statistics.median(call_times(fn, n, warmup=3)) * 1e3


def layers(batch: int, repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    from cosmolit.nn.conv import ROWS_PER_FILTER, conv2d_weight_grad

    def weight_and_bias_grad(g, x, stride):
        return conv2d_weight_grad(g, x, 3, stride, 1), g.sum((0, 2, 3))

    print(f"batch {batch}: weight + bias gradient, ms (median of {repeats})")
    c_in, size = 6, 64
    for f in (32, 64, 128, 256):
        for stride in (1, 2):
            c = c_in if stride == 1 else f
            x = torch.randn(batch, c, size, size).contiguous(memory_format=torch.channels_last)
            w = torch.randn(f, c, 3, 3).contiguous(memory_format=torch.channels_last)
            g = F.conv2d(x, w, None, stride, 1).contiguous(memory_format=torch.channels_last)
            torch._dynamo.reset()  # each layer compiles its own graph, as in a compiled step
            product_grad = torch.compile(weight_and_bias_grad, dynamic=False)
            args = ([stride, stride], [1, 1], [1, 1], False, [0, 0], 1, [False, True, True])
            onednn = _median_ms(lambda: torch.ops.aten.convolution_backward(g, x, w, [f], *args), repeats)
            product = _median_ms(lambda: product_grad(g, x, stride), repeats)
            rows = batch * g.shape[-1] * g.shape[-2]
            chosen = "product" if rows <= ROWS_PER_FILTER * f else "oneDNN"
            print(f"  {c:4d} -> {f:4d} stride {stride}, {g.shape[-1]:2d}x{g.shape[-1]:<2d} outputs: oneDNN {onednn:6.3f}"
                  f"  product {product:6.3f}  oneDNN / product {onednn / product:5.2f}  (cosmolit: {chosen})")
            if stride == 2:
                size //= 2
        c_in = f


def step(batch: int, steps: int, rounds: int) -> None:
    import torch
    from torch import nn

    from cosmolit.bench.overhead import _side_by_side, time_loop
    from cosmolit.bench.train import build_bench_model, loss_function, model_optimizer, synthetic_pool
    from cosmolit.nn.conv import Conv2d

    x, y = synthetic_pool(4 * batch, 6, 64, 3, 0)
    batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(4)]
    sides = []
    for side in ("torch", "cosmolit"):
        torch.manual_seed(0)
        model = build_bench_model("cnn", loss="mse")
        if side == "torch":
            for m in model.modules():
                if type(m) is Conv2d:
                    m.__class__ = nn.Conv2d  # same parameters, torch's forward and backward
        model.compile_network(True, echo=lambda s: None)
        loss_fn, opt = loss_function(model.train()), model_optimizer(model)
        time_loop(loss_fn, opt, batches, steps=1, warmup=10, device=None)  # compiles, warms up
        sides.append(lambda loss_fn=loss_fn, opt=opt: time_loop(loss_fn, opt, batches, steps, 3, None))
    res = _side_by_side(*sides, rounds)
    ratios = res["round_ratios"]
    print(f"batch {batch}: compiled step, ms per step (median of {rounds} rounds of {steps}): torch's Conv2d "
          f"{res['a']['median'] * 1e3:.2f}, cosmolit's {res['b']['median'] * 1e3:.2f}; torch / cosmolit "
          f"{res['median_round_ratio']:.3f} (rounds {min(ratios):.2f} to {max(ratios):.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="2,8,32")
    p.add_argument("--parts", default="layers,step", help="layers, step or both")
    p.add_argument("--rounds", type=int, default=8, help="step: alternating rounds")
    p.add_argument("--steps", type=int, default=0, help="step: timed steps per round (default 80 / batch, at least 4)")
    p.add_argument("--repeats", type=int, default=30, help="layers: timed calls per layer and side")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from cosmolit.backends.memory import retain_freed_memory

    retain_freed_memory()  # as the cosmolit command does
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    parts = args.parts.split(",")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        if "layers" in parts:
            layers(batch, args.repeats)
        if "step" in parts:
            step(batch, args.steps or max(4, 80 // batch), args.rounds)


if __name__ == "__main__":
    main()
