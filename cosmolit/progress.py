"""One rich progress bar helper (rate and ETA), silent when disabled or not on a terminal."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """`with progress_bar(n, "simulating") as advance: advance(k)`."""
    if not enabled or not sys.stderr.isatty():
        yield lambda k: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as prog:
        task = prog.add_task(description, total=total, rate="")

        def advance(k: int) -> None:
            prog.advance(task, k)
            speed = prog.tasks[task].speed
            prog.update(task, rate=f"{speed:,.1f}/s" if speed else "")

        yield advance
