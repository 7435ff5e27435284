"""Safe checkpoint loading: a colleague's checkpoint never runs code on your machine.

A Lightning checkpoint is a pickle. cosmolit loads every checkpoint with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain Python types
(dict, list, tuple, str, int, float, bool, None), and builds the model from the stored
hyper-parameters. cosmolit's checkpoints carry, besides Lightning's usual content:

    checkpoint["cosmolit"] = {"model": "cnn" | "bnn" | "vae", "class": "ShapeCNN", "version": "0.1.0",
                              "torch": ..., "pytorch_lightning": ...}
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from cosmolit.errors import UsageError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with one clear line for every way a file can be wrong."""
    import torch

    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise UsageError(f"checkpoint {str(path)!r} is a folder; give the .ckpt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        if "weights_only" in str(exc) or "Unsupported" in str(exc) or "global" in str(exc).lower():
            raise UsageError(
                f"checkpoint {str(path)!r} was refused: it holds Python objects other than tensors and plain "
                f"types, which could run code when loaded ({first[:160]})"
            ) from None
        raise UsageError(f"checkpoint {str(path)!r} is not a readable checkpoint ({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint {str(path)!r} is truncated or not a PyTorch checkpoint ({msg[:160]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(f"checkpoint {str(path)!r} is not a cosmolit/Lightning checkpoint (no state_dict)")
    return ckpt


def checkpoint_kind(ckpt: dict, path: str | Path = "checkpoint") -> str:
    """The model kind ('cnn', 'bnn', 'vae') a checkpoint holds."""
    from cosmolit.models import MODEL_KINDS

    meta = ckpt.get("cosmolit") or {}
    kind = meta.get("model")
    if kind in MODEL_KINDS:
        return kind
    raise UsageError(
        f"checkpoint {str(path)!r} was not written by cosmolit fit (no model kind recorded); "
        f"expected one of {', '.join(MODEL_KINDS)}"
    )


def load_model(path: str | Path, expected: str | None = None, map_location: str = "cpu"):
    """Load a cosmolit model from a checkpoint safely; `expected` refuses another model kind."""
    from cosmolit.models import model_class

    ckpt = read_checkpoint(path)
    kind = checkpoint_kind(ckpt, path)
    if expected is not None and kind != expected:
        raise UsageError(f"checkpoint {str(path)!r} holds a {kind} model, not a {expected} model")
    cls = model_class(kind)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    try:
        model = cls(**hparams)
    except TypeError as exc:
        raise UsageError(f"checkpoint {str(path)!r} has hyper-parameters this cosmolit cannot use: {exc}") from None
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        names = (list(missing) + list(unexpected))[:3]
        raise UsageError(
            f"checkpoint {str(path)!r} does not match the {kind} model built from its hyper-parameters "
            f"(e.g. {', '.join(names)})"
        )
    if hasattr(model, "on_load_checkpoint"):
        model.on_load_checkpoint(ckpt)
    model.eval()
    return model.to(map_location), kind, ckpt


def describe_checkpoint(path: str | Path) -> str:
    ckpt = read_checkpoint(path)
    meta = ckpt.get("cosmolit") or {}
    hp = ckpt.get("hyper_parameters") or {}
    lines = [
        f"checkpoint      {path}",
        f"model           {meta.get('model', 'unknown')} ({meta.get('class', '?')})",
        f"cosmolit        {meta.get('version', 'unknown')}",
        f"torch           {meta.get('torch', 'unknown')}, pytorch-lightning {ckpt.get('pytorch-lightning_version', '?')}",
        f"epoch / step    {ckpt.get('epoch', '?')} / {ckpt.get('global_step', '?')}",
        f"seed            {meta.get('seed', 'unknown')}",
    ]
    prov = hp.get("provenance") or {}
    if prov:
        lines.append(f"trained on      {prov.get('path', '?')} (seed {prov.get('seed', '?')}, n {prov.get('n', '?')})")
    lines.append("hyper-parameters:")
    for key, value in hp.items():
        if key in ("provenance",):
            continue
        text = repr(value)
        lines.append(f"  {key}: {text if len(text) < 120 else text[:117] + '...'}")
    if meta.get("config"):
        lines.append("config:")
        lines.extend(f"  {line}" for line in str(meta["config"]).rstrip().splitlines())
    return "\n".join(lines)
