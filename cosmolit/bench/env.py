"""The environment a benchmark ran in: device, CPU model, library versions, threads. No host name."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(accelerator: str) -> str:
    """'cpu: <model>', 'cuda: <GPU name>' or 'ipu'."""
    if accelerator in ("gpu", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
        return "cuda: unavailable"
    if accelerator == "ipu":
        return "ipu"
    return f"cpu: {cpu_model()}"


def capture_environment(accelerator: str = "cpu", precision: str = "32-true", mode: str = "lightning",
                        **extra) -> dict:
    """A JSON-ready description of the machine and software; `extra` keys are added as given."""
    import torch

    from cosmolit.backends.memory import malloc_mode

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "accelerator": accelerator,
        "device": device_name(accelerator),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "precision": precision,
        "mode": mode,
        "malloc": malloc_mode(),  # cosmolit.backends.memory: retain (freed memory kept) or system
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "pytorch_lightning": _version("pytorch-lightning"),
        "pyro": _version("pyro-ppl"),
        "numpy": _version("numpy"),
        "cosmolit": _version("cosmolit"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    env.update(extra)
    return env
