"""Choosing the accelerator (cpu, gpu, ipu) and the Lightning Trainer arguments that go with it.

Only the standard library is imported at module level: torch, pytorch_lightning and poptorch
are imported inside the functions that need them, so `import cosmolit.backends` stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

from cosmolit.errors import UsageError

ACCELERATORS = ("auto", "cpu", "gpu", "ipu")
CPU_PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed")
GPU_PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "64-true")
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


def _ipu_hardware() -> bool:
    if not (is_ipu_stack() and poptorch_available()):
        return False
    try:
        return bool(import_poptorch().ipuHardwareIsAvailable())
    except UsageError:
        return False


def resolve_accelerator(name: str) -> str:
    """'auto' -> 'ipu' (pinned stack, poptorch and IPUs present), else 'gpu' (CUDA), else 'cpu'.

    'cpu', 'gpu' and 'ipu' are returned as given ('gpu' only when CUDA is usable);
    anything else raises UsageError.
    """
    if name not in ACCELERATORS:
        raise UsageError(f"unknown accelerator {name!r}; choose one of {', '.join(ACCELERATORS)}")
    if name in ("cpu", "ipu"):
        return name
    import torch

    if name == "gpu":
        if not torch.cuda.is_available():
            raise UsageError("--accelerator gpu: no CUDA device is visible to torch; use cpu or auto")
        return "gpu"
    if _ipu_hardware():
        return "ipu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def check_ipu_stack():
    """Raise UsageError unless the pinned IPU stack and poptorch are usable; returns poptorch."""
    if not is_ipu_stack():
        raise UsageError(f"--accelerator ipu: pytorch-lightning {lightning_version()} is installed but {PINNED_STACK_HINT}")
    return import_poptorch()


def trainer_kwargs(
    accelerator: str,
    devices: int,
    precision: str,
    seed: int,
    ipu: IPUOptions | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """pl.Trainer keyword arguments for one accelerator; prints one line saying what was chosen.

    `accelerator` is a resolved name (cpu, gpu or ipu; 'auto' is resolved here too).
    gpu or cpu with devices > 1 uses DDP, one process per device (NCCL between GPUs, gloo between
    CPU processes; Lightning starts the other processes itself, or takes them from SLURM's srun,
    see `num_nodes`); ipu builds Lightning's IPUStrategy with poptorch.Options from `ipu`
    (devices = replication factor).
    """
    accelerator = resolve_accelerator(accelerator)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices <= 0:
        raise UsageError(f"--devices must be a positive integer, got {devices!r}")
    if accelerator == "cpu":
        _check_precision(precision, CPU_PRECISIONS, "cpu")
        if devices > 1:
            echo(f"accelerator: cpu x{devices} (DDP over gloo, one process each), precision {precision}")
            return {"accelerator": "cpu", "devices": devices, "strategy": "ddp", "precision": precision}
        echo(f"accelerator: cpu, precision {precision}")
        return {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": precision}
    if accelerator == "gpu":
        _check_precision(precision, GPU_PRECISIONS, "gpu")
        import torch

        available = torch.cuda.device_count()
        if devices > available:
            raise UsageError(f"--devices {devices}: only {available} CUDA device(s) are visible")
        strategy = "ddp" if devices > 1 else "auto"
        echo(f"accelerator: gpu x{devices}" + (" (DDP, one process per GPU)" if devices > 1 else "")
             + f", precision {precision}")
        return {"accelerator": "gpu", "devices": devices, "strategy": strategy, "precision": precision}

    from cosmolit.backends.ipu import ipu_trainer_kwargs

    return ipu_trainer_kwargs(devices, precision, seed, ipu, echo)


def num_nodes(given: Optional[int] = None, environ: Optional[dict] = None) -> int:
    """Machines of a DDP run: `given`, else SLURM's node count (SLURM_NNODES) for a process started
    by srun (SLURM_NTASKS set, job name not bash / interactive: Lightning's own test), else 1.
    Lightning takes the ranks from srun's SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID and SLURM_NTASKS,
    and refuses a num_nodes other than SLURM_NNODES."""
    import os

    env = os.environ if environ is None else environ
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given <= 0:
            raise UsageError(f"num_nodes must be a positive integer, got {given!r}")
        return given
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        try:
            return max(1, int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1))
        except ValueError:
            raise UsageError(f"SLURM_NNODES {env.get('SLURM_NNODES')!r} is not a number of nodes") from None
    return 1


def _check_precision(precision: str, allowed: tuple, where: str) -> None:
    if precision not in allowed:
        raise UsageError(f"precision {precision!r} is not supported on {where}; choose one of {', '.join(allowed)}")
