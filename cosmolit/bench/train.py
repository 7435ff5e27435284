"""`cosmolit bench train`: time per training step of the shape CNN or the BNN at the study's batch sizes.

Three modes, same network, same synthetic data, same optimizer (the model's own Adam):

- lightning: cosmolit's LightningModule under pl.Trainer, timed by TimingCallback
  (on_train_batch_start -> on_train_batch_end: forward, loss, backward, optimizer step, logging);
- bare:      a plain PyTorch loop over the same DataLoader (zero_grad, loss, backward, step);
- static:    the whole step captured in a CUDA graph (cosmolit.backends.static), K = device_iterations
             steps per host call; on a machine without CUDA it says so and runs eager steps.

Data: random stamps of the study's shapes (B, 6, 64, 64) raw electrons and (B, 3) targets,
generated in memory from a seeded numpy Generator (no GalSim). A pool of `pool` stamps is
reused (index modulo pool) so that an "epoch" of 8,000 images costs no memory.
The study's unit, seconds per 100 epochs of 8,000 images, is extrapolated from the median step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from cosmolit.errors import UsageError
from cosmolit.train import LIBRARY_NOISE, TrainerConfig

MODES = ("lightning", "bare", "static")
TRAIN_MODELS = ("cnn", "bnn")


@dataclass
class TrainBenchConfig:
    """The `train:` section of configs/bench.yaml (CLI options override it)."""

    model: str = "cnn"
    accelerator: str = "cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [2, 4, 8, 14])
    steps: Optional[int] = 20  # timed steps per batch size (after warm-up); ignored when epochs is set
    epochs: Optional[int] = None  # timed epochs of epoch_images images (after warmup_epochs)
    warmup_steps: int = 3
    warmup_epochs: int = 1
    epoch_images: int = 8000
    mode: str = "lightning"
    loss: Optional[str] = None  # decoupled, nll, or (cnn only) mse as the study's timing runs; None: the model's default
    threads: Optional[int] = None  # torch.set_num_threads
    interop_threads: Optional[int] = None  # torch.set_num_interop_threads
    channels_last: bool = False
    compile: bool = False  # torch.compile the model's network (compile_network), falls back to eager
    precision: str = "32-true"
    device_iterations: int = 1  # static / static_graph / ipu: optimizer steps per host call
    static_graph: bool = False  # lightning mode: the step of `cosmolit fit` in static-graph mode (CUDA graph)
    pool: int = 256  # distinct synthetic stamps
    seed: int = 0
    bands: str = "ugrizy"
    stamp: int = 64

    def __post_init__(self):
        if self.model not in TRAIN_MODELS:
            raise ValueError(f"model {self.model!r} cannot be trained in the benchmark; choose one of cnn, bnn")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        from cosmolit.models.targets import SHAPE_LOSSES

        if self.loss is not None and self.loss not in SHAPE_LOSSES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(SHAPE_LOSSES)}")
        if self.loss == "mse" and self.model == "bnn":
            raise ValueError("loss mse applies to the cnn only; the BNN trains on an ELBO (decoupled or nll)")
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {self.batch_sizes}")
        for name in ("steps", "epochs", "threads", "interop_threads"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if self.steps is None and self.epochs is None:
            raise ValueError("give steps or epochs")
        for name in ("warmup_steps", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("epoch_images", "device_iterations", "pool", "stamp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.static_graph and self.mode != "lightning":
            raise ValueError("static_graph applies to mode lightning (mode static is the bare loop's CUDA graph)")
        if self.static_graph and self.precision not in ("32-true", "32"):
            raise ValueError(f"static_graph runs 32-true only, not precision {self.precision!r}")
        if self.mode != "lightning" and self.precision not in ("32-true", "32"):
            raise ValueError(f"precision {self.precision!r} is available in lightning mode only; bare and static "
                             "modes run 32-true")
        self.check_ipu()

    def check_ipu(self) -> None:
        """ValueError for what an IPU refuses; checked again once 'auto' is resolved to an accelerator."""
        if self.accelerator != "ipu":
            return
        if self.mode != "lightning":
            raise ValueError("on ipu only mode lightning exists (PopTorch compiles the step itself)")
        if self.compile:
            raise ValueError("compile is for cpu and gpu; on ipu PopTorch compiles the step itself")
        if self.static_graph:
            raise ValueError("static_graph is for gpu; on ipu PopTorch runs the step as one static graph itself")

    @property
    def steps_per_call(self) -> int:
        """Optimizer steps per timed call: device_iterations where a call runs several, else 1."""
        several = self.mode == "static" or self.static_graph or self.accelerator == "ipu"
        return self.device_iterations if several else 1


# ---------------------------------------------------------------------------- shared pieces
def apply_threads(threads: Optional[int], interop: Optional[int], echo: Callable[[str], None] = print) -> int:
    """torch.set_num_threads / set_num_interop_threads (the latter only before parallel work starts).

    Returns the previous intra-op thread count, to restore with torch.set_num_threads.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    if interop:
        try:
            torch.set_num_interop_threads(int(interop))
        except RuntimeError:
            echo(f"interop threads already fixed at {torch.get_num_interop_threads()}; --interop-threads ignored")
    return previous


def torch_device(accelerator: str):
    import torch

    if accelerator == "gpu":
        if not torch.cuda.is_available():
            raise UsageError("--accelerator gpu: no CUDA device is visible; use cpu")
        return torch.device("cuda:0")
    return torch.device("cpu")


def build_bench_model(kind: str, loss: Optional[str] = None, bands: str = "ugrizy", stamp: int = 64,
                      train_size: int = 8000, factory: Optional[Callable] = None):
    """A model of `kind` with its default hyper-parameters (as `cosmolit fit` builds it).

    `factory(kind, loss)` replaces the registry (tests use toy modules).
    """
    if factory is not None:
        return factory(kind, loss)
    import dataclasses

    from cosmolit.models import model_class
    from cosmolit.config import accepted_kwargs
    from cosmolit.train import model_config_class

    cls = model_class(kind)
    kwargs = dataclasses.asdict(model_config_class(kind)())
    kwargs.update(bands=bands, stamp=stamp, train_size=train_size)
    if loss is not None:
        kwargs["loss"] = loss
    return cls(**accepted_kwargs(cls, kwargs))


def loss_function(model) -> Callable:
    """loss(x, y) -> scalar tensor for a bare loop, from the model's own loss (no logging).

    Tries, in order: elbo_terms(x, y)['loss'] (BNN), loss_terms(x, y)['loss'], compute_loss(x, y),
    then training_step((x, y), 0) (which may log).
    """
    for name in ("elbo_terms", "loss_terms"):
        fn = getattr(model, name, None)
        if callable(fn):
            return lambda x, y, _fn=fn: _fn(x, y)["loss"]
    fn = getattr(model, "compute_loss", None)
    if callable(fn):
        return lambda x, y: fn(x, y)

    def from_step(x, y):
        out = model.training_step((x, y), 0)
        return out["loss"] if isinstance(out, dict) else out

    return from_step


def model_optimizer(model):
    """The model's own optimizer from configure_optimizers() (first one)."""
    opt = model.configure_optimizers()
    if isinstance(opt, dict):
        opt = opt["optimizer"]
    if isinstance(opt, (list, tuple)):
        opt = opt[0]
        if isinstance(opt, dict):
            opt = opt["optimizer"]
    return opt


def synthetic_pool(n: int, channels: int, stamp: int, targets: int, seed: int):
    """x (n, C, H, W) float32 raw-electron-like, y (n, T) float32, from numpy default_rng(seed)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 40.0, size=(n, channels, stamp, stamp)).astype(np.float32)  # (n, C, H, W)
    x += rng.normal(0.0, 5.0, size=x.shape).astype(np.float32)
    y = rng.uniform(-0.5, 0.5, size=(n, targets)).astype(np.float32)  # (n, T)
    y[:, -1] = np.abs(y[:, -1]) * 4  # redshift-like, positive
    return torch.from_numpy(x), torch.from_numpy(y)


class _Cycled:
    """A map-style dataset of `length` items cycling over tensors x (n, ...), y (n, ...)."""

    def __init__(self, x, y, length: int):
        self.x, self.y, self.length = x, y, int(length)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        j = i % len(self.x)
        return self.x[j], self.y[j]


def _n_targets(model) -> int:
    hp = getattr(model, "hparams", {}) or {}
    targets = hp.get("targets") if hasattr(hp, "get") else None
    return len(targets) if targets else 3


def _loader(x, y, batch: int, length: int, seed: int):
    import torch

    return torch.utils.data.DataLoader(_Cycled(x, y, length), batch_size=batch, shuffle=True, drop_last=True,
                                       generator=torch.Generator().manual_seed(seed), num_workers=0)


def compile_model(model, echo: Callable[[str], None]) -> None:
    """torch.compile the model's network (its `compile_network`, the same as `cosmolit fit --compile`)."""
    if hasattr(model, "compile_network"):
        model.compile_network(True, echo)
    else:
        echo(f"{type(model).__name__} has no compile_network; running eager")


def compile_status(model) -> str:
    return model.compile_status() if hasattr(model, "compile_status") else "off"


# ---------------------------------------------------------------------------- one batch size
def _time_lightning(model, cfg: TrainBenchConfig, batch: int, x, y, echo) -> dict:
    import pytorch_lightning as pl

    from cosmolit.backends import IPUOptions, trainer_kwargs
    from cosmolit.bench.callbacks import TimingCallback

    k = cfg.steps_per_call
    if cfg.static_graph:
        model.enable_static_graph(k, echo)
    if cfg.epochs:
        length = cfg.epoch_images
        limits = {"max_epochs": cfg.warmup_epochs + cfg.epochs}
        timer = TimingCallback(warmup_steps=0, warmup_epochs=cfg.warmup_epochs, steps_per_call=k)
        if length // (batch * k) == 0:
            raise UsageError(f"epoch_images {cfg.epoch_images} is smaller than one step of {batch * k} images")
    else:
        calls = cfg.warmup_steps + cfg.steps
        length = calls * batch * k
        limits = {"max_steps": calls, "max_epochs": 1}
        timer = TimingCallback(warmup_steps=cfg.warmup_steps, steps_per_call=k)
    ipu = IPUOptions(device_iterations=k) if cfg.accelerator == "ipu" else None
    opts = trainer_kwargs(cfg.accelerator, 1, cfg.precision, cfg.seed, ipu=ipu, echo=lambda m: None)
    trainer = pl.Trainer(callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         log_every_n_steps=TrainerConfig.log_every_n_steps,  # `cosmolit fit`'s logging
                         **limits, **opts)
    with _quiet_lightning():
        trainer.fit(model, _loader(x, y, batch * k, length, cfg.seed))
    return dict(timer.summary(), times=list(timer.step_times))


@contextlib.contextmanager
def _quiet_lightning():
    """Silence Lightning's info lines and the 'few workers' / 'no val loop' warnings in a benchmark."""
    import logging
    import warnings

    names = ["pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|val_dataloader|"
                                                      "validation_step|log_every_n_steps|self.log).*")
            warnings.filterwarnings("ignore", message=LIBRARY_NOISE)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _time_bare(model, cfg: TrainBenchConfig, batch: int, x, y, device, echo) -> dict:
    import torch

    from cosmolit.bench.callbacks import StepClock, summarize

    model.train()
    opt = model_optimizer(model)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    loss_fn = loss_function(model)
    steps = cfg.steps if not cfg.epochs else cfg.epochs * (cfg.epoch_images // batch)
    warm = cfg.warmup_steps if not cfg.epochs else cfg.warmup_epochs * (cfg.epoch_images // batch)
    loader = _loader(x, y, batch, (steps + warm) * batch, cfg.seed)
    opt.zero_grad(set_to_none=True)
    clock = StepClock(warmup=warm, device=device)
    for xb, yb in loader:
        xb = xb.to(device, non_blocking=True).contiguous(memory_format=fmt)  # (B, C, H, W)
        yb = yb.to(device, non_blocking=True)  # (B, T)
        clock.start()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(xb, yb)
        loss.backward()
        opt.step()
        clock.stop()
    return {"step": clock.summary(), "epoch": summarize([]), "calls": clock.calls,
            "times": list(clock.times)}


def _time_static(model, cfg: TrainBenchConfig, batch: int, x, y, device, echo) -> dict:
    import torch

    from cosmolit.backends.static import StaticTrainStep
    from cosmolit.bench.callbacks import StepClock, summarize

    model.train()
    opt = model_optimizer(model)
    k = cfg.device_iterations
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    loss_fn = loss_function(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_blocks = 4  # distinct blocks of K batches, already on the device, used in turn

    def block(i):
        idx = torch.randint(0, len(x), (k * batch,), generator=gen)
        xb = x[idx].reshape(k, batch, *x.shape[1:]).to(device)  # (K, B, C, H, W)
        if cfg.channels_last:
            xb = torch.stack([t.contiguous(memory_format=fmt) for t in xb])
        return xb, y[idx].reshape(k, batch, -1).to(device)  # (K, B, T)

    blocks = [block(i) for i in range(n_blocks)]
    runner = StaticTrainStep(model, loss_fn, opt, blocks[0], echo=echo)
    calls = cfg.steps if not cfg.epochs else cfg.epochs * (cfg.epoch_images // batch)
    calls = max(1, -(-calls // k))
    warm = max(1, -(-cfg.warmup_steps // k)) if cfg.warmup_steps else 0
    clock = StepClock(warmup=warm, device=device, steps_per_call=k)
    for i in range(warm + calls):
        clock.start()
        runner.run(*blocks[i % n_blocks])
        clock.stop()
    return {"step": clock.summary(), "epoch": summarize([]), "calls": clock.calls,
            "static": runner.static, "static_reason": runner.reason, "times": list(clock.times)}


def time_training(cfg: TrainBenchConfig, batch: int, echo: Callable[[str], None] = print,
                  factory: Optional[Callable] = None) -> dict:
    """Build a fresh model and time its training at one batch size; returns a results row."""
    return time_training_raw(cfg, batch, echo, factory)[0]


def time_training_raw(cfg: TrainBenchConfig, batch: int, echo: Callable[[str], None] = print,
                      factory: Optional[Callable] = None) -> tuple[dict, list[float]]:
    """(results row, the raw per-step times [s] after warm-up) for one batch size."""
    import pytorch_lightning as pl
    import torch

    from cosmolit.bench.callbacks import images_per_second, study_seconds

    with _quiet_lightning():
        pl.seed_everything(cfg.seed)
    model = build_bench_model(cfg.model, cfg.loss, cfg.bands, cfg.stamp, cfg.epoch_images, factory)
    device = torch_device(cfg.accelerator) if cfg.accelerator != "ipu" else torch.device("cpu")
    if cfg.mode != "lightning":
        model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = synthetic_pool(cfg.pool, len(cfg.bands), cfg.stamp, _n_targets(model), cfg.seed)
    if cfg.compile:
        if (cfg.mode == "static" or cfg.static_graph) and device.type == "cuda":
            echo("--compile is ignored in static-graph mode on a GPU: the step is captured in a CUDA graph")
        else:
            compile_model(model, echo)
    if cfg.mode == "lightning":
        timing = _time_lightning(model, cfg, batch, x, y, echo)
    elif cfg.mode == "bare":
        timing = _time_bare(model, cfg, batch, x, y, device, echo)
    else:
        timing = _time_static(model, cfg, batch, x, y, device, echo)
    step = timing["step"]
    if step["n"] == 0:
        raise UsageError(f"batch {batch}: no step was timed after the warm-up; raise --steps or --epochs")
    k = cfg.steps_per_call
    row = {"model": cfg.model, "batch_size": int(batch), "mode": cfg.mode, "step_time": step,
           "images_per_second": images_per_second(step["median"], batch),
           "seconds_per_100_epochs": study_seconds(step["median"], batch),
           "steps_timed": step["n"], "warmup_steps": cfg.warmup_steps if not cfg.epochs else None,
           "device_iterations": k}
    if cfg.epochs and timing["epoch"]["n"]:  # (with --steps the one epoch is cut short: no figure)
        row["epoch_time"] = timing["epoch"]
        row["measured_seconds_per_100_epochs"] = timing["epoch"]["median"] * 100 * 8000 / cfg.epoch_images
    row["compile"] = compile_status(model)
    if cfg.static_graph:
        state, why = model.static_graph_status()
        timing.update(static=state == "on", static_reason=why)
    for key in ("static", "static_reason"):
        if key in timing:
            row[key] = timing[key]
    return {k_: v for k_, v in row.items() if v is not None}, timing["times"]


def run_train_bench(cfg: TrainBenchConfig, echo: Callable[[str], None] = print, progress: bool = True,
                    factory: Optional[Callable] = None, label: Optional[str] = None) -> dict:
    """Time every batch size of `cfg`; returns a validated results document (kind 'train')."""
    import torch

    from cosmolit.backends import resolve_accelerator
    from cosmolit.bench.env import capture_environment
    from cosmolit.bench.results import make_payload
    from cosmolit.config import to_dict
    from cosmolit.progress import progress_bar

    cfg.accelerator = resolve_accelerator(cfg.accelerator)
    try:
        cfg.check_ipu()  # 'auto' may have become an IPU
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if cfg.mode == "static" and cfg.accelerator != "gpu":
        echo("static-graph mode needs CUDA; on "
             f"{cfg.accelerator} the steps run eager (same numbers as --mode bare)")
    previous = apply_threads(cfg.threads, cfg.interop_threads, echo)
    rows = []
    try:
        with progress_bar(len(cfg.batch_sizes), f"bench train {cfg.model} ({cfg.mode})",
                          enabled=progress) as advance:
            for batch in cfg.batch_sizes:
                row = time_training(cfg, batch, echo, factory)
                rows.append(row)
                st = row["step_time"]
                echo(f"{cfg.model} {cfg.mode} batch {batch:>3}: {st['median'] * 1e3:8.2f} ms/step "
                     f"(IQR {st['iqr'] * 1e3:.2f}, n {st['n']}), {row['images_per_second']:8.1f} img/s, "
                     f"{row['seconds_per_100_epochs']:9.1f} s per 100 epochs of 8,000")
                advance(1)
        env = capture_environment(cfg.accelerator, cfg.precision, cfg.mode, channels_last=cfg.channels_last,
                                  compile=cfg.compile, device_iterations=cfg.device_iterations)
    finally:
        torch.set_num_threads(previous)
    return make_payload("train", rows, env, to_dict(cfg),
                        label or f"cosmolit {cfg.accelerator} {cfg.mode}")
