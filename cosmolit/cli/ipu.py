"""`cosmolit check-ipu`: will this model compile for a Graphcore IPU? Checked on the CPU, no IPU needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cosmolit.cli._app import command
from cosmolit.errors import UsageError


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
    from cosmolit.backends.check import check_model
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
