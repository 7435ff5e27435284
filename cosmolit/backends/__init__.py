"""Accelerator selection (cpu, gpu, ipu) and the few IPU rules models must follow."""

from __future__ import annotations


def on_ipu(module) -> bool:
    """True when `module` (a LightningModule) is being run by Lightning's IPUStrategy."""
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and type(trainer.strategy).__name__ == "IPUStrategy"


def mark_loss(module, loss):
    """Mark a hand-written loss as the step's single loss: poptorch.identity_loss on IPU, identity elsewhere."""
    if on_ipu(module):
        import poptorch

        return poptorch.identity_loss(loss, reduction="mean")
    return loss
