"""The typer application and the wrapper that turns user errors into one line and exit 2."""

from __future__ import annotations

import functools

import typer

from cosmolit.errors import CosmolitError

app = typer.Typer(
    name="cosmolit",
    help="Deep learning for galaxy surveys: simulate LSST-like galaxies, fit the VAE, shape CNN "
    "and Pyro BNN on CPU, CUDA GPU or Graphcore IPU, evaluate, generate and benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print `cosmolit: error: message` on stderr and return the Exit to raise."""
    typer.echo(f"cosmolit: error: {message}", err=True)
    return typer.Exit(code)


def guarded(func):
    """Run a command body; CosmolitError -> one line and exit 2, Ctrl-C -> exit 130, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CosmolitError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("cosmolit: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def command(*args, app_: typer.Typer | None = None, **kwargs):
    """`@command()` registers a guarded command on the main app (or on `app_`)."""
    target = app_ or app

    def decorate(func):
        return target.command(*args, **kwargs)(guarded(func))

    return decorate


def parse_int_list(text: str, what: str) -> list[int]:
    """'2,4,8' -> [2, 4, 8]; UsageError for anything else."""
    from cosmolit.errors import UsageError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{what} must be positive integers, got {text!r}")
    return values


def _version_callback(value: bool) -> None:
    if value:
        from cosmolit import __version__

        typer.echo(f"cosmolit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
    system_malloc: bool = typer.Option(
        False, "--system-malloc", envvar="COSMOLIT_SYSTEM_MALLOC",
        help="Keep glibc's default malloc instead of retaining freed memory (cosmolit.backends.memory; "
             "retaining makes CPU training steps faster by avoiding page faults)."),
) -> None:
    """cosmolit: galaxy-survey deep learning on CPU, GPU or IPU."""
    if not system_malloc:
        from cosmolit.backends.memory import retain_freed_memory

        retain_freed_memory()
