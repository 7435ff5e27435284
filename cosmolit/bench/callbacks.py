"""Timing callbacks: wall time per training step and per epoch, warm-up excluded.

The study (Arcelin 2021, arXiv:2106.02465) timed the wall clock from the end of epoch 10 to
the end of epoch 110. cosmolit records every step and every epoch after a configurable
warm-up and reports the median and the spread (quartiles, IQR, min, max) instead of one total.

Device synchronisation: CUDA kernels run asynchronously, so the clock is read only after
`torch.cuda.synchronize()` on a CUDA device. On CPU nothing is needed, and on an IPU a
PopTorch call returns when the device has finished; there, one Lightning "step" runs
`device_iterations` optimizer steps, so the recorded time is divided by that number.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np

STAT_KEYS = ("n", "median", "q1", "q3", "iqr", "min", "max", "mean")


def summarize(values: Iterable[float]) -> dict:
    """Median and spread of timings [s]: n, median, q1, q3, iqr, min, max, mean.

    An empty input gives n = 0 and NaN figures (the caller decides whether that is an error).
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        nan = float("nan")
        return {"n": 0, "median": nan, "q1": nan, "q3": nan, "iqr": nan, "min": nan, "max": nan, "mean": nan}
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return {"n": int(arr.size), "median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "min": float(arr.min()), "max": float(arr.max()), "mean": float(arr.mean())}


def synchronize(device=None) -> None:
    """Wait for queued device work: torch.cuda.synchronize on CUDA, nothing on CPU or IPU."""
    import torch

    if device is None:
        return
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)


class StepClock:
    """Time a sequence of steps by hand (bare PyTorch loops), with the same warm-up rule as the callback.

    >>> clock = StepClock(warmup=5, device="cuda:0")
    >>> for batch in data:
    ...     clock.start(); train_step(batch); clock.stop()
    >>> clock.summary()["median"]
    """

    def __init__(self, warmup: int = 0, device=None, steps_per_call: int = 1, sync: bool = True):
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if steps_per_call <= 0:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
        self.warmup = int(warmup)
        self.device = device
        self.steps_per_call = int(steps_per_call)
        self.sync = sync
        self.calls = 0
        self.times: list[float] = []
        self._t0: float | None = None

    def start(self) -> None:
        if self.sync:
            synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self._t0 is None:
            raise RuntimeError("StepClock.stop() called before start()")
        if self.sync:
            synchronize(self.device)
        dt = (time.perf_counter() - self._t0) / self.steps_per_call
        self._t0 = None
        if self.calls >= self.warmup:
            self.times.append(dt)
        self.calls += 1
        return dt

    def summary(self) -> dict:
        return summarize(self.times)


def _timing_callback_class():
    import pytorch_lightning as pl

    class TimingCallback(pl.Callback):
        """Record the wall time of every training step and epoch after a warm-up.

        warmup_steps: host calls (Lightning batches) not recorded at the start of training.
        warmup_epochs: epochs not recorded (the study: 10).
        steps_per_call: optimizer steps per Lightning batch (IPU device_iterations), divides step times.
        sync: synchronise the device around each step (CUDA); epochs are always synchronised.

        A step runs from on_train_batch_start to this callback's on_train_batch_end: the step alone,
        without fetching the batch or the module's own batch-end work. An epoch runs from its
        on_train_epoch_start to the next epoch's (or to on_train_end): every batch with its fetching
        and transfer, validation, the module's and the other callbacks' epoch-end work, logging
        and the loop's bookkeeping.
        """

        def __init__(self, warmup_steps: int = 0, warmup_epochs: int = 0, steps_per_call: int = 1,
                     sync: bool = True):
            super().__init__()
            if warmup_steps < 0 or warmup_epochs < 0:
                raise ValueError("warm-up counts must be >= 0")
            if steps_per_call <= 0:
                raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
            self.warmup_steps = int(warmup_steps)
            self.warmup_epochs = int(warmup_epochs)
            self.steps_per_call = int(steps_per_call)
            self.sync = sync
            self.step_times: list[float] = []
            self.epoch_times: list[float] = []
            self.calls = 0
            self.epochs = 0
            self._step_t0: float | None = None
            self._epoch_t0: float | None = None

        @staticmethod
        def _device(pl_module):
            try:
                return pl_module.device
            except AttributeError:  # pragma: no cover - not a LightningModule
                return None

        def on_train_epoch_start(self, trainer, pl_module):
            self._close_epoch(pl_module)  # the previous epoch ends where this one starts
            synchronize(self._device(pl_module))
            self._epoch_t0 = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx, *args):
            if self.sync:
                synchronize(self._device(pl_module))
            self._step_t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
            if self._step_t0 is None:
                return
            if self.sync:
                synchronize(self._device(pl_module))
            dt = (time.perf_counter() - self._step_t0) / self.steps_per_call
            self._step_t0 = None
            if self.calls >= self.warmup_steps:
                self.step_times.append(dt)
            self.calls += 1

        def on_train_end(self, trainer, pl_module):
            self._close_epoch(pl_module)

        def _close_epoch(self, pl_module):
            if self._epoch_t0 is None:
                return
            synchronize(self._device(pl_module))
            dt = time.perf_counter() - self._epoch_t0
            self._epoch_t0 = None
            if self.epochs >= self.warmup_epochs:
                self.epoch_times.append(dt)
            self.epochs += 1

        def summary(self) -> dict:
            """{"step": summarize(step_times), "epoch": summarize(epoch_times), "calls", "epochs"}."""
            return {"step": summarize(self.step_times), "epoch": summarize(self.epoch_times),
                    "calls": self.calls, "epochs": self.epochs}

    return TimingCallback


def TimingCallback(warmup_steps: int = 0, warmup_epochs: int = 0, steps_per_call: int = 1, sync: bool = True):
    """A Lightning Callback timing every training step and epoch (see the class docstring)."""
    return _timing_callback_class()(warmup_steps=warmup_steps, warmup_epochs=warmup_epochs,
                                    steps_per_call=steps_per_call, sync=sync)


def study_seconds(step_time: float, batch_size: int, epoch_images: int = 8000, epochs: int = 100) -> float:
    """The study's unit: seconds for `epochs` epochs of `epoch_images` images at one step time [s].

    step_time x epoch_images / batch_size x epochs, as the study counted steps per epoch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return float(step_time) * epoch_images / batch_size * epochs


def images_per_second(step_time: float, batch_size: int) -> float:
    return float(batch_size) / float(step_time) if step_time > 0 else float("nan")


def ratio_table(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Element-wise a / b (NaN where b is not positive)."""
    return [float(x) / float(y) if y and y > 0 else float("nan") for x, y in zip(a, b)]
