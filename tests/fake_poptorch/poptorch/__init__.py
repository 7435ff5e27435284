"""TEST DOUBLE of Graphcore's poptorch, running on the CPU. It is NOT poptorch and proves nothing
about an IPU: it lets pytorch-lightning 2.0.9's real IPUAccelerator / IPUStrategy / IPUPrecision
run end to end in cosmolit's tests (a wiring test).

It is put on sys.path only by tests (tests/test_ipu_stack.py). Rather than passing calls through,
it enforces the PopTorch rules a model can break:

- trainingModel(model, options, optimizer): one optimizer of a type PopTorch supports; each call
  splits the host batch into micro-batches (deviceIterations x replicationFactor x
  gradientAccumulation), runs the forward (Lightning's wrapper calls training_step), requires the
  loss to come out of the forward marked by identity_loss (or a scalar from a torch loss
  function), then runs backward and the optimizer step itself;
- input shapes and dtypes are frozen by the first call (a static graph);
- host synchronisation (aten::_local_scalar_dense), operators PopTorch 3.4 does not lower,
  data-dependent shapes and self.log inside the compiled step raise;
- DataLoader does poptorch.DataLoader's batch arithmetic (combined batch = batch_size x
  deviceIterations x replicationFactor x gradientAccumulation, drop_last=True by default);
- ipuHardwareIsAvailable() is True (in this double only).
"""

from __future__ import annotations

import enum

import torch

from poptorch._executor import PoplarExecutor, identity_loss  # noqa: F401
from poptorch._options import Options  # noqa: F401

__version__ = "3.4.0+cpu-test-double"
IS_TEST_DOUBLE = True


class Error(RuntimeError):
    """poptorch.Error: what PopTorch raises when it cannot compile or run a model."""


class DataLoaderMode(enum.IntEnum):
    Sync = 0
    Async = 1
    AsyncRebatched = 2


class OutputMode(enum.IntEnum):
    Final = 0
    EveryN = 1
    All = 2
    Sum = 3
    Default = 4


def ipuHardwareIsAvailable(num_ipus: int = 1) -> bool:
    """True in this test double (real poptorch: physical IPUs are attached)."""
    return True


def trainingModel(model, options=None, optimizer=None):
    """Wrap `model` for training: forward, loss, backward and optimizer step run inside each call."""
    return PoplarExecutor(model, options or Options(), training=True, optimizer=optimizer)


def inferenceModel(model, options=None):
    """Wrap `model` for inference (no gradients); shares its weights with any training wrapper."""
    return PoplarExecutor(model, options or Options(), training=False)


class DataLoader(torch.utils.data.DataLoader):
    """poptorch.DataLoader's batch arithmetic over torch's DataLoader.

    Each item is one host step: batch_size x deviceIterations x replicationFactor x
    gradientAccumulation samples; the model sees batch_size at a time.
    """

    def __init__(self, options, dataset, batch_size=1, shuffle=False, num_workers=0, drop_last=True,
                 persistent_workers=None, auto_distributed_partitioning=True, mode=DataLoaderMode.Sync,
                 async_options=None, rebatched_worker_size=None, **kwargs):
        if not isinstance(options, Options):
            raise Error(f"poptorch.DataLoader needs poptorch.Options as first argument, got {type(options).__name__}")
        self._options = options
        factor = options.device_iterations * options.replication_factor * options.Training.gradient_accumulation
        self._combined_batch_size = None if batch_size is None else batch_size * factor
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        if (not drop_last and self._combined_batch_size is not None
                and not isinstance(dataset, torch.utils.data.IterableDataset)
                and len(dataset) % self._combined_batch_size != 0):
            raise Error(f"The number of elements in the dataset ({len(dataset)}) is not divisible by the number of "
                        f"elements processed per step ({self._combined_batch_size}) and drop_last=False")
        super().__init__(dataset, batch_size=self._combined_batch_size, shuffle=shuffle, num_workers=num_workers,
                         drop_last=drop_last, persistent_workers=persistent_workers, **kwargs)

    @property
    def combinedBatchSize(self):
        return self._combined_batch_size

    @property
    def options(self):
        return self._options


class _Optim:
    """poptorch.optim: the torch optimizers PopTorch accepts (LAMB omitted in this double)."""

    SGD = torch.optim.SGD
    Adam = torch.optim.Adam
    AdamW = torch.optim.AdamW
    RMSprop = torch.optim.RMSprop


optim = _Optim()
