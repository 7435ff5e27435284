"""What the IPU path needs before poptorch: the `ipu:` options of a fit config and the checks of the pinned stack.

Only the standard library is imported here; poptorch is imported by import_poptorch alone.
cosmolit.backends.select and cosmolit.backends.ipu both take these from here, and select imports
ipu (never the reverse).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Optional

from cosmolit.errors import UsageError

IPU_PRECISIONS = ("32-true", "32", "16-mixed")

PINNED_STACK_HINT = (
    "the IPU needs the pinned Graphcore stack: Python 3.10, torch 2.0.1, pytorch-lightning 2.0.9 "
    "(Lightning removed IPU support in 2.1 and lightning-graphcore is broken); install it with "
    "`pip install -c constraints/ipu.txt -e \".[ipu]\"` in a fresh virtual environment"
)
POPTORCH_HINT = (
    "install the poptorch wheel shipped with the Poplar SDK 3.3 or 3.4 (pip install <sdk>/poptorch-*.whl) "
    "and run `source <sdk>/enable.sh` first; poptorch is not on PyPI"
)


@dataclass
class IPUOptions:
    """The `ipu:` section of a fit config (used only with --accelerator ipu).

    Samples consumed per host step = batch_size x device_iterations x replication_factor
    x gradient_accumulation; the network (and BatchNorm) sees only batch_size at a time.
    """

    device_iterations: int = 1  # optimizer steps run on the IPU per host call (poptorch deviceIterations)
    replication_factor: int = 1  # data-parallel copies of the model, one IPU each (= --devices)
    gradient_accumulation: int = 1  # micro-batches accumulated per optimizer step
    precision: Optional[str] = None  # "32-true" or "16-mixed"; None: the trainer's precision
    seed: Optional[int] = None  # IPU random seed (poptorch randomSeed); None: the trainer's seed
    autoreport_dir: Optional[str] = None  # write PopVision reports there (autoReport.all)
    available_memory_proportion: Optional[float] = None  # share of tile memory for matmul/conv temporaries
    executable_cache_dir: Optional[str] = None  # cache compiled graphs there (skips recompilation)

    def __post_init__(self):
        for name in ("device_iterations", "replication_factor", "gradient_accumulation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.precision is not None and self.precision not in IPU_PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not allowed on IPU; choose one of 32-true, 16-mixed")
        amp = self.available_memory_proportion
        if amp is not None and not 0.0 < amp <= 1.0:
            raise ValueError(f"available_memory_proportion must lie in (0, 1], got {amp}")

    @property
    def samples_per_step_factor(self) -> int:
        """Micro-batches consumed per host step (multiply by the batch size for samples)."""
        return self.device_iterations * self.replication_factor * self.gradient_accumulation


def lightning_version() -> str:
    """The installed pytorch-lightning version, read without importing it."""
    try:
        return importlib.metadata.version("pytorch-lightning")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def is_ipu_stack() -> bool:
    """True when pytorch-lightning 2.0.x is installed: the last Lightning with IPUStrategy built in."""
    return lightning_version().startswith("2.0.")


def poptorch_available() -> bool:
    """poptorch can be found (it is imported only by import_poptorch)."""
    return importlib.util.find_spec("poptorch") is not None


def import_poptorch():
    """Import poptorch or raise UsageError with what to install."""
    if not poptorch_available():
        raise UsageError(f"--accelerator ipu: poptorch is not installed; {POPTORCH_HINT}")
    try:
        import poptorch
    except Exception as exc:  # the SDK not enabled, or a torch version poptorch refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--accelerator ipu: poptorch failed to import ({first}); {POPTORCH_HINT}") from None
    return poptorch


def check_ipu_stack():
    """Raise UsageError unless the pinned IPU stack and poptorch are usable; returns poptorch."""
    if not is_ipu_stack():
        raise UsageError(f"--accelerator ipu: pytorch-lightning {lightning_version()} is installed but {PINNED_STACK_HINT}")
    return import_poptorch()
