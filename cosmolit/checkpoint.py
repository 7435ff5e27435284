"""Safe checkpoint loading: a colleague's checkpoint never runs code on your machine.

A Lightning checkpoint is a pickle. cosmolit loads every checkpoint with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain Python types
(dict, list, tuple, str, int, float, bool, None), and builds the model from the stored
hyper-parameters. cosmolit's checkpoints carry, besides Lightning's usual content:

    checkpoint["cosmolit"] = {"model": "cnn" | "bnn" | "vae", "class": "ShapeCNN", "version": "0.1.0",
                              "torch": ..., "pytorch_lightning": ..., "seed": ..., "config": YAML text,
                              "batches_in_epoch": ..., "torch_rng": uint8 tensor,
                              "calibration": {path, seed, n, fingerprint, ...} after `cosmolit calibrate`}

`data_overlap` tells whether a dataset is the checkpoint's training file (hyper-parameter
`provenance`) or calibration file: by the recorded `dataset_fingerprint` (a hash of the file's
content, so a copy or a moved file is recognised), or, for records without one, by path and by
the content of the recorded file while it exists.

Lightning's own resume path (`Trainer.fit(ckpt_path=...)`) goes through `safe_checkpoint_io()`,
a CheckpointIO plugin that loads with the same `read_checkpoint` and writes every checkpoint
atomically (temporary file in the same folder, fsync, os.replace), so a kill or a full disk
never leaves a truncated file under the final name.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

from cosmolit.dataset import atomic_path, dataset_fingerprint
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
        found = re.search(r"(?:[Uu]nsupported (?:global|class|operand)|GLOBAL)[^\n]*?(?= was | whose |\. |\n|$)", str(exc))
        if found:
            first = found.group(0).strip()
        if "weights_only" in str(exc) or "Unsupported" in str(exc) or "global" in str(exc).lower():
            raise UsageError(
                f"checkpoint {str(path)!r} was refused: it holds Python objects other than tensors and plain "
                f"types, which could run code when loaded ({first[:160]})"
            ) from None
        raise UsageError(f"checkpoint {str(path)!r} is not a readable checkpoint ({first[:160]})") from None
    except Exception as exc:  # truncated zip, a text file, a legacy pickle that is not a checkpoint...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint {str(path)!r} is truncated or not a PyTorch checkpoint ({msg[:160]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UsageError(f"checkpoint {str(path)!r} is not a cosmolit/Lightning checkpoint (no state_dict)")
    return ckpt


def save_checkpoint_atomic(checkpoint: dict, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then os.replace onto `path`
    (cosmolit.dataset.atomic_path: Ctrl-C, SIGTERM or an error leave no temporary file)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # serialise first: a pickling error leaves no file at all
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    return path


_SAFE_IO_CLASS = None


def safe_checkpoint_io():
    """A Lightning CheckpointIO plugin: weights_only loading (read_checkpoint) and atomic saving.

    Pass it as `pl.Trainer(plugins=[safe_checkpoint_io()])`; Lightning then uses it for
    `trainer.save_checkpoint`, ModelCheckpoint and `trainer.fit(ckpt_path=...)` (resume), on
    PL 2.0.9 as on 2.6.
    """
    global _SAFE_IO_CLASS
    if _SAFE_IO_CLASS is None:
        from pytorch_lightning.plugins import TorchCheckpointIO

        class SafeCheckpointIO(TorchCheckpointIO):
            def save_checkpoint(self, checkpoint, path, storage_options=None):
                if storage_options is not None:
                    raise TypeError("SafeCheckpointIO does not take storage_options")
                save_checkpoint_atomic(checkpoint, path)

            def load_checkpoint(self, path, map_location=None, weights_only=None):
                # weights_only is always True here, whatever the caller asks for.
                return read_checkpoint(path)

        _SAFE_IO_CLASS = SafeCheckpointIO
    return _SAFE_IO_CLASS()


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


def _same_file(record: dict, path: Path, fingerprint: str) -> bool:
    """Whether a provenance / calibration record ({path, fingerprint?}) names the dataset at `path`:
    by its recorded fingerprint; without one (older checkpoints), by its resolved path, or by the
    content of the recorded file when it still exists (a copy)."""
    if record.get("fingerprint"):
        return record["fingerprint"] == fingerprint
    recorded = record.get("path")
    if not recorded:
        return False
    recorded = Path(str(recorded))
    if recorded.resolve() == path.resolve():
        return True
    try:
        return recorded.is_file() and dataset_fingerprint(recorded) == fingerprint
    except Exception:  # moved, replaced by something that is not a dataset any more...
        return False


def data_overlap(ckpt: dict, path: str | Path, roles=("training", "calibration")) -> list[str]:
    """Which of `roles` the dataset at `path` played for a checkpoint: 'training' (the file of
    hyper_parameters.provenance, validation split included) and/or 'calibration' (the file of
    cosmolit.calibration, written by `cosmolit calibrate`)."""
    records = {"training": (ckpt.get("hyper_parameters") or {}).get("provenance"),
               "calibration": (ckpt.get("cosmolit") or {}).get("calibration")}
    path = Path(path)
    fingerprint = dataset_fingerprint(path)
    return [role for role in roles if isinstance(records[role], dict) and _same_file(records[role], path, fingerprint)]


def refuse_overlap(ckpt: dict, path: str | Path, roles, allow: bool, advice: str) -> list[str]:
    """data_overlap, with one UsageError line when the dataset played one of `roles` and `allow`
    (--allow-training-data) is not given; returns the roles found."""
    found = data_overlap(ckpt, path, roles)
    if found and not allow:
        raise UsageError(f"dataset {str(path)!r} is the {' and '.join(found)} file of this checkpoint; {advice}, "
                         "or pass --allow-training-data to use it anyway")
    return found


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
    cal = meta.get("calibration") or {}
    if cal:
        lines.append(f"calibrated on   {cal.get('path', '?')} (seed {cal.get('seed', '?')}, n {cal.get('n', '?')})")
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
