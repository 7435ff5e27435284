"""IPU readiness without an IPU: record what a step dispatches on the CPU and compare it with PopTorch 3.4.

PopTorch traces a step at the level of PyTorch's dispatcher, so a TorchDispatchMode on the CPU sees
the same aten operators its tracer would see. `check_module` runs a LightningModule's
training_step (three times: warm-up, then two batches with different values), the backward once
(outside the recorder: PopART differentiates the forward graph itself, so backward ops are not in
PopTorch's list) and validation_step / predict_step once, and reports:

- aten operators that PopTorch 3.4 does not lower (poptorch_ops.txt), with the user file:line;
- host synchronisations (aten::_local_scalar_dense: .item(), bool(tensor), float(tensor));
- shapes that depend on data (ops such as nonzero, unique, masked_select, boolean-mask indexing,
  or a different op/shape sequence for two batches of the same shape);
- a loss PopTorch cannot find: not exactly one scalar, not marked with cosmolit.backends.mark_loss
  (poptorch.identity_loss) and not from a torch loss function, or more than one loss;
- more than one optimizer, or one PopTorch does not support.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

OPS_FILE = Path(__file__).with_name("poptorch_ops.txt")

# Dispatcher-level spellings of operators PopTorch handles under another name (torch decomposes a
# few composite ops before the dispatcher sees them; newer torch renamed batch norm variants).
ALIASES = {
    "_native_batch_norm_legit": "native_batch_norm",
    "_native_batch_norm_legit_no_training": "native_batch_norm",
    "_native_batch_norm_legit_functional": "native_batch_norm",
    "_batch_norm_with_update": "native_batch_norm",
    "_batch_norm_no_update": "native_batch_norm",
    "native_dropout": "dropout",
    "_to_copy": "to",
    "randn_like": "randn",
    "rand_like": "rand",
    "fill": "full",
    "zero": "zeros",
    "_log_softmax": "log_softmax",
    "_softmax": "softmax",
    "sym_size": "size",
    "sym_numel": "size",
    "sym_stride": "size",
    "expand_copy": "expand",
    "view_copy": "view",
}

# Trivial tracer operators PopTorch handles without a canonicalisation handler: allocation,
# constants, aliasing, metadata queries. Kept short on purpose.
TRIVIAL_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "lift", "lift_fresh", "lift_fresh_copy", "scalar_tensor",
    "alias", "detach", "_reshape_alias", "_unsafe_view", "view", "as_strided",
    "copy", "copy_", "clone", "contiguous", "t",
    "is_same_size", "size", "stride", "dim", "numel", "sym_storage_offset",
})

# Operators whose output shape depends on the values of their input.
DATA_DEPENDENT_OPS = frozenset({
    "nonzero", "nonzero_static", "argwhere", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "masked_select", "masked_scatter", "repeat_interleave",
})
# Operators that copy a device value to the host (fatal inside a PopTorch graph).
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"})
# torch loss functions PopTorch recognises as a loss without identity_loss (grad_fn names).
KNOWN_LOSS_GRAD_FNS = frozenset({
    "MseLossBackward0", "L1LossBackward0", "SmoothL1LossBackward0", "HuberLossBackward0",
    "BinaryCrossEntropyBackward0", "BinaryCrossEntropyWithLogitsBackward0", "NllLossBackward0",
    "NllLoss2DBackward0", "KlDivBackward0", "SoftMarginLossBackward0", "MultilabelMarginLossBackward0",
})
KNOWN_LOSS_OPS = frozenset({
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "nll_loss_forward", "nll_loss2d_forward", "kl_div",
    "soft_margin_loss",
})
SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "LAMB")

# Frames of these libraries are skipped when looking for the user's file:line.
_LIBRARY_PARTS = (
    f"{os.sep}torch{os.sep}", f"{os.sep}pyro{os.sep}", f"{os.sep}pytorch_lightning{os.sep}",
    f"{os.sep}lightning_fabric{os.sep}", f"{os.sep}lightning_utilities{os.sep}", f"{os.sep}lightning{os.sep}",
    f"{os.sep}typing_extensions", f"{os.sep}contextlib.py", f"{os.sep}functools.py", f"{os.sep}opt_einsum{os.sep}",
    f"{os.sep}poptorch{os.sep}",
)
_THIS_FILE = os.path.abspath(__file__)
_BACKENDS_INIT = os.path.join(os.path.dirname(_THIS_FILE), "__init__.py")


@functools.lru_cache(maxsize=1)
def supported_ops() -> frozenset:
    """The aten operator names PopTorch 3.4 lowers (comments and blank lines skipped)."""
    names = set()
    for line in OPS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(line)
    return frozenset(names)


def normalise_op(func: Any) -> str:
    """'aten::add_.Tensor' or an OpOverload -> 'add_' (namespace and overload stripped)."""
    if isinstance(func, str):
        name = func
    else:
        schema = getattr(func, "_schema", None)
        name = schema.name if schema is not None else str(func)
    name = name.split("::", 1)[-1]
    return name.split(".", 1)[0]


def op_status(name: str) -> str:
    """'ok', 'host_sync', 'data_dependent' or 'unsupported' for a normalised aten name."""
    if name in HOST_SYNC_OPS:
        return "host_sync"
    if name in DATA_DEPENDENT_OPS:
        return "data_dependent"
    supported = supported_ops()
    candidates = [name]
    if name.endswith("_") and not name.endswith("__"):
        candidates.append(name[:-1])  # in-place variant of a lowered op
    for cand in list(candidates):
        if cand in ALIASES:
            candidates.append(ALIASES[cand])
    if any(c in supported or c in TRIVIAL_OPS for c in candidates):
        return "ok"
    return "unsupported"


@functools.lru_cache(maxsize=4096)
def _is_user_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path in (_THIS_FILE, _BACKENDS_INIT) or filename.startswith("<"):
        return False
    return not any(part in path for part in _LIBRARY_PARTS)


def _short(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if rel.startswith("..") else rel


def user_location(skip: int = 1) -> str:
    """'file.py:LINE' of the innermost caller outside torch, pyro, Lightning and this module."""
    frame = sys._getframe(skip)
    while frame is not None:
        code = frame.f_code
        if _is_user_file(code.co_filename):
            return f"{_short(code.co_filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _library_location(skip: int = 1) -> str:
    """'pyro/infer/trace_elbo.py:LINE': the innermost library frame outside torch (context for the user)."""
    frame = sys._getframe(skip)
    while frame is not None:
        fn = frame.f_code.co_filename
        in_torch = f"{os.sep}torch{os.sep}" in fn and f"{os.sep}distributions{os.sep}" not in fn
        if not in_torch and os.path.abspath(fn) != _THIS_FILE:
            if _is_user_file(fn):
                return ""
            parts = fn.split(os.sep)
            for lib in ("pyro", "torch", "pytorch_lightning", "lightning_fabric"):
                if lib in parts:
                    return f"{os.sep.join(parts[parts.index(lib):])}:{frame.f_lineno}"
            return ""
        frame = frame.f_back
    return ""


def _tensors(obj: Any) -> Iterable:
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


@dataclass
class OpRecord:
    name: str  # normalised aten name
    full: str  # e.g. aten::add.Tensor
    shapes: tuple  # output shapes
    where: str  # user file:line
    via: str = ""  # library file:line that issued it, when the user code called a library


def _make_recorder():
    """A TorchDispatchMode class that records every operator (imported lazily: torch is heavy)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpRecorder(TorchDispatchMode):
        """Record (name, output shapes, user file:line) of every aten operator dispatched inside it."""

        def __init__(self):
            super().__init__()
            self.records: list[OpRecord] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = normalise_op(func)
            if name == "index" and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in _tensors(list(args[1:]) + list(kwargs.values()))
            ):
                name = "index_with_boolean_mask"
            shapes = tuple(tuple(t.shape) for t in _tensors(out))
            self.records.append(OpRecord(name, str(func), shapes, user_location(2), _library_location(2)))
            return out

    return OpRecorder


@dataclass
class Finding:
    kind: str  # unsupported_op | host_sync | data_dependent | loss | optimizer | hook
    message: str
    where: str = ""
    stages: list = field(default_factory=list)
    count: int = 1


@dataclass
class CheckReport:
    model: str
    batch_size: int
    findings: list = field(default_factory=list)
    ops: dict = field(default_factory=dict)  # normalised forward op -> count (all stages)
    stages: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {"model": self.model, "batch_size": self.batch_size, "ok": self.ok, "stages": self.stages,
                "findings": [dataclasses.asdict(f) for f in self.findings], "ops": dict(sorted(self.ops.items())),
                "notes": self.notes, "poptorch_ops_list": "PopTorch 3.4 (Poplar SDK 3.4)"}

    def format(self) -> str:
        head = f"IPU readiness of {self.model} (batch {self.batch_size}; {', '.join(self.stages)}):"
        lines = [head]
        if self.ok:
            lines.append(f"  OK: {len(self.ops)} distinct forward operators, all lowered by PopTorch 3.4; "
                         "no host synchronisation; shapes independent of data; one loss")
        else:
            lines.append(f"  {len(self.findings)} problem(s) PopTorch would refuse:")
            for f in self.findings:
                at = f" at {f.where}" if f.where else ""
                times = f" (x{f.count})" if f.count > 1 else ""
                stage = f" [{', '.join(f.stages)}]" if f.stages else ""
                lines.append(f"  - {f.kind}: {f.message}{at}{times}{stage}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


class _Collector:
    """Accumulates findings, merging repeats of the same problem at the same place."""

    def __init__(self):
        self.findings: dict = {}

    def add(self, kind: str, message: str, where: str = "", stage: str = "") -> None:
        key = (kind, message, where)
        f = self.findings.get(key)
        if f is None:
            self.findings[key] = Finding(kind, message, where, [stage] if stage else [])
        else:
            f.count += 1
            if stage and stage not in f.stages:
                f.stages.append(stage)

    def ops(self, records: list, stage: str, counts: dict) -> None:
        for r in records:
            counts[r.name] = counts.get(r.name, 0) + 1
            via = f" (via {r.via})" if r.via else ""
            if r.name == "index_with_boolean_mask":
                self.add("data_dependent", "boolean-mask indexing x[mask] (output size depends on the data)" + via,
                         r.where, stage)
                continue
            status = op_status(r.name)
            if status == "host_sync":
                self.add("host_sync", f"host synchronisation (.item(), bool(tensor), float(tensor)): aten::{r.name}" + via,
                         r.where, stage)
            elif status == "data_dependent":
                self.add("data_dependent", f"aten::{r.name} has an output shape that depends on the data" + via,
                         r.where, stage)
            elif status == "unsupported":
                self.add("unsupported_op", f"aten::{r.name} is not lowered by PopTorch 3.4" + via, r.where, stage)


def _loss_of(out: Any):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("loss"), torch.Tensor):
        return out["loss"]
    return None


def _record(fn: Callable, *args):
    """Run fn(*args) under the recorder; returns (output, records, marked losses)."""
    from cosmolit import backends

    recorder = _make_recorder()()
    marked: list = []
    previous = backends._loss_hook
    backends._loss_hook = marked.append
    try:
        with recorder:
            out = fn(*args)
    finally:
        backends._loss_hook = previous
    return out, recorder.records, marked


def _check_loss(out: Any, records: list, marked: list, col: _Collector) -> Any:
    loss = _loss_of(out)
    if out is None:
        col.add("loss", "training_step returned None; on IPU the step must return its loss tensor")
        return None
    if loss is None:
        col.add("loss", f"training_step returned {type(out).__name__}; return the loss tensor or a dict with 'loss'")
        return None
    if loss.numel() != 1:
        col.add("loss", f"the loss has shape {tuple(loss.shape)}; the step must return exactly one scalar loss")
    if not loss.requires_grad:
        col.add("loss", "the loss does not depend on any trainable parameter (no grad)")
    n_loss_ops = sum(1 for r in records if r.name in KNOWN_LOSS_OPS)
    if len(marked) > 1:
        col.add("loss", f"more than one loss: mark_loss was called {len(marked)} times in one step; "
                        "sum the terms and mark the total once")
    elif len(marked) == 1:
        if marked[0] is not loss:
            col.add("loss", "the returned loss is not the tensor passed to mark_loss; mark the final loss")
    else:
        grad_fn = type(loss.grad_fn).__name__ if loss.grad_fn is not None else None
        if n_loss_ops > 1:
            col.add("loss", f"more than one loss: {n_loss_ops} torch loss functions and no mark_loss; "
                            "combine them and mark the total with cosmolit.backends.mark_loss")
        elif grad_fn not in KNOWN_LOSS_GRAD_FNS:
            col.add("loss", "the loss is neither marked with cosmolit.backends.mark_loss (poptorch.identity_loss) "
                            "nor the direct output of a torch loss function; PopTorch cannot find it")
    return loss


def _check_static(run_b: list, run_a: list, col: _Collector) -> None:
    for i, (rb, ra) in enumerate(zip(run_b, run_a)):
        if rb.name != ra.name or rb.shapes != ra.shapes:
            col.add("data_dependent", f"two batches of the same shape gave different graphs at operator #{i}: "
                    f"aten::{rb.name} {list(rb.shapes)} vs aten::{ra.name} {list(ra.shapes)} "
                    "(data-dependent shape or Python control flow on tensor values)", ra.where or rb.where,
                    "training_step")
            return
    if len(run_b) != len(run_a):
        col.add("data_dependent", f"two batches of the same shape dispatched {len(run_b)} vs {len(run_a)} operators "
                "(Python control flow that depends on tensor values)", "", "training_step")


def _check_optimizers(module, col: _Collector, notes: list) -> None:
    import torch

    try:
        conf = module.configure_optimizers()
    except Exception as exc:  # needs a Trainer (schedulers sized by the number of steps)
        notes.append(f"optimizer not checked: configure_optimizers failed without a Trainer ({type(exc).__name__})")
        return
    opts = []

    def collect(obj):
        if isinstance(obj, torch.optim.Optimizer):
            opts.append(obj)
        elif isinstance(obj, dict) and "optimizer" in obj:
            collect(obj["optimizer"])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                if isinstance(item, (torch.optim.Optimizer, dict, list, tuple)):
                    collect(item)

    collect(conf)
    if len(opts) > 1:
        col.add("optimizer", f"{len(opts)} optimizers; PopTorch (and Lightning's IPUStrategy) take exactly one")
    for opt in opts:
        if type(opt).__name__ not in SUPPORTED_OPTIMIZERS:
            col.add("optimizer", f"optimizer {type(opt).__name__} is not supported by PopTorch; "
                    f"use one of {', '.join(SUPPORTED_OPTIMIZERS)}")


def _check_hooks(module, col: _Collector) -> None:
    import pytorch_lightning as pl

    for hook in ("transfer_batch_to_device", "on_after_batch_transfer"):
        if getattr(type(module), hook, None) is not getattr(pl.LightningModule, hook, None):
            col.add("hook", f"{hook} is overridden; Lightning's IPUStrategy moves batches itself")
    if not getattr(module, "automatic_optimization", True):
        col.add("hook", "manual optimisation: PopTorch runs backward and the optimizer step itself")


def check_module(module, batch_a, batch_b, name: str = "model") -> CheckReport:
    """Check one LightningModule with two batches of identical shapes and different values."""
    import torch

    col = _Collector()
    counts: dict = {}
    stages = []
    notes: list = []
    batch_size = int(next(iter(_tensors(batch_a))).shape[0])
    module.train()

    # 1. warm-up step on batch A: ops, host syncs, the loss; backward outside the recorder
    out, rec_warm, marked = _record(module.training_step, batch_a, 0)
    col.ops(rec_warm, "training_step", counts)
    loss = _check_loss(out, rec_warm, marked, col)
    stages.append("training_step")
    if loss is not None and loss.requires_grad and loss.numel() == 1:
        module.zero_grad(set_to_none=True)
        loss.reshape(()).backward()
        stages.append("backward")
    del out, loss, marked

    # 2. the same step on batch B then A again: the op/shape sequence must not depend on values
    state = torch.get_rng_state()
    _, rec_b, _ = _record(module.training_step, batch_b, 0)
    torch.set_rng_state(state)
    _, rec_a, _ = _record(module.training_step, batch_a, 0)
    _check_static(rec_b, rec_a, col)

    # 3. inference graphs
    module.eval()
    with torch.no_grad():
        from pytorch_lightning.utilities.model_helpers import is_overridden

        for stage in ("validation_step", "predict_step"):
            if stage == "validation_step" and not is_overridden(stage, module):
                continue
            _, rec, _ = _record(getattr(module, stage), batch_a, 0)
            col.ops(rec, stage, counts)
            stages.append(stage)
    module.train()

    _check_optimizers(module, col, notes)
    _check_hooks(module, col)
    return CheckReport(model=name, batch_size=batch_size, findings=list(col.findings.values()), ops=counts,
                       stages=stages, notes=notes)


# ----------------------------------------------------------------------------- synthetic batches

DEFAULT_BANDS = "ugrizy"
DEFAULT_STAMP = 64


def synthetic_batches(kind: str, model, batch_size: int, bands: str = DEFAULT_BANDS, stamp: int = DEFAULT_STAMP,
                      seed: int = 0):
    """Two (x, y) batches with the same shapes and different values.

    x: (B, C, H, W) float32, positive sky-subtracted-ish electron counts; y: (B, T) targets for the
    cnn and bnn, (B, C, H, W) clean images for the vae.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    c = len(bands)
    targets = list(getattr(model, "hparams", {}).get("targets", []) or [])

    def one():
        clean = rng.gamma(2.0, 40.0, size=(batch_size, c, stamp, stamp)).astype(np.float32)  # (B, C, H, W)
        noisy = (clean + rng.normal(0.0, 5.0, size=clean.shape)).astype(np.float32)
        if kind == "vae":
            y = torch.from_numpy(clean)
        else:
            y = torch.from_numpy(rng.uniform(0.05, 0.6, size=(batch_size, max(1, len(targets)))).astype(np.float32))
        return torch.from_numpy(noisy), y

    return one(), one()
