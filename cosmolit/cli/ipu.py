"""`cosmolit check-ipu`: will this model compile for a Graphcore IPU? Checked on the CPU, no IPU needed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from cosmolit.backends.check import DEFAULT_BANDS, DEFAULT_STAMP, CheckReport, check_module, synthetic_batches
from cosmolit.cli._app import command
from cosmolit.errors import UsageError


def build_model(kind: str, config: Optional[str | Path] = None, bands: str = DEFAULT_BANDS, stamp: int = DEFAULT_STAMP,
                train_size: int = 8000):
    """A model of `kind` with its default (or the YAML's) hyper-parameters, as `cosmolit fit` builds it."""
    from cosmolit.config import accepted_kwargs
    from cosmolit.models import model_class
    from cosmolit.train import load_fit_config

    _, model_cfg = load_fit_config(kind, config, {})
    cls = model_class(kind)
    kwargs = dict(dataclasses.asdict(model_cfg))
    kwargs.update(bands=bands, stamp=stamp, train_size=train_size)
    return cls(**accepted_kwargs(cls, kwargs))


def check_model(kind: str, config: Optional[str | Path] = None, batch_size: int = 8, seed: int = 0) -> CheckReport:
    """Build model `kind` and check it (the body of `cosmolit check-ipu`)."""
    import torch

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size!r}")
    torch.manual_seed(seed)
    model = build_model(kind, config)
    batch_a, batch_b = synthetic_batches(kind, model, batch_size, seed=seed)
    return check_module(model, batch_a, batch_b, name=kind)


@command("check-ipu")
def check_ipu(
    model: str = typer.Option(..., "--model", "-m", help="Model to check: vae, cnn or bnn."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Fit config YAML (its model: section is used)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Micro-batch size of the synthetic batches."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --json file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and of the synthetic batches."),
) -> None:
    """Run one training step (+ backward) and one predict step on the CPU under an operator recorder and
    report what PopTorch 3.4 would refuse: unlowered aten ops, host synchronisation, data-dependent
    shapes, a missing or extra loss. Exit 0 when clean, 1 otherwise."""
    from cosmolit.models import MODEL_KINDS

    if model not in MODEL_KINDS:
        raise UsageError(f"unknown model {model!r}; choose one of {', '.join(MODEL_KINDS)}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size}")
    if json_out is not None:
        from cosmolit.dataset import check_output_path

        check_output_path(json_out, force=force, what="--json file")
    report = check_model(model, config=config, batch_size=batch_size, seed=seed)
    typer.echo(report.format())
    if json_out is not None:
        from cosmolit.dataset import atomic_path

        with atomic_path(json_out) as tmp:
            Path(tmp).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        typer.echo(f"report written to {json_out}")
    if not report.ok:
        raise typer.Exit(1)
