"""CosmolitModule: what the three models (shape CNN, Bayesian CNN, VAE) share.

- Hyper-parameters of plain types only (str, int, float, bool, lists, dicts), saved by each
  subclass with `self.save_hyperparameters()`, so a checkpoint loads with
  `torch.load(weights_only=True)` and `Model.load_from_checkpoint(path)` needs no argument.
  Shared fields: `bands` (one letter per channel), `stamp` (pixels per side), `normalisation`
  (per-band scale, electrons; see cosmolit.data), `provenance` (where the training data came from).
- Input normalisation: the networks see y = asinh(x / scale_b) of raw electrons x; the scale is
  a (non-persistent) buffer rebuilt from the hyper-parameters, so it follows the module across
  devices.
- Logging that works the same on every accelerator, IPU included: the steps only return their
  loss (`step_output`); per-step `self.log` happens only off the IPU, at the steps that reach the
  loggers (every `log_every_n_steps`); the detached step losses are gathered in the batch-end
  hooks and their means logged in the epoch-end hooks as
  `train_loss_epoch` and `val_loss` (ModelCheckpoint and EarlyStopping monitor `val_loss`), plus
  `train_<part>_epoch` / `val_<part>` for the extra terms a model reports (nll, kl, rec, mse...).
  `monitor` names the metric that picks best.ckpt and early stopping (`val_loss` unless a model
  says otherwise; always `val_loss` on the IPU).
- One torch.optim.Adam (the IPU strategy takes exactly one torch optimizer), fused off the IPU
  where torch has the kernel (`cosmolit.backends.make_adam`). Hyper-parameter `lr_schedule`:
  `constant` (the study's, and the default of checkpoints without the key) or `cosine`, a
  per-epoch cosine decay from lr to LR_FLOOR x lr over the trainer's max_epochs (read at every
  epoch, so a `--resume` with more epochs stretches the schedule; the IPU strategy hands the
  changed learning rate to PopTorch at the next step).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from cosmolit.backends import make_adam, mark_loss, on_ipu
from cosmolit.backends.compiling import CompiledApart, CompiledCall, compile_refusal
from cosmolit.errors import UsageError
from cosmolit.nn.trunk import PRELU_KINDS

LR_SCHEDULES = ("constant", "cosine")
LR_FLOOR = 0.01  # the cosine schedule ends at this fraction of lr
# check_compatible: a PSF FWHM or sky level further than this fraction from the training's is warned about
CONDITION_TOLERANCE = 0.05


def _asinh_scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.asinh(x / scale)


# under torch.compile the normalisation is a graph of its own (see CompiledApart for why)
_NORMALISE = CompiledApart(_asinh_scaled)


def check_network_hparams(filters, prelu, lr, targets=None, lr_schedule: str = "constant") -> None:
    """Checks shared by every model config (ValueError; the config loader turns it into one line)."""
    if targets is not None:
        if len(targets) == 0:
            raise ValueError("targets must name at least one truth column, e.g. [e1, e2, redshift]")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets must be distinct, got {list(targets)}")
    if len(filters) == 0 or any(int(f) <= 0 for f in filters):
        raise ValueError(f"filters must be a non-empty list of positive integers, got {list(filters)}")
    if prelu not in PRELU_KINDS:
        raise ValueError(f"prelu {prelu!r} is not allowed; choose one of {', '.join(PRELU_KINDS)}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule {lr_schedule!r} is not allowed; choose one of {', '.join(LR_SCHEDULES)}")


def _finite_floats(value, n: int) -> list[float]:
    """`value` (a number or a list of n) as n finite floats, or [] when absent, malformed or not finite."""
    try:
        values = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=float))] if value is not None else []
    except (TypeError, ValueError):
        return []
    return values if len(values) == n and all(math.isfinite(v) for v in values) else []


def cosine_factor(epoch: int, epochs: int) -> float:
    """Learning-rate factor of the cosine schedule at `epoch` (0-based) of `epochs`: 1 at the
    start, falling to LR_FLOOR at the end, LR_FLOOR after it."""
    if epochs <= 1:
        return 1.0
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * t))


def check_normalisation(normalisation: Optional[Sequence], bands: str) -> list[float]:
    """Per-band scales as a list of positive finite floats (ones when None)."""
    if normalisation is None:
        return [1.0] * len(bands)
    try:
        values = [float(v) for v in normalisation]
    except (TypeError, ValueError):
        raise UsageError(f"normalisation must be a list of {len(bands)} numbers, got {normalisation!r}") from None
    if len(values) != len(bands):
        raise UsageError(
            f"normalisation has {len(values)} scales but bands {bands!r} has {len(bands)}; give one per band"
        )
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"normalisation scales must be positive and finite, got {values}")
    return values


class CosmolitModule(pl.LightningModule):
    """Base LightningModule: normalisation buffer, epoch-mean logging, one Adam optimizer.

    Subclasses call `super().__init__(bands=..., stamp=..., normalisation=..., provenance=...)`
    then `self.save_hyperparameters()`, and define `lr` among their hyper-parameters.
    """

    def __init__(self, bands: str = "ugrizy", stamp: int = 64, normalisation: Optional[Sequence] = None,
                 provenance: Optional[dict] = None):
        super().__init__()
        if not isinstance(bands, str) or not bands:
            raise UsageError(f"bands must be a non-empty string of band letters such as 'ugrizy', got {bands!r}")
        if int(stamp) < 1:
            raise UsageError(f"stamp must be a positive number of pixels, got {stamp}")
        if provenance is not None and not isinstance(provenance, dict):
            raise UsageError(f"provenance must be a mapping or null, got {type(provenance).__name__}")
        scale = check_normalisation(normalisation, bands)
        # (1, C, 1, 1); not saved in state_dict: the hyper-parameters are its source
        self.register_buffer("norm_scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self._step_values: dict[str, dict[str, list]] = {"train": {}, "val": {}}

    # ------------------------------------------------------------------ normalisation
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw electrons (B, C, H, W) -> network input asinh(x / scale_b) (B, C, H, W)."""
        return _NORMALISE(x, self.norm_scale.to(x.dtype))

    def denormalise(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalise`: sinh(y) * scale_b (B, C, H, W) electrons."""
        return torch.sinh(y) * self.norm_scale.to(y.dtype)

    def check_compatible(self, info, echo=None) -> list[str]:
        """UsageError when a dataset (cosmolit.dataset.DatasetInfo) has other bands, stamp size or pixel
        scale than the training data (provenance); one warning line for a PSF FWHM or a depth (sky
        level) more than CONDITION_TOLERANCE from the training's, or for attributes the dataset lacks
        (another tool's file) where the training recorded them. Returns the warning lines, each also
        passed to `echo` when given."""
        bands, stamp = str(self.hparams.get("bands")), int(self.hparams.get("stamp"))
        if info.bands != bands:
            raise UsageError(f"dataset {info.path!r} has bands {info.bands!r} but the model was trained on {bands!r}")
        if (info.height, info.width) != (stamp, stamp):
            raise UsageError(
                f"dataset {info.path!r} has {info.height}x{info.width} stamps but the model expects {stamp}x{stamp}"
            )
        prov = self.hparams.get("provenance") or {}
        scale = _finite_floats(prov.get("pixel_scale"), 1)
        here = _finite_floats(getattr(info, "pixel_scale", None), 1)
        if scale and here and not math.isclose(scale[0], here[0], rel_tol=1e-3):
            raise UsageError(f"dataset {info.path!r} has a pixel scale of {here[0]:g} arcsec but the model was "
                             f"trained on {scale[0]:g} arcsec pixels; give stamps at the training pixel scale")
        missing, off = [], []
        for name, label in (("psf_fwhm", "PSF FWHM"), ("sky_level", "sky level (depth)")):
            trained = _finite_floats(prov.get(name), len(bands))
            now = _finite_floats(info.attrs.get(name, getattr(info, name, None)), len(bands))
            if trained and not now:
                missing.append(name)
            elif trained and now:
                far = [f"{b} {v:.4g} (trained {t:.4g})" for b, v, t in zip(bands, now, trained)
                       if abs(v - t) > CONDITION_TOLERANCE * t]
                if far:
                    off.append(f"{label} " + ", ".join(far))
        if scale and not here:
            missing.insert(0, "pixel_scale")
        lines = []
        if off:
            lines.append(f"warning: dataset {info.path!r} is outside the training conditions: {'; '.join(off)}; "
                         "the predictions may be biased")
        if missing:
            lines.append(f"note: dataset {info.path!r} has no {', '.join(missing)} attribute(s); not checked "
                         "against the training data")
        for line in lines if echo is not None else ():
            echo(line)
        return lines

    # ------------------------------------------------------------------ torch.compile
    # the pure-tensor part of a training / validation step, which `compile_network` compiles
    compiled_methods: tuple[str, ...] = ("loss_terms",)

    def compile_network(self, enabled: bool = True, echo=print) -> None:
        """With `enabled`, route the methods named in `compiled_methods` through torch.compile
        (cosmolit.backends.compiling.CompiledCall: falls back to eager with one line if compilation
        fails); without, back to the eager methods. The state dict is unchanged either way.

        On a CPU the compiled methods keep the Conv2d weights channels-last, from their first call
        (the model is on its device by then) until compilation is turned off or falls back. Why:
        Inductor runs every convolution channels-last on a CPU; with contiguous weights it copies
        each of them to channels-last at every forward pass and autograd copies each weight
        gradient back (2.4 MB for the shape CNN's last convolution, at every step), about 1.5 ms of
        a 15 ms step at batch 2. Checkpoints still hold contiguous weights (on_save_checkpoint).
        """
        for name in self.compiled_methods:
            self.__dict__.pop(name, None)  # an instance attribute shadows the method while compiled
        self._set_conv_layout(torch.contiguous_format)
        if not enabled:
            return

        def prepare():
            if self.device.type == "cpu":
                self._set_conv_layout(torch.channels_last)

        refusal = compile_refusal()
        for name in self.compiled_methods:
            call = CompiledCall(getattr(self, name), f"{type(self).__name__}.{name}", echo, prepare=prepare,
                                restore=lambda: self._set_conv_layout(torch.contiguous_format), unavailable=refusal)
            self.__dict__[name] = call
            if call.status == "unavailable":  # said once: the same holds for the other methods
                break

    def _set_conv_layout(self, memory_format: torch.memory_format) -> None:
        """Store every Conv2d weight in `memory_format` (same values; the Parameter objects stay, so
        an optimizer holding them is unaffected: cosmolit.backends.make_adam follows the layout)."""
        for m in self.modules():
            # _parameters: a Bayesian network's conv weights are Pyro sample sites, not parameters
            w = m._parameters.get("weight") if isinstance(m, torch.nn.Conv2d) else None
            if w is not None and not w.is_contiguous(memory_format=memory_format):
                w.data = w.data.contiguous(memory_format=memory_format)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # compiled on a CPU the Conv2d weights are channels-last (compile_network); the weights in
        # a file are contiguous either way
        state = checkpoint.get("state_dict", {})
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                state[name] = value.contiguous()
        # static-graph mode switches Adam to capturable (state on the GPU); torch refuses that flag
        # on a CPU, so the file keeps the plain form and a resumed static run switches it back
        for opt_state in checkpoint.get("optimizer_states", []):
            for group in opt_state.get("param_groups", []):
                if group.get("capturable"):
                    group["capturable"] = False

    def compile_status(self) -> str:
        """'off', or the status of the compiled methods: 'on', 'failed' or 'unavailable' (the worst of them)."""
        calls = [self.__dict__[name] for name in self.compiled_methods if name in self.__dict__]
        if not calls:
            return "off"
        return next((s for s in ("unavailable", "failed") if any(c.status == s for c in calls)), "on")

    # ------------------------------------------------------------------ steps
    def batch_terms(self, batch) -> dict[str, torch.Tensor]:
        """The loss of one batch under 'loss', and the scalar parts a model reports beside it
        (graph-safe: no host synchronisation). Each model defines it."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        if self._static is not None:
            return self._static_training_step(batch)
        terms = dict(self.batch_terms(batch))
        return self.step_output("train", mark_loss(self, terms.pop("loss")), **terms)

    def validation_step(self, batch, batch_idx):
        terms = dict(self.batch_terms(batch))
        return self.step_output("val", terms.pop("loss"), **terms)

    # ------------------------------------------------------------------ static-graph mode (GPU)
    _static: Optional[dict] = None

    def enable_static_graph(self, device_iterations: int = 1, echo=print) -> None:
        """Train with whole steps captured in a CUDA graph (cosmolit.backends.static), K =
        `device_iterations` optimizer steps per Lightning step: each training batch holds K
        batches one after another (K x batch_size stamps), as on an IPU. The step then optimizes
        by itself (Lightning's manual optimization). Without CUDA, or where capture fails, the K
        steps run eager, with one line through `echo`. `disable_static_graph` goes back."""
        if int(device_iterations) < 1:
            raise UsageError(f"device_iterations must be a positive integer, got {device_iterations}")
        if self.hparams.get("lr_schedule", "constant") != "constant":
            raise UsageError("static-graph mode needs lr_schedule: constant (a captured step keeps the learning "
                             "rate it was captured with)")
        self.automatic_optimization = False
        self._static = {"k": int(device_iterations), "echo": echo, "runner": None}

    def disable_static_graph(self) -> None:
        self._static = None
        self.automatic_optimization = True

    def static_graph_status(self) -> tuple[str, Optional[str]]:
        """(state, why not captured): state 'off', 'pending' (before the first training step), 'on'
        (steps replay a CUDA graph) or 'eager' (static-graph mode without a graph, for the reason given)."""
        if self._static is None:
            return "off", None
        runner = self._static["runner"]
        if runner is None:
            return "pending", None
        return ("on", None) if runner.static else ("eager", runner.reason)

    def on_train_start(self) -> None:
        if self._static is not None:
            self._static["runner"] = None  # capture again for this fit: the optimizer is new

    def _static_training_step(self, batch):
        from cosmolit.backends.static import StaticTrainStep

        k = self._static["k"]
        tensors = list(batch) if isinstance(batch, (tuple, list)) else [batch]
        if tensors[0].shape[0] % k:
            raise UsageError(f"a training batch of {tensors[0].shape[0]} stamps does not split into "
                             f"device_iterations={k} equal batches")
        block = [t.reshape(k, t.shape[0] // k, *t.shape[1:]) for t in tensors]  # (K, B, ...)
        optimizer = self.optimizers()
        if self._static["runner"] is None:
            self._static["runner"] = StaticTrainStep(
                self, lambda *b: self.batch_terms(b), getattr(optimizer, "optimizer", optimizer), block,
                echo=self._static["echo"])
        # Lightning counts the optimizer steps of a manual step through these two hooks of its
        # optimizer wrapper; one Lightning step (K optimizer steps) counts once, as on an IPU
        getattr(optimizer, "_on_before_step", lambda: None)()
        terms = {name: value.clone() for name, value in self._static["runner"].run(*block).items()}
        out = self.step_output("train", terms.pop("loss"), **terms)
        getattr(optimizer, "_on_after_step", lambda: None)()
        return out

    # ------------------------------------------------------------------ logging
    monitor = "val_loss"  # see the module docstring

    def step_output(self, stage: str, loss: torch.Tensor, **parts: torch.Tensor):
        """What a training / validation step returns: the loss, with its parts when not on an IPU.

        Off the IPU it also logs `train_loss` (and `train_<part>`) at the training steps whose
        values reach the loggers (`_logs_this_step`). On the IPU only the loss tensor leaves the
        compiled step. Never reads a tensor's value on the host.
        """
        if on_ipu(self):
            return loss
        if stage == "train" and self._logs_this_step():
            self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
            for name, value in parts.items():
                self.log(f"train_{name}", value, on_step=True, on_epoch=False)
        if not parts:
            return loss
        return {"loss": loss, **{name: value.detach() for name, value in parts.items()}}

    def _logs_this_step(self) -> bool:
        """True under a Trainer at the training steps after which Lightning writes per-step values
        to the loggers, every `log_every_n_steps` optimizer steps (`cosmolit fit`: 10 by default),
        and at the last batch of an epoch, so that the progress bar and `callback_metrics` always
        hold a recent train_loss.

        Why not every step: each `self.log` call costs Lightning about 0.45 ms on a CPU (it walks
        and deep-copies its record of the metric), 0.9 ms of a 17 ms shape-CNN step at batch 2 and
        1.6 ms for the BNN's four values, and values logged in between never reach a logger. The
        epoch means are gathered from every step either way.
        """
        trainer = getattr(self, "_trainer", None)  # bare loops call the steps without one
        if trainer is None:
            return False
        every = trainer.log_every_n_steps
        return (bool(every) and (trainer.global_step + 1) % every == 0) or trainer.is_last_batch

    def _gather(self, stage: str, outputs) -> None:
        if outputs is None:
            return
        if isinstance(outputs, torch.Tensor):
            outputs = {"loss": outputs}
        store = self._step_values[stage]
        for name, value in outputs.items():
            # one value per batch; an IPU step over device_iterations batches returns one value each
            # at inference (PopTorch's default output mode), so a step's output may hold several
            if isinstance(value, torch.Tensor) and value.dim() <= 1 and value.numel() >= 1:
                store.setdefault(name, []).append(value.detach().reshape(-1).float())

    def _log_means(self, stage: str) -> None:
        """Log the epoch mean of each gathered value. In a DDP run (several processes, each with its
        own shard of the batches) the mean is over the batches of every process: one all-reduce of
        the sums and counts, so every process logs the same number."""
        store = self._step_values[stage]
        trainer = getattr(self, "_trainer", None)
        distributed = trainer is not None and trainer.world_size > 1 and not on_ipu(self)
        for name, values in store.items():
            if not values:
                continue
            key = f"{stage}_{name}" + ("_epoch" if stage == "train" else "")
            value = torch.cat(values)
            if distributed:
                total = trainer.strategy.reduce(torch.stack([value.sum(), value.new_tensor(len(value))]),
                                                reduce_op="sum")
                mean = total[0] / total[1]
            else:
                mean = value.mean()
            # sync_dist: the reduced value is the same in every process (Lightning asks for it in DDP)
            self.log(key, mean, on_step=False, on_epoch=True, prog_bar=(key == "val_loss"), sync_dist=distributed)
        self._step_values[stage] = {}

    def on_train_epoch_start(self) -> None:
        self._step_values["train"] = {}

    def on_validation_epoch_start(self) -> None:
        self._step_values["val"] = {}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._gather("train", outputs)

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._gather("val", outputs)

    def on_train_epoch_end(self) -> None:
        self._log_means("train")

    def on_validation_epoch_end(self) -> None:
        self._log_means("val")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        return self.with_lr_schedule(make_adam(self.parameters(), float(self.hparams.get("lr", 1e-3)), self))

    def with_lr_schedule(self, optimizer):
        """The optimizer alone (`lr_schedule: constant`) or with its per-epoch cosine scheduler."""
        if self.hparams.get("lr_schedule", "constant") == "constant":
            return optimizer

        def factor(epoch: int) -> float:  # a plain function: LambdaLR's state_dict keeps no copy of it
            epochs = self.trainer.max_epochs if self._trainer is not None else None
            return cosine_factor(epoch, epochs) if epochs and epochs > 0 else 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
