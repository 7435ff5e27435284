"""GPU static-graph mode: a whole training step (or a whole sampling call) captured in a CUDA graph.

At small batches the study's networks are bound by per-step overhead (Python, kernel launches),
not by arithmetic: a 64x64x6 stamp costs about 0.6 GFLOP to train on. An IPU compiles the whole
step into one static graph and runs `device_iterations` steps per host call. The CUDA analogue
is a CUDA graph: the kernels of forward, loss, backward and optimizer step are recorded once
and replayed with one launch. This module follows the whole-network capture recipe of the
PyTorch CUDA-graphs documentation (torch.cuda.graphs, "Whole-network capture"):

- inputs live in static buffers; new data is copied into them before each replay;
- a few eager warm-up iterations run on a side stream before capture (lazy initialisation,
  cuDNN autotuning, optimizer state creation);
- gradients are set to None before capture, so backward allocates them from the graph's
  private memory pool and each replay overwrites them;
- Adam / AdamW need `capturable=True` so that their step counters stay on the device.

"Device iterations" K: K optimizer steps are recorded into one graph over a block of K
batches already on the device (static buffer of shape (K, B, ...)), so one host call runs K
steps, like IPU device_iterations. Times are still reported per optimizer step.

Where capture is impossible (no CUDA, an operation that synchronises with the host such as
`.item()`, data-dependent shapes) the classes fall back to eager execution and say why in
one line through `echo`; results stay correct, only slower.

The warm-up iterations are real optimizer steps on the first block; their effect is undone
before capture (parameters, buffers such as BatchNorm statistics, optimizer state and the CUDA
random state are put back in place), so a captured run trains exactly the steps it is given.
"""

from __future__ import annotations

from typing import Callable, Sequence

LossFn = Callable[..., "object"]  # loss_fn(*batch) -> scalar loss tensor


def cuda_graphs_available() -> tuple[bool, str | None]:
    """(True, None) when CUDA graphs can be used here, else (False, reason in a few words)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not hasattr(torch.cuda, "CUDAGraph"):
        return False, f"torch {torch.__version__} has no torch.cuda.CUDAGraph"
    return True, None


def make_capturable(optimizer) -> None:
    """Switch Adam-like optimizers to capturable mode (state on device); must run before their first step."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True


def capturing(graph):
    """torch.cuda.graph(graph) that restricts only this thread during capture: with DataLoader
    workers a pin-memory thread allocates pinned host memory meanwhile, which the default ('global')
    mode counts as a capture error."""
    import inspect

    import torch

    if "capture_error_mode" in inspect.signature(torch.cuda.graph).parameters:
        return torch.cuda.graph(graph, capture_error_mode="thread_local")
    return torch.cuda.graph(graph)


def capture_failure(exc: BaseException) -> str:
    """The one-line reason for a failed capture. When the captured code failed, ending the capture
    fails too and that second error hides the first: name the first."""
    if exc.__context__ is not None and "captur" in str(exc).lower():
        exc = exc.__context__
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"CUDA graph capture failed ({type(exc).__name__}: {first[:160]})"


class StaticTrainStep:
    """Run K training steps per call, captured in one CUDA graph on a GPU, eager elsewhere.

    model:      nn.Module (a LightningModule is fine) already on its device, in train mode.
    loss_fn:    loss_fn(*batch) -> scalar loss, or a dict of scalar tensors with the loss under
                'loss' (other entries are reported, not differentiated); must not call .item() or log.
    optimizer:  a torch optimizer over the model's parameters (Adam gets capturable=True here).
    example_block: tensors of shape (K, B, ...) on the device: K = device_iterations batches.
    echo:       where the one-line fallback message goes (print by default, None for silence).

    Call `run(*block)` with tensors of the same shapes; returns what loss_fn returns, averaged over
    the K steps and detached (device tensors: reading them synchronises; on a GPU they are the
    graph's output buffers, overwritten by the next call).
    """

    def __init__(self, model, loss_fn: LossFn, optimizer, example_block: Sequence, warmup: int = 3,
                 enabled: bool = True, echo: Callable[[str], None] | None = print):
        import torch

        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.warmup = int(warmup)
        self.block_shapes = [tuple(t.shape) for t in example_block]
        if not self.block_shapes or any(len(s) < 1 for s in self.block_shapes):
            raise ValueError("example_block must hold tensors of shape (K, B, ...)")
        self.device_iterations = self.block_shapes[0][0]
        if any(s[0] != self.device_iterations for s in self.block_shapes):
            raise ValueError("every tensor of the block needs the same leading dimension K")
        self.graph = None
        self.static_block = None
        self.static_out = None
        self.reason: str | None = None
        ok, why = cuda_graphs_available()
        device = next(iter(model.parameters())).device
        if not enabled:
            self.reason = "static-graph mode disabled"
        elif not ok:
            self.reason = why
        elif device.type != "cuda":
            self.reason = f"the model is on {device.type}, not CUDA"
        if self.reason is None:
            try:
                self._capture([t.to(device) for t in example_block])
            except Exception as exc:  # any capture failure -> eager, with the reason
                self.graph = None
                self.static_block = None
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                self.reason = capture_failure(exc)
        if self.reason is not None and echo is not None and enabled:
            echo(f"static-graph mode unavailable: {self.reason}; running eager steps instead")

    @property
    def static(self) -> bool:
        """True when steps replay a captured CUDA graph."""
        return self.graph is not None

    # one optimizer step, eager or inside capture; `first` = gradients are None (allocate)
    def _one_step(self, batch, first: bool):
        if not first:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.zero_()
        out = self.loss_fn(*batch)
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
        self.optimizer.step()
        return out

    def _block_steps(self, block, capture: bool):
        """K steps; returns loss_fn's output averaged over them, detached."""
        total = None
        for k in range(self.device_iterations):
            batch = tuple(t[k] for t in block)  # each (B, ...)
            if not capture:
                self.optimizer.zero_grad(set_to_none=True)
            out = self._one_step(batch, first=(k == 0 or not capture))
            terms = out if isinstance(out, dict) else {"loss": out}
            terms = {name: value.detach() for name, value in terms.items()}
            total = terms if total is None else {name: total[name] + terms[name] for name in total}
        if self.device_iterations > 1:
            total = {name: value / self.device_iterations for name, value in total.items()}
        return total if isinstance(out, dict) else total["loss"]

    def _snapshot(self):
        """Copies of what a step changes: parameters, buffers, optimizer state, CUDA random state."""
        import torch

        tensors = list(self.model.parameters()) + list(self.model.buffers())
        state = {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                 for p, s in self.optimizer.state.items()}
        return tensors, [t.detach().clone() for t in tensors], state, torch.cuda.get_rng_state()

    def _restore(self, snapshot) -> None:
        """Put the snapshot's values back into the same tensors (the graph will address them);
        optimizer state created since then is reset to zeros, as a fresh Adam state is."""
        import torch

        tensors, values, state, rng = snapshot
        with torch.no_grad():
            for t, v in zip(tensors, values):
                t.copy_(v)
            for p, s in self.optimizer.state.items():
                before = state.get(id(p), {})
                for k, v in s.items():
                    if isinstance(v, torch.Tensor):
                        v.copy_(before[k]) if k in before else v.zero_()
        torch.cuda.set_rng_state(rng)

    def _capture(self, example_block) -> None:
        import torch

        make_capturable(self.optimizer)
        self.static_block = [t.clone() for t in example_block]  # (K, B, ...) static input buffers
        snapshot = self._snapshot()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(max(1, self.warmup)):
                    self._block_steps(self.static_block, capture=False)
            torch.cuda.current_stream().wait_stream(side)
        finally:  # also when a warm-up step fails: the eager fallback starts from the same state
            torch.cuda.synchronize()
            self._restore(snapshot)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with capturing(graph):
            self.static_out = self._block_steps(self.static_block, capture=True)
        torch.cuda.synchronize()
        self.graph = graph

    def run(self, *block):
        """K optimizer steps on a block of K batches (tensors (K, B, ...)); returns loss_fn's output
        averaged over the K steps."""
        if [tuple(t.shape) for t in block] != self.block_shapes:
            raise ValueError(f"block shapes {[tuple(t.shape) for t in block]} differ from the captured "
                             f"{self.block_shapes}")
        if self.graph is not None:
            for buf, t in zip(self.static_block, block):
                buf.copy_(t, non_blocking=True)
            self.graph.replay()
            return self.static_out
        return self._block_steps(block, capture=False)


class StaticCall:
    """A side-effect-free call (sampling, decoding, BNN predictive draws) captured in a CUDA graph.

    fn(*inputs) -> tensor or tuple of tensors. Random draws inside `fn` must use the default
    CUDA generator (graph-safe: each replay draws new numbers). With no inputs, `fn()` is
    captured as is (e.g. sample n latents and decode them).
    Returns the static output tensors: clone them to keep a result past the next call.
    """

    def __init__(self, fn: Callable, example_inputs: Sequence = (), warmup: int = 2, enabled: bool = True,
                 echo: Callable[[str], None] | None = print, device=None):
        import torch

        self.fn = fn
        self.warmup = int(warmup)
        self.graph = None
        self.static_inputs = None
        self.static_out = None
        self.reason: str | None = None
        ok, why = cuda_graphs_available()
        if device is None and example_inputs:
            device = example_inputs[0].device
        dev_type = torch.device(device).type if device is not None else ("cuda" if ok else "cpu")
        if not enabled:
            self.reason = "static-graph mode disabled"
        elif not ok:
            self.reason = why
        elif dev_type != "cuda":
            self.reason = f"inputs are on {dev_type}, not CUDA"
        if self.reason is None:
            try:
                with torch.no_grad():
                    self._capture(list(example_inputs))
            except Exception as exc:
                self.graph = None
                torch.cuda.synchronize()
                self.reason = capture_failure(exc)
        if self.reason is not None and echo is not None and enabled:
            echo(f"static-graph mode unavailable: {self.reason}; running eager calls instead")

    @property
    def static(self) -> bool:
        return self.graph is not None

    def _capture(self, example_inputs) -> None:
        import torch

        self.static_inputs = [t.clone() for t in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):
                self.fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with capturing(graph):
            self.static_out = self.fn(*self.static_inputs)
        torch.cuda.synchronize()
        self.graph = graph

    def __call__(self, *inputs):
        import torch

        if self.graph is None:
            with torch.no_grad():
                return self.fn(*inputs)
        for buf, t in zip(self.static_inputs, inputs):
            buf.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.static_out
