"""What a Lightning module or data module can ask about the run it is part of, without the
accelerator code (cosmolit.backends builds on this; the data module sits below it)."""

from __future__ import annotations


def on_ipu(module) -> bool:
    """True when `module` (a LightningModule or LightningDataModule) is being run by Lightning's IPUStrategy."""
    # LightningModule keeps it in `_trainer` (its `trainer` property raises when detached);
    # LightningDataModule in a plain `trainer` attribute.
    trainer = module._trainer if hasattr(module, "_trainer") else getattr(module, "trainer", None)
    return trainer is not None and type(trainer.strategy).__name__ == "IPUStrategy"
