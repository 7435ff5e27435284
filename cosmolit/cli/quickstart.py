"""`cosmolit quickstart`: the embedded default end to end, in a few minutes on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from cosmolit.cli._app import command
from cosmolit.errors import UsageError


@command("quickstart")
def quickstart(
    out: Path = typer.Option(Path("quickstart"), "--out", "-o", help="Folder for data, checkpoints and report."),
    n_train: int = typer.Option(4000, "--n-train", help="Simulated training stamps."),
    n_test: int = typer.Option(400, "--n-test", help="Simulated test stamps (a different seed)."),
    epochs: int = typer.Option(5, "--epochs", "-e"),
    loss: str = typer.Option("decoupled", "--loss", help="decoupled (means by squared error, covariance by "
                             "NLL), mse (means only) or nll (the study's exact Gaussian likelihood)."),
    workers: int = typer.Option(2, "--workers", "-w"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing quickstart folder."),
) -> None:
    """Simulate LSST-like galaxies, train the shape CNN briefly on the CPU, evaluate it against HSM."""
    from cosmolit.cli.models import evaluate_cmd
    from cosmolit.sim import SimulationConfig, simulate_to_file
    from cosmolit.train import fit

    for name, value in (("--n-train", n_train), ("--n-test", n_test), ("--epochs", epochs), ("--workers", workers)):
        if value <= 0:
            raise UsageError(f"{name} must be a positive integer, got {value}")
    from cosmolit.models.targets import SHAPE_LOSSES

    if loss not in SHAPE_LOSSES:
        raise UsageError(f"--loss {loss!r} is not allowed; choose one of {', '.join(SHAPE_LOSSES)}")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"folder {str(out)!r} is not empty; pass --force to start again")
    out.mkdir(parents=True, exist_ok=True)
    train, test = out / "train.h5", out / "test.h5"
    typer.echo(f"[1/4] simulating {n_train} training galaxies (6 LSST bands, 64x64, 10-year depth)")
    simulate_to_file(SimulationConfig(), train, n=n_train, seed=seed, workers=workers, force=True)
    typer.echo(f"[2/4] simulating {n_test} test galaxies (another seed)")
    simulate_to_file(SimulationConfig(), test, n=n_test, seed=seed + 1, workers=workers, force=True)
    typer.echo(f"[3/4] training the shape CNN ({loss} loss) for {epochs} epochs on the CPU")
    result = fit("cnn", train, out / "cnn", overrides={
        "model": {"loss": loss}, "data": {"batch_size": 32},
        "trainer": {"accelerator": "cpu", "epochs": epochs, "seed": seed}}, force=True, echo=typer.echo)
    typer.echo(f"  model checkpoint {result.checkpoint}")
    typer.echo("[4/4] evaluating on the test set, with GalSim HSM REGAUSS and KSB on the same stamps")
    evaluate_cmd(ckpt=result.checkpoint, data=test, out=out / "eval", model="cnn", samples=None,
                 batch_size=64, n_generate=1000, no_hsm=False, limit=None, accelerator="cpu", seed=seed, force=True,
                 quiet=False, allow_training_data=False)
    typer.echo(f"done: open {out / 'eval' / 'report.md'}")
