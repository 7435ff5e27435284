"""torch.compile of a model's training computation, with a one-line fallback to eager.

On a CPU the shape networks are bound by their convolutions and by the element-wise work around
them (per-element PReLU, BatchNorm, the closed-form Gaussian loss): each element-wise op is a full
pass over every activation, forward and backward. TorchInductor fuses those passes into the
kernels it generates, and AOTAutograd does the same for the backward graph, while the
convolutions stay oneDNN's. Measured side by side on a 2-core CPU (benchmarks/RESULTS.md): the
shape CNN's training step 1.2x to 1.5x faster at batch 2 to 128; the BNN's 1.3x at batch 2, 1.2x
at 8 and 1.3x at 32, once its weight draw and KL (1.2 M weights, batch-independent) are compiled
with the network (1.0x at batch 2 with the network alone; Pyro's tracing stays eager).

`CompiledCall` wraps one function (a bound method of the model). Compilation happens lazily at
the first call, and again whenever a guard changes (train / eval mode, a new batch size). If
TorchDynamo or a backend compiler fails in that call (no C++ compiler, an operation it cannot
trace), or torch.compile refuses the platform (torch 2.0 on Python 3.11), the wrapper says so once
and calls the eager function from then on: the results are the same, only slower. Errors of the
computation itself are not swallowed: eager runs it again and raises them. Limits: a backward
graph that AOTAutograd compiles lazily fails inside `loss.backward()`, outside the wrapper, and
stops the run with torch's error; where Dynamo itself gives up on a frame (graph breaks, its
recompile limit) it runs eager silently and `status` still says "on".

Not for the IPU: PopTorch compiles the whole step itself (see cosmolit.backends.ipu).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from cosmolit.nn.tracing import tracing_check  # noqa: F401 (re-exported: cosmolit.backends.compiling.tracing_check)


def compile_refusal() -> Optional[str]:
    """Why cosmolit runs its networks eager with this torch even when compilation is asked for, or None.

    torch 2.0.x (the IPU stack's pin): on an Intel Xeon with AVX-512 and AMX (family 6, model 167),
    Inductor's CPU kernels gave the small test shape CNN (4 and 8 filters, 16-pixel stamps) an inf
    loss where eager's was finite, and the same code passed on AVX2-only CPUs and with torch 2.13
    on that Xeon. Whether a compiled step is right then depends on the CPU and the layer sizes,
    which no check before training can tell; so compilation is off there, not only by default.
    """
    import torch

    version = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if version < (2, 1):
        return (f"torch.compile is off with torch {torch.__version__} (its Inductor CPU kernels gave inf losses "
                "on an AVX-512 CPU where eager's were finite; torch >= 2.1 compiles)")
    return None


def compile_errors() -> tuple[type, ...]:
    """Exception types that mean "torch.compile could not build this", not "the computation failed"."""
    kinds: list[type] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        kinds.append(TorchDynamoException)  # BackendCompilerFailed (C++ / Triton build errors), Unsupported, ...
    except ImportError:  # pragma: no cover - torch without dynamo
        pass
    try:
        from torch._inductor.exc import InductorError

        kinds.append(InductorError)
    except ImportError:
        pass
    return tuple(kinds)


class CompiledCall:
    """`fn` under torch.compile, or `fn` itself once compilation has failed (said once via `echo`).

    status: "on" (compiled, or compiling at the next call), "failed" (fell back to eager) or
    "unavailable" (torch.compile is missing or refuses this Python / platform, or `unavailable`
    gives the reason cosmolit does not compile here: see `compile_refusal`).
    `prepare()` runs once, before the first compiled call (the model sets the parameter layout the
    compiled graph wants, now that it is on its device); `restore()` once, when the call falls
    back to eager.
    """

    def __init__(self, fn: Callable, what: str, echo: Callable[[str], None] = print,
                 prepare: Optional[Callable[[], None]] = None, restore: Optional[Callable[[], None]] = None,
                 unavailable: Optional[str] = None):
        import torch

        self.eager = fn
        self.what = what
        self.echo = echo
        self._prepare, self._restore = prepare, restore
        self._errors = compile_errors()
        self._fn = fn
        self.status = "unavailable"
        if unavailable:
            echo(f"{unavailable}; {what} runs eager")
            return
        if not hasattr(torch, "compile"):
            echo(f"torch.compile is not in torch {torch.__version__}; {what} runs eager")
            return
        try:
            # static shapes: fit's training batches all have one size (drop_last); a new size
            # (the last validation batch, another benchmark batch) compiles its own graph
            self._fn = torch.compile(fn, dynamic=False)
            self.status = "on"
        except Exception as exc:  # e.g. torch 2.0 refuses Python 3.11: "not supported", at compile time
            echo(f"torch.compile is unavailable here ({_first_line(exc)}); {what} runs eager")

    def __call__(self, *args, **kwargs):
        if self.status != "on":
            return self.eager(*args, **kwargs)
        if self._prepare is not None:
            prepare, self._prepare = self._prepare, None
            prepare()
        try:
            return self._fn(*args, **kwargs)
        except self._errors as exc:
            # Dynamo also wraps errors of the computation itself (a shape mismatch): run it eager
            # first, and blame compilation only if eager succeeds; else eager's own error surfaces
            if self._restore is not None:
                self._restore()
            out = self.eager(*args, **kwargs)
            self.echo(f"torch.compile of {self.what} failed ({type(exc).__name__}: {_first_line(exc)}); "
                      "running it eager")
            self.status = "failed"
            return out


class CompiledApart:
    """`fn(*tensors)`, a pure tensor function of inputs that need no gradient, run as a graph of its
    own (compiled at its first call) when code that torch.compile traces calls it; plain `fn`
    anywhere else (eager code, PopTorch's tracer, a CUDA-graph capture, inputs with gradients, a
    torch without `torch.compiler.is_compiling`).

    Why: inside a larger graph Inductor lays `fn`'s element-wise work out for the convolution that
    follows it. For the input normalisation asinh(x / scale) of 6-band stamps that layout is
    channels-last with 6 channels, so each 16-float vector of the fused kernel holds 6 useful
    values, and the asinh (two log1p, a square root, two divisions per value) is computed twice
    forward and once more in the backward graph: 1.4 ms of a 16 ms shape-CNN step at batch 2 and
    22 ms of 163 ms at batch 32 on a 2-core CPU (benchmarks/RESULTS.md). As a graph of its own, fed
    the contiguous (B, C, H, W) input, it runs once on full vectors, and the network's graph
    receives its result as an input that needs no gradient. The cost is a graph break.
    """

    def __init__(self, fn: Callable):
        import torch

        self.fn = fn
        self._compiled: Optional[Callable] = None
        self._is_compiling = tracing_check()
        # the graph break: the enclosing graph ends here, the call below runs outside it
        self._apart = torch.compiler.disable(self._call_compiled) if self._is_compiling is not None else None

    def _call_compiled(self, *args):
        import torch

        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=False)
        return self._compiled(*args)

    def __call__(self, *args):
        if self._apart is not None and self._is_compiling() and not any(a.requires_grad for a in args):
            return self._apart(*args)
        return self.fn(*args)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
