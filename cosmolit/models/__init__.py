"""LightningModules: the VAE, the shape CNN and the Pyro BNN (imported lazily by name)."""

from __future__ import annotations

import importlib

# model kind -> (module, class name)
MODEL_KINDS = {
    "cnn": ("cosmolit.models.cnn", "ShapeCNN"),
    "bnn": ("cosmolit.models.bnn", "BayesianShapeCNN"),
    "vae": ("cosmolit.models.vae", "GalaxyVAE"),
}


def model_class(kind: str):
    from cosmolit.errors import UsageError

    if kind not in MODEL_KINDS:
        raise UsageError(f"unknown model {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    module, name = MODEL_KINDS[kind]
    return getattr(importlib.import_module(module), name)


def __getattr__(name):
    for module, cls in MODEL_KINDS.values():
        if cls == name:
            return getattr(importlib.import_module(module), cls)
    raise AttributeError(name)
