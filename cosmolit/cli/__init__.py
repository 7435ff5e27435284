"""`cosmolit` command line. Each area registers its commands in its own module."""

from __future__ import annotations

import importlib

from cosmolit.cli._app import app

# Command modules register themselves on `app` when imported. A module that is not
# written yet is skipped so that the rest of the CLI keeps working during development.
_COMMAND_MODULES = ["info", "simulate", "models", "quickstart", "ipu", "bench"]
for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(f"cosmolit.cli.{_name}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - only while a module is missing
        if _exc.name != f"cosmolit.cli.{_name}":
            raise


def main() -> None:
    app()


__all__ = ["app", "main"]
