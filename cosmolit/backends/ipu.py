"""The Graphcore IPU backend: poptorch.Options and Lightning 2.0.x's IPUStrategy built from IPUOptions.

poptorch and pytorch_lightning.strategies.ipu are imported only inside these functions, after
check_ipu_stack() has said that the pinned stack (torch 2.0.1, pytorch-lightning 2.0.9) and
poptorch are present.
"""

from __future__ import annotations

from typing import Callable, Optional

from cosmolit.backends.ipu_options import IPU_PRECISIONS, IPUOptions, check_ipu_stack
from cosmolit.errors import UsageError


def poptorch_options(opts: IPUOptions, training: bool, seed: Optional[int] = None):
    """poptorch.Options for training (with gradient accumulation) or inference (without)."""
    poptorch = check_ipu_stack()
    po = poptorch.Options()
    po.deviceIterations(opts.device_iterations)
    po.replicationFactor(opts.replication_factor)
    po.Training.gradientAccumulation(opts.gradient_accumulation if training else 1)
    random_seed = opts.seed if opts.seed is not None else seed
    if random_seed is not None:
        po.randomSeed(int(random_seed))
    if opts.available_memory_proportion is not None:
        # each replica holds the whole model on one IPU, called IPU0 in poptorch's numbering
        po.setAvailableMemoryProportion({"IPU0": float(opts.available_memory_proportion)})
    if opts.executable_cache_dir:
        po.enableExecutableCaching(str(opts.executable_cache_dir))
    return po


def ipu_strategy(opts: IPUOptions, seed: Optional[int] = None):
    """Lightning's IPUStrategy with explicit training and inference poptorch.Options."""
    check_ipu_stack()
    from pytorch_lightning.strategies import IPUStrategy
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    try:
        return IPUStrategy(
            device_iterations=opts.device_iterations,
            autoreport=opts.autoreport_dir is not None,
            autoreport_dir=opts.autoreport_dir,
            training_opts=poptorch_options(opts, training=True, seed=seed),
            inference_opts=poptorch_options(opts, training=False, seed=seed),
        )
    except MisconfigurationException as exc:
        raise UsageError(f"--accelerator ipu: {str(exc).splitlines()[0]}") from None


def ipu_trainer_kwargs(
    devices: int, precision: str, seed: int, ipu: IPUOptions | None = None, echo: Callable[[str], None] = print
) -> dict:
    """pl.Trainer kwargs for the IPU: `devices` IPUs are `devices` replicas of the model.

    Gradient accumulation is done by PopTorch on the device (poptorch.Options), so the Trainer's
    own accumulate_grad_batches stays 1: one Lightning batch is one host step of
    batch x device_iterations x replicas x accumulation samples.
    """
    check_ipu_stack()
    opts = ipu or IPUOptions()
    if ipu is not None and ipu.replication_factor not in (1, devices) and devices != 1:
        raise UsageError(f"--devices {devices} disagrees with ipu.replication_factor {ipu.replication_factor}; give one of them")
    replicas = devices if devices != 1 else opts.replication_factor
    opts = IPUOptions(**{**opts.__dict__, "replication_factor": replicas})
    precision = opts.precision or precision
    if precision not in IPU_PRECISIONS:
        raise UsageError(f"precision {precision!r} is not supported on ipu; choose one of 32-true, 16-mixed")
    strategy = ipu_strategy(opts, seed=seed)
    echo(
        f"accelerator: ipu x{replicas} (replicas), precision {precision}, device_iterations {opts.device_iterations}, "
        f"gradient_accumulation {opts.gradient_accumulation}: each host step takes "
        f"{opts.samples_per_step_factor} x batch-size samples"
    )
    return {"accelerator": "ipu", "devices": replicas, "strategy": strategy, "precision": precision}
