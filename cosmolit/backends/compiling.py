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

from typing import Callable


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
    "unavailable" (torch.compile is missing or refuses this Python / platform).
    """

    def __init__(self, fn: Callable, what: str, echo: Callable[[str], None] = print):
        import torch

        self.eager = fn
        self.what = what
        self.echo = echo
        self._errors = compile_errors()
        self._fn = fn
        self.status = "unavailable"
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
        try:
            return self._fn(*args, **kwargs)
        except self._errors as exc:
            # Dynamo also wraps errors of the computation itself (a shape mismatch): run it eager
            # first, and blame compilation only if eager succeeds; else eager's own error surfaces
            out = self.eager(*args, **kwargs)
            self.echo(f"torch.compile of {self.what} failed ({type(exc).__name__}: {_first_line(exc)}); "
                      "running it eager")
            self.status = "failed"
            return out


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
