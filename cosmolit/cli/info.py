"""`cosmolit info FILE`: provenance of a dataset or a checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from cosmolit.cli._app import command
from cosmolit.errors import UsageError


@command("info")
def info(path: Path = typer.Argument(..., help="A dataset (.h5) or a checkpoint (.ckpt).")) -> None:
    """Print the seed, versions, shape and config stored in a dataset or checkpoint."""
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist")
    if path.suffix == ".ckpt":
        from cosmolit.checkpoint import describe_checkpoint

        typer.echo(describe_checkpoint(path))
        return
    from cosmolit.dataset import inspect_dataset

    d = inspect_dataset(path, require_truth=())
    typer.echo(f"dataset         {d.path}")
    typer.echo(f"stamps          {d.n} x {len(d.bands)} bands ({d.bands}) x {d.height} x {d.width}")
    typer.echo(f"pixel scale     {d.pixel_scale} arcsec")
    typer.echo(f"PSF FWHM        {', '.join(f'{x:.3g}' for x in d.psf_fwhm)} arcsec")
    typer.echo(f"clean targets   {'yes' if d.has_clean else 'no'}")
    typer.echo(f"noiseless scene {'yes (data.renoise can draw fresh noise)' if d.has_scene else 'no'}")
    typer.echo(f"truth columns   {', '.join(d.truth_names) or 'none'}")
    typer.echo(f"seed            {d.seed}")
    typer.echo(f"format version  {d.format_version}")
    typer.echo(f"cosmolit        {d.cosmolit_version or 'unknown'}")
    if d.config:
        typer.echo("config:")
        for line in d.config.rstrip().splitlines():
            typer.echo(f"  {line}")
