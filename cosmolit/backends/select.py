"""Choosing the accelerator (cpu, gpu, ipu) and the Lightning Trainer arguments that go with it.

Only the standard library is imported at module level: torch, pytorch_lightning and poptorch
are imported inside the functions that need them, so `import cosmolit.backends` stays cheap.
"""

from __future__ import annotations

from typing import Callable, Optional

from cosmolit.backends.ipu_options import (IPUOptions, check_ipu_stack, import_poptorch,  # noqa: F401 (re-exported)
                                           is_ipu_stack, poptorch_available)
from cosmolit.errors import UsageError

ACCELERATORS = ("auto", "cpu", "gpu", "ipu")
CPU_PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed")
GPU_PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "64-true")
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
