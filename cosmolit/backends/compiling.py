"""torch.compile of a model's training computation, with a one-line fallback to eager.

On a CPU the shape networks are bound by their convolutions and by the element-wise work around
them (per-element PReLU, BatchNorm, the closed-form Gaussian loss): each element-wise op is a full
pass over every activation, forward and backward. TorchInductor fuses those passes into the
kernels it generates, and AOTAutograd does the same for the backward graph, while the
convolutions stay oneDNN's. Measured side by side on a 2-core CPU (benchmarks/RESULTS.md): the
shape CNN's training step 1.3x faster at batch 32, no gain at batch 2, where the step is
dominated by per-call overhead rather than passes over activations.

`CompiledCall` wraps one function (a bound method of the model). Compilation happens lazily at
the first call, and again whenever a guard changes (train / eval mode, a new batch size). If
TorchDynamo or a backend compiler fails (no C++ compiler, an operation it cannot trace, an old
torch), the wrapper says so once and calls the eager function from then on: the results are the
same, only slower. Errors of the computation itself are not swallowed: eager runs it again and
raises them.

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
    "unavailable" (this torch has no torch.compile).
    """

    def __init__(self, fn: Callable, what: str, echo: Callable[[str], None] = print):
        import torch

        self.eager = fn
        self.what = what
        self.echo = echo
        if hasattr(torch, "compile"):
            self._fn = torch.compile(fn)
            self.status = "on"
            self._errors = compile_errors()
        else:
            self._fn = fn
            self.status = "unavailable"
            echo(f"torch.compile is not in torch {torch.__version__}; {what} runs eager")

    def __call__(self, *args, **kwargs):
        if self.status != "on":
            return self.eager(*args, **kwargs)
        try:
            return self._fn(*args, **kwargs)
        except self._errors as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            self.echo(f"torch.compile of {self.what} failed ({type(exc).__name__}: {first}); running it eager")
            self.status = "failed"
            return self.eager(*args, **kwargs)
