"""Telling eager calls from code that torch.compile traces (used by cosmolit.nn and cosmolit.backends.compiling)."""

from __future__ import annotations

from typing import Callable, Optional


def tracing_check() -> Optional[Callable[[], bool]]:
    """`torch.compiler.is_compiling` (torch >= 2.3), which tells eager calls from code that
    torch.compile traces; None for an older torch, whose `torch._dynamo.is_compiling` answers
    False even while tracing (so code that must tell the two apart keeps its plain form there)."""
    import torch

    return getattr(getattr(torch, "compiler", None), "is_compiling", None)
