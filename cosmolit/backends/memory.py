"""Host memory for CPU work: keep freed blocks in the process instead of handing them back to the kernel.

glibc's malloc serves each block above its mmap threshold (128 KiB at first, adapting up to
32 MiB) with a fresh `mmap`, unmaps it on free, and trims free memory at the top of the heap past
its trim threshold. A training step allocates and frees the same buffers every step (the shape
CNN's forward pass keeps about 2.5 MB of activations per image, 80 MB at batch 32, and the
backward pass as much again in gradients), so under the default each step page-faults them back
in and the kernel zeroes every page again. `retain_freed_memory()` turns
mmap off for malloc (M_MMAP_MAX = 0) and raises the trim threshold to 1 GiB: freed blocks are
reused by the next step. Same arithmetic, same results; the process keeps its peak memory until
it exits. Measured side by side (`cosmolit bench overhead --parts malloc`): see
benchmarks/RESULTS.md.

The `cosmolit` command applies it at start-up for every command; `cosmolit --system-malloc ...`
or the environment variable COSMOLIT_SYSTEM_MALLOC=1 keeps glibc's defaults. From Python, call
`retain_freed_memory()` once before training. Elsewhere than glibc (macOS, musl) it does nothing
and says so through its return value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Optional

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
M_MMAP_MAX = -4
RETAIN_TRIM_THRESHOLD = 1 << 30

_libc: Optional[ctypes.CDLL] = None
_mode = "system"


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.gnu_get_libc_version  # noqa: B018  (AttributeError on musl and other C libraries)
            _libc = lib
        except (OSError, AttributeError):
            _libc = None
    return _libc


def retain_freed_memory() -> bool:
    """Keep freed heap memory in the process from now on.

    Returns True when the setting was applied (Linux with glibc), False where it cannot be.
    There is no way back within the process: any mallopt call also switches off glibc's
    dynamic mmap threshold, so glibc's true defaults exist only in a process that never
    called it (`cosmolit --system-malloc`; the malloc part of `cosmolit bench overhead`
    times each side in a fresh process for that reason).
    """
    global _mode
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, RETAIN_TRIM_THRESHOLD) == 1
    if ok:
        _mode = "retain"
    return ok


def malloc_mode() -> str:
    """'retain' after retain_freed_memory(), else 'system' (glibc's defaults or another C library)."""
    return _mode


__all__ = ["retain_freed_memory", "malloc_mode"]
