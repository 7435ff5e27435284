"""Overheads measured side by side in one run (`cosmolit bench overhead`, benchmarks/bench_overhead.py).

1. Lightning: whole epochs of Lightning's fit (as `cosmolit bench train --mode lightning --epochs 1
   --warmup-epochs 1`: data fetching and transfer, the step, the module's batch-end work, logging
   every `log_every_n_steps`, the loop's bookkeeping) vs whole epochs of a bare PyTorch loop over
   the same DataLoader, with the same network, initial weights and Adam, at batch 2 and
   `batch_size` (goal <= 1.10x at batch 32 on CPU).
2. Pyro: the Pyro BNN step (graph-safe ELBO from effect handlers) vs the hand-written
   reparameterised plain-torch BNN of cosmolit.nn.bayes (goal <= 1.2x).
3. Arithmetic: model FLOPs counted analytically from the conv / linear shapes met in a forward
   pass (x3 for a training step), the achieved FLOP/s of the bare loop, and the FLOP/s of a
   dense fp32 matmul on the same machine: model-FLOPs utilisation (MFU).
4. The study's TensorFlow networks on a 2-core CPU (reference.TF_CPU_STEP) at the same batch.
5. malloc (CPU): the bare CNN loop under glibc's default malloc vs with freed memory retained
   (cosmolit.backends.memory), at batch 2 and at `batch_size`, each side in a fresh process;
   the ratio is the speed-up.

The two sides of each ratio run in alternating rounds, so that a change of machine load hits
both; each side's figure is the median over all its timed steps, and the ratio is also given
as the median of the per-round ratios (for Lightning, the ratio is that median, with its range).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from cosmolit.backends import make_adam
from cosmolit.errors import UsageError


OVERHEAD_PARTS = ("lightning", "pyro", "mfu", "malloc", "compile")


@dataclass
class OverheadConfig:
    """The `overhead:` section of configs/bench.yaml."""

    accelerator: str = "cpu"
    batch_size: int = 32
    bnn_batch_size: int = 32
    steps: int = 8  # timed steps per round and side
    epoch_images: int = 256  # lightning: images of the timed epoch (and of the warm-up epoch) per round and side
    warmup_steps: int = 2
    rounds: int = 3
    threads: Optional[int] = None
    matmul_size: int = 1024
    parts: list[str] = field(default_factory=lambda: ["lightning", "pyro", "mfu"])
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "bnn_batch_size", "steps", "epoch_images", "rounds", "matmul_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        bad = [p for p in self.parts if p not in OVERHEAD_PARTS]
        if bad or not self.parts:
            raise ValueError(f"parts {bad or self.parts} not allowed; choose among {', '.join(OVERHEAD_PARTS)}")
        if "lightning" in self.parts and self.epoch_images < self.batch_size:
            raise ValueError(f"epoch_images {self.epoch_images} is smaller than one batch of {self.batch_size}; "
                             "give at least batch_size images")


# ---------------------------------------------------------------------------- FLOPs
def count_forward_flops(module, *inputs) -> int:
    """FLOPs (2 per multiply-add) of the conv, transposed-conv and linear layers in one forward pass.

    Counted from shapes with forward hooks: conv = 2 x out.numel x (C_in / groups) x kh x kw,
    transposed conv = 2 x in.numel x (C_out / groups) x kh x kw, linear = 2 x out.numel x in_features.
    Works through torch.func.functional_call (the BNN), which still calls each module.
    """
    import math

    import torch
    from torch import nn

    total = [0]

    def hook(mod, args, out):
        if isinstance(mod, nn.ConvTranspose2d):
            k = math.prod(mod.kernel_size)
            total[0] += 2 * args[0].numel() * (mod.out_channels // mod.groups) * k
        elif isinstance(mod, nn.Conv2d):
            k = math.prod(mod.kernel_size)
            total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * k
        elif isinstance(mod, nn.Linear):
            total[0] += 2 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return int(total[0])


def matmul_flops(size: int = 1024, repeats: int = 10, device=None) -> dict:
    """Achieved fp32 FLOP/s of a dense (size x size) @ (size x size) matmul: median of `repeats`."""
    import torch

    from cosmolit.bench.callbacks import summarize

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device or "cpu")
    b = torch.randn(size, size, generator=gen).to(device or "cpu")
    stats = summarize(call_times(lambda: torch.mm(a, b), repeats, warmup=1, device=device))
    return {"flops_per_s": 2.0 * size**3 / stats["median"], "time": stats}


# ---------------------------------------------------------------------------- timing helpers
def call_times(fn: Callable, calls: int, warmup: int = 1, device=None) -> list[float]:
    """Times [s] of `calls` calls of fn() after `warmup` untimed ones, synchronising `device`
    (a CUDA device; nothing on CPU) around each."""
    from cosmolit.bench.callbacks import synchronize

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times

def time_loop(loss_fn: Callable, optimizer, batches: list, steps: int, warmup: int, device) -> list[float]:
    """Step times [s] of a bare loop (zero_grad, loss, backward, step) cycling over on-device batches."""
    from cosmolit.bench.callbacks import StepClock

    clock = StepClock(warmup=warmup, device=device)
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        clock.start()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        clock.stop()
    return clock.times


def time_epochs(loss_fn: Callable, optimizer, loader, epochs: int, warmup: int,
                device) -> tuple[list[float], list[int]]:
    """Times [s] of whole epochs of a bare loop over `loader` (fetch, transfer to `device`, zero_grad,
    loss, backward, step) after `warmup` untimed ones, and the steps of every epoch, warm-up included."""
    from cosmolit.bench.callbacks import StepClock

    clock = StepClock(warmup=warmup, device=device)
    counts = []
    for _ in range(warmup + epochs):
        clock.start()
        n = 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(x, y)
            loss.backward()
            optimizer.step()
            n += 1
        clock.stop()
        counts.append(n)
    return clock.times, counts


def _row(name: str, value: float, unit: str, **extra) -> dict:
    row = {"name": name, "value": float(value), "unit": unit}
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def _side_by_side(run_a: Callable[[], list[float]], run_b: Callable[[], list[float]], rounds: int) -> dict:
    """Alternate a, b for `rounds`; medians over all steps and the median of per-round ratios."""
    import numpy as np

    from cosmolit.bench.callbacks import summarize

    all_a, all_b, ratios = [], [], []
    for r in range(rounds):
        first, second = (run_a, run_b) if r % 2 == 0 else (run_b, run_a)
        t1 = first()
        t2 = second()
        ta, tb = (t1, t2) if r % 2 == 0 else (t2, t1)
        all_a += ta
        all_b += tb
        ratios.append(float(np.median(ta)) / float(np.median(tb)))
    sa, sb = summarize(all_a), summarize(all_b)
    return {"a": sa, "b": sb, "ratio": sa["median"] / sb["median"], "round_ratios": ratios,
            "median_round_ratio": float(np.median(ratios))}


# ---------------------------------------------------------------------------- the parts
def lightning_overhead(cfg: OverheadConfig, device, echo, factory: Optional[Callable] = None) -> list[dict]:
    """Whole epochs of Lightning's fit vs whole epochs of a bare loop, same cnn (same initial weights),
    DataLoader and Adam, at batch 2 and cfg.batch_size, alternating rounds. Each round and side
    builds a fresh model and runs one untimed warm-up epoch, then one timed epoch of
    cfg.epoch_images images; the ratio is the median of the per-round ratios."""
    import pytorch_lightning as pl

    from cosmolit.bench.train import (TrainBenchConfig, _loader, _n_targets, _quiet_lightning, build_bench_model,
                                      loss_function, model_optimizer, synthetic_pool, time_training_raw)

    rows = []
    for b in sorted({2, cfg.batch_size}):
        tcfg = TrainBenchConfig(model="cnn", accelerator=cfg.accelerator, batch_sizes=[b], steps=None, epochs=1,
                                warmup_epochs=1, epoch_images=cfg.epoch_images, seed=cfg.seed)
        steps = {"a": [], "b": []}  # optimizer steps of each round (warm-up and timed epoch)

        def fit_epoch():
            row = time_training_raw(tcfg, b, echo, factory)[0]
            steps["a"].append(row["steps_timed"])  # the timer counts the steps of both epochs
            return [row["epoch_time"]["median"]]

        def bare_epoch():
            with _quiet_lightning():
                pl.seed_everything(tcfg.seed)  # as time_training_raw: the same initial weights
            model = build_bench_model("cnn", None, tcfg.bands, tcfg.stamp, tcfg.epoch_images, factory)
            model = model.to(device).train()
            x, y = synthetic_pool(tcfg.pool, len(tcfg.bands), tcfg.stamp, _n_targets(model), tcfg.seed)
            loader = _loader(x, y, b, tcfg.epoch_images, tcfg.seed)
            times, counts = time_epochs(loss_function(model), model_optimizer(model), loader, tcfg.epochs,
                                        tcfg.warmup_epochs, device)
            steps["b"].append(sum(counts))
            return times

        res = _side_by_side(fit_epoch, bare_epoch, cfg.rounds)
        ratios = res["round_ratios"]
        n = cfg.epoch_images // b  # steps per epoch (the loader drops an incomplete last batch)
        goal = 1.10 if b == 32 else None
        echo(f"Lightning fit vs bare loop, cnn batch {b}, epochs of {n * b} images: {res['a']['median']:.3f} vs "
             f"{res['b']['median']:.3f} s/epoch, ratio {res['median_round_ratio']:.3f} (median of per-round ratios, "
             f"range {min(ratios):.3f}-{max(ratios):.3f})" + ("; goal <= 1.10" if goal else ""))
        rows += [
            _row(f"lightning_epoch_over_bare_cnn_b{b}", res["median_round_ratio"], "x", a=res["a"], b=res["b"],
                 batch_size=b, goal=goal, round_ratios=ratios, range=[min(ratios), max(ratios)],
                 epoch_images=n * b, a_steps=steps["a"], b_steps=steps["b"],
                 note="a: whole epochs of Lightning's fit, b: whole epochs of a bare loop over the same DataLoader; "
                      "value: median of the per-round ratios; a_steps, b_steps: optimizer steps of each round "
                      "(a warm-up epoch and the timed one)"),
            _row(f"cnn_lightning_epoch_b{b}", res["a"]["median"], "s", a=res["a"], batch_size=b, epoch_images=n * b),
            _row(f"cnn_bare_epoch_b{b}", res["b"]["median"], "s", b=res["b"], batch_size=b, epoch_images=n * b),
        ]
    return rows


def pyro_overhead(cfg: OverheadConfig, device, echo, factory: Optional[Callable] = None) -> list[dict]:
    """Pyro BNN step (elbo_terms) vs the plain-torch reparameterised BNN, same layers, data, Adam."""
    import torch

    from cosmolit.bench.train import build_bench_model, loss_function, model_optimizer, synthetic_pool

    b = cfg.bnn_batch_size
    x, y = synthetic_pool(4 * b, 6, 64, 3, cfg.seed)
    batches = [(x[i * b:(i + 1) * b].to(device), y[i * b:(i + 1) * b].to(device)) for i in range(4)]

    def make_pyro():
        torch.manual_seed(cfg.seed)
        model = build_bench_model("bnn", factory=factory).to(device).train()
        return loss_function(model), model_optimizer(model), model

    def make_torch(pyro_model):
        from cosmolit.nn.bayes import TorchBayesianShapeNet

        hp = pyro_model.hparams
        net = TorchBayesianShapeNet(in_channels=len(hp.get("bands", "ugrizy")), stamp=int(hp.get("stamp", 64)),
                                    filters=tuple(hp.get("filters", (32, 64, 128, 256))),
                                    prelu=hp.get("prelu", "element"), targets=len(hp.get("targets", "abc")),
                                    train_size=int(hp.get("train_size", 8000)), seed=cfg.seed,
                                    loss=hp.get("loss", "decoupled")).to(device).train()
        opt = make_adam(net.parameters(), float(hp.get("lr", 1e-3)))  # as the Pyro model's configure_optimizers
        # same input normalisation as the Pyro model, inside the timed step
        return (lambda xb, yb: net.loss(pyro_model.normalise(xb), yb)), opt

    pyro_loss, pyro_opt, pyro_model = make_pyro()
    torch_loss, torch_opt = make_torch(pyro_model)
    res = _side_by_side(lambda: time_loop(pyro_loss, pyro_opt, batches, cfg.steps, cfg.warmup_steps, device),
                        lambda: time_loop(torch_loss, torch_opt, batches, cfg.steps, cfg.warmup_steps, device),
                        cfg.rounds)
    echo(f"Pyro BNN vs plain-torch BNN, batch {b}: {res['a']['median'] * 1e3:.2f} vs {res['b']['median'] * 1e3:.2f} "
         f"ms/step, ratio {res['ratio']:.3f} (median of per-round ratios {res['median_round_ratio']:.3f}; "
         "goal <= 1.2)")
    return [
        _row(f"pyro_over_torch_bnn_b{b}", res["ratio"], "x", a=res["a"], b=res["b"], batch_size=b, goal=1.2,
             note="a: Pyro BNN (elbo_terms), b: cosmolit.nn.bayes.TorchBayesianShapeNet; per-round ratios "
                  + ", ".join(f"{r:.3f}" for r in res["round_ratios"])),
        _row(f"bnn_pyro_step_b{b}", res["a"]["median"], "s", a=res["a"], batch_size=b),
        _row(f"bnn_torch_step_b{b}", res["b"]["median"], "s", b=res["b"], batch_size=b),
    ]


def compile_speedup(cfg: OverheadConfig, device, echo, factories: Optional[dict] = None) -> list[dict]:
    """Eager against compiled (`compile_network`, as `fit --compile`) bare training loops of the cnn
    and the BNN, same initial weights, data and Adam, alternating rounds."""
    import torch

    from cosmolit.bench.train import (build_bench_model, compile_model, compile_status, loss_function,
                                      model_optimizer, synthetic_pool)

    rows = []
    for kind, b in (("cnn", cfg.batch_size), ("bnn", cfg.bnn_batch_size)):
        x, y = synthetic_pool(4 * b, 6, 64, 3, cfg.seed)
        batches = [(x[i * b:(i + 1) * b].to(device), y[i * b:(i + 1) * b].to(device)) for i in range(4)]
        sides = []
        for compiled in (False, True):
            torch.manual_seed(cfg.seed)
            model = build_bench_model(kind, factory=(factories or {}).get(kind)).to(device).train()
            if compiled:
                compile_model(model, echo)
            sides.append((loss_function(model), model_optimizer(model)))
        (eager_loss, eager_opt), (comp_loss, comp_opt) = sides
        res = _side_by_side(lambda: time_loop(eager_loss, eager_opt, batches, cfg.steps, cfg.warmup_steps, device),
                            lambda: time_loop(comp_loss, comp_opt, batches, cfg.steps, cfg.warmup_steps, device),
                            cfg.rounds)
        status = compile_status(model)
        echo(f"eager vs compiled {kind}, batch {b}: {res['a']['median'] * 1e3:.2f} vs {res['b']['median'] * 1e3:.2f} "
             f"ms/step, speed-up {res['ratio']:.3f} (median of per-round ratios {res['median_round_ratio']:.3f}; "
             f"compile {status})")
        rows += [
            _row(f"eager_over_compiled_{kind}_b{b}", res["ratio"], "x", a=res["a"], b=res["b"], batch_size=b,
                 note=f"a: eager, b: compiled (compile {status}); per-round ratios "
                      + ", ".join(f"{r:.3f}" for r in res["round_ratios"])),
            _row(f"{kind}_compiled_step_b{b}", res["b"]["median"], "s", b=res["b"], batch_size=b),
        ]
    return rows


def mfu(cfg: OverheadConfig, device, echo, factory: Optional[Callable] = None) -> list[dict]:
    """Model FLOPs of the cnn, achieved FLOP/s of its bare training loop, matmul FLOP/s, and TF comparison."""
    import numpy as np
    import torch

    from cosmolit.bench import reference as ref
    from cosmolit.bench.train import build_bench_model, loss_function, model_optimizer, synthetic_pool

    b = cfg.batch_size
    torch.manual_seed(cfg.seed)
    model = build_bench_model("cnn", factory=factory).to(device)
    x, y = synthetic_pool(2 * b, 6, 64, 3, cfg.seed)
    model.eval()
    fwd = count_forward_flops(model, x[:1].to(device))  # per image
    model.train()
    batches = [(x[:b].to(device), y[:b].to(device)), (x[b:].to(device), y[b:].to(device))]
    times = time_loop(loss_function(model), model_optimizer(model), batches, cfg.steps * cfg.rounds,
                      cfg.warmup_steps, device)
    step = float(np.median(times))
    mm = matmul_flops(cfg.matmul_size, device=device)
    achieved = 3.0 * fwd * b / step
    bound_images = mm["flops_per_s"] / (3.0 * fwd)
    echo(f"cnn forward {fwd / 1e9:.3f} GFLOP/image; bare training at batch {b}: {step * 1e3:.1f} ms/step = "
         f"{achieved / 1e9:.1f} GFLOP/s; dense {cfg.matmul_size}^3 matmul {mm['flops_per_s'] / 1e9:.1f} GFLOP/s; "
         f"MFU {achieved / mm['flops_per_s']:.2f}")
    rows = [
        _row("cnn_forward_gflop_per_image", fwd / 1e9, "GFLOP", note="conv + linear layers, 2 FLOPs per MAC"),
        _row("cnn_train_gflop_per_image", 3 * fwd / 1e9, "GFLOP", note="3 x forward (forward + backward)"),
        _row(f"cnn_bare_step_mfu_b{b}", step, "s", batch_size=b),
        _row(f"cnn_achieved_gflops_b{b}", achieved / 1e9, "GFLOP/s", batch_size=b),
        _row(f"matmul_gflops_{cfg.matmul_size}", mm["flops_per_s"] / 1e9, "GFLOP/s", a=mm["time"]),
        _row(f"mfu_cnn_b{b}", achieved / mm["flops_per_s"], "fraction", batch_size=b,
             note="achieved model FLOP/s / dense matmul FLOP/s on the same machine"),
        _row(f"cnn_images_per_second_b{b}", b / step, "images/s", batch_size=b),
        _row("matmul_bound_images_per_second", bound_images, "images/s",
             note="dense-matmul FLOP/s / training FLOPs per image"),
    ]
    if cfg.accelerator == "cpu":
        if b in ref.TF_CPU_STEP["cnn"]:
            rows.append(_row(f"cnn_over_tf_cpu_b{b}", step / ref.TF_CPU_STEP["cnn"][b], "x", batch_size=b,
                             note=f"TF 2-core reference {ref.TF_CPU_STEP['cnn'][b]} s/step ({ref.TF_CPU})"))
        rows.append(_row("fraction_of_tf_cpu_bound", (b / step) / ref.TF_CPU_BOUND_IMAGES_PER_S, "fraction",
                         note=f"images/s over the TF 2-core {ref.TF_CPU_BOUND_IMAGES_PER_S:.0f} images/s "
                              "arithmetic-bound regime (0.6 GFLOP per training sample)"))
    return rows


def malloc_overhead(cfg: OverheadConfig, device, echo) -> list[dict]:
    """Bare cnn loop under glibc's default malloc vs with freed memory retained, at batch 2 and
    cfg.batch_size. Each side runs in a fresh Python process (glibc's defaults cannot be restored
    once mallopt has been called), the two alternating over cfg.rounds rounds."""
    import sys

    if device.type != "cpu":
        echo("bench overhead malloc: a host-memory setting, measured on cpu only; skipped")
        return []
    if not sys.platform.startswith("linux"):
        echo("bench overhead malloc: glibc's mallopt is Linux only; skipped")
        return []
    rows = []
    for b in sorted({2, cfg.batch_size}):
        res = _side_by_side(lambda: _bare_cnn_in_child(False, b, cfg), lambda: _bare_cnn_in_child(True, b, cfg),
                            cfg.rounds)
        echo(f"malloc, bare cnn batch {b}: glibc default {res['a']['median'] * 1e3:.2f} vs freed memory retained "
             f"{res['b']['median'] * 1e3:.2f} ms/step, speed-up {res['ratio']:.3f} (median of per-round ratios "
             f"{res['median_round_ratio']:.3f})")
        rows.append(_row(f"malloc_system_over_retain_cnn_b{b}", res["ratio"], "x", a=res["a"], b=res["b"],
                         batch_size=b, note="a: glibc's default malloc, b: freed memory retained "
                         "(cosmolit.backends.memory), each in a fresh process; per-round ratios "
                         + ", ".join(f"{r:.3f}" for r in res["round_ratios"])))
    return rows


def _bare_cnn_in_child(retain: bool, batch: int, cfg: OverheadConfig) -> list[float]:
    """Step times (s) of the bare cnn loop in a fresh interpreter, with or without retained memory."""
    import json
    import subprocess
    import sys
    import torch

    args = {"retain": retain, "batch": batch, "steps": cfg.steps, "warmup": cfg.warmup_steps,
            "threads": torch.get_num_threads(), "seed": cfg.seed}
    code = "import sys; from cosmolit.bench.overhead import _child_main; _child_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench overhead malloc: the timing process failed:\n{proc.stderr}")  # not a user mistake
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main(arg: str) -> None:
    """Entry of the fresh process of _bare_cnn_in_child: prints the step times as a JSON list."""
    import json

    import torch

    from cosmolit.backends.memory import retain_freed_memory
    from cosmolit.bench.train import build_bench_model, loss_function, model_optimizer, synthetic_pool

    a = json.loads(arg)
    if a["retain"] and not retain_freed_memory():
        raise SystemExit("mallopt is not available here")
    torch.set_num_threads(int(a["threads"]))
    torch.manual_seed(a["seed"])
    b = int(a["batch"])
    model = build_bench_model("cnn").train()
    x, y = synthetic_pool(2 * b, 6, 64, 3, a["seed"])
    times = time_loop(loss_function(model), model_optimizer(model), [(x[:b], y[:b]), (x[b:], y[b:])],
                      int(a["steps"]), int(a["warmup"]), torch.device("cpu"))
    print(json.dumps(times))


def run_overhead_bench(cfg: OverheadConfig, echo: Callable[[str], None] = print,
                       factories: Optional[dict] = None, label: Optional[str] = None) -> dict:
    """Run the requested parts; returns a validated results document (kind 'overhead').

    factories: optional {"cnn": f(kind, loss), "bnn": f(kind, loss)} replacing the model registry (tests).
    """
    import torch

    from cosmolit.backends import resolve_accelerator
    from cosmolit.bench.env import capture_environment
    from cosmolit.bench.results import make_payload
    from cosmolit.bench.train import apply_threads, torch_device
    from cosmolit.config import to_dict

    factories = factories or {}
    cfg.accelerator = resolve_accelerator(cfg.accelerator)
    if cfg.accelerator == "ipu":
        raise UsageError("bench overhead runs on cpu or gpu")
    device = torch_device(cfg.accelerator)
    previous = apply_threads(cfg.threads, None, echo)
    rows: list[dict] = []
    try:
        if "lightning" in cfg.parts:
            rows += lightning_overhead(cfg, device, echo, factories.get("cnn"))
        if "pyro" in cfg.parts:
            rows += pyro_overhead(cfg, device, echo, factories.get("bnn"))
        if "mfu" in cfg.parts:
            rows += mfu(cfg, device, echo, factories.get("cnn"))
        if "malloc" in cfg.parts:
            rows += malloc_overhead(cfg, device, echo)  # the real cnn: its processes cannot take a factory
        if "compile" in cfg.parts:
            rows += compile_speedup(cfg, device, echo, factories)
        env = capture_environment(cfg.accelerator, "32-true", "overhead")
    finally:
        torch.set_num_threads(previous)
    return make_payload("overhead", rows, env, to_dict(cfg), label or f"cosmolit {cfg.accelerator} overheads")
