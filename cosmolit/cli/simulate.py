"""`cosmolit simulate`, `cosmolit merge`, `cosmolit show`: make, join and look at dataset files."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import contextlib

import typer

from cosmolit.cli._app import command


@contextlib.contextmanager
def _report_sigterm(out: Path):
    """SIGTERM (exit 143): say in one line that the unfinished output was removed."""
    from cosmolit.dataset import Terminated

    try:
        yield
    except Terminated:
        typer.echo(f"cosmolit: stopped by SIGTERM; the unfinished {str(out)!r} was removed", err=True)
        raise


@command("simulate")
def simulate_cmd(
    n: int = typer.Option(..., "--n", help="Number of stamps in the whole run (all shards together)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output dataset file (.h5)."),
    seed: int = typer.Option(0, "--seed", help="Run seed: the same seed and config give the same bytes."),
    workers: int = typer.Option(1, "--workers", "-w", help="Worker processes."),
    blend_fraction: Optional[float] = typer.Option(None, "--blend-fraction",
                                                   help="0: isolated galaxies, 1: only blends, between: a mix."),
    max_neighbors: Optional[int] = typer.Option(None, "--max-neighbors", help="Most neighbours in a blend (>= 1)."),
    noiseless: bool = typer.Option(False, "--noiseless", help="No noise (noise.mode: none)."),
    no_clean: bool = typer.Option(False, "--no-clean", help="Do not store the noiseless stamps (half the file; "
                                  "the VAE's denoising target, not needed by the shape networks)."),
    scene: bool = typer.Option(False, "--scene", help="Also store the noiseless scene, target + neighbours "
                               "(doubles the file): training can then draw fresh noise every epoch (data.renoise)."),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="CatSim FITS catalog instead of the embedded population."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML preset, e.g. configs/simulate/blends.yaml."),
    stamp_size: Optional[int] = typer.Option(None, "--stamp-size", help="Stamp side in pixels (multiple of 16)."),
    bands: Optional[str] = typer.Option(None, "--bands", help="Bands among ugrizy, e.g. gri."),
    shard: Optional[int] = typer.Option(None, "--shard", help="Index of this shard, 0 <= i < --num-shards."),
    num_shards: int = typer.Option(1, "--num-shards", help="Number of shards of the run."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Simulate LSST-like galaxy stamps (isolated or blended) into an HDF5 dataset."""
    from cosmolit.dataset import check_output_path
    from cosmolit.sim import load_simulation_config, simulate_to_file
    from cosmolit.errors import UsageError

    if n <= 0:
        raise UsageError(f"--n must be a positive integer, got {n}")
    if workers <= 0:
        raise UsageError(f"--workers must be a positive integer, got {workers}")
    check_output_path(out, force)
    cfg = load_simulation_config(config, {
        "blend.fraction": blend_fraction,
        "blend.max_neighbors": max_neighbors,
        "noise.mode": "none" if noiseless else None,
        "catalog": str(catalog) if catalog is not None else None,
        "stamp_size": stamp_size,
        "bands": bands,
        "store_clean": False if no_clean else None,
        "store_scene": True if scene else None,
    })
    with _report_sigterm(out):
        path = simulate_to_file(cfg, out, n=n, seed=seed, workers=workers, shard=shard, num_shards=num_shards,
                                force=force, progress=not quiet)
    if not quiet:
        typer.echo(f"wrote {path}")


@command("merge")
def merge_cmd(
    out: Path = typer.Argument(..., help="Merged dataset file (.h5)."),
    shards: List[Path] = typer.Argument(..., help="All shard files of one run."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge the shards of one `simulate --shard i --num-shards n` run into one file."""
    from cosmolit.sim import merge_files

    with _report_sigterm(out):
        path = merge_files(out, shards, force=force, progress=not quiet)
    if not quiet:
        typer.echo(f"wrote {path}")


@command("show")
def show_cmd(
    data: Path = typer.Argument(..., help="A dataset file (.h5)."),
    out: Path = typer.Option(..., "--out", "-o", help="Stamp grid PNG; histograms go to <stem>_truth.png."),
    n: int = typer.Option(16, "--n", help="Number of stamps in the grid."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing PNGs."),
) -> None:
    """Draw a grid of stamps (g, r, i colour composite) and histograms of the truth columns."""
    from cosmolit.sim.show import show_dataset

    grid, truth = show_dataset(data, out, n=n, force=force)
    typer.echo(f"wrote {grid} and {truth}")
