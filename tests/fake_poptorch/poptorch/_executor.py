"""TEST DOUBLE: a CPU PoplarExecutor that enforces PopTorch's static-graph rules (not an IPU emulator)."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cosmolit.backends.check import KNOWN_LOSS_GRAD_FNS, normalise_op, op_status, user_location

SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)

# the executor whose compiled step is running (identity_loss counts its losses there)
_RUNNING: list = []


def _error(message):
    from poptorch import Error

    return Error(message)


def identity_loss(x, reduction="none"):
    """Mark `x` as the model's loss (reduced by 'sum', 'mean' or 'none'), as poptorch.identity_loss does."""
    if reduction == "sum":
        out = x.sum()
    elif reduction == "mean":
        out = x.mean()
    elif reduction == "none":
        out = x * 1.0 if x.requires_grad else x.clone()  # a new tensor that carries the mark
    else:
        raise _error(f"identity_loss: reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    out._poptorch_identity_loss = True
    if _RUNNING:
        _RUNNING[-1]._losses += 1
        if _RUNNING[-1]._losses > 1:
            raise _error("Multiple independent losses found in the graph: combine them and call identity_loss once")
    return out


class _Guard(TorchDispatchMode):
    """Raises, as PopTorch's compiler would, on operators a static IPU graph cannot hold."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = normalise_op(func)
        status = op_status(name)
        if name == "index" and any(isinstance(a, (list, tuple)) and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a) for a in args[1:]):
            status = "data_dependent"
        if status == "host_sync":
            raise _error(f"host synchronisation (aten::{name}: .item(), bool(tensor), float(tensor)) inside the "
                         f"compiled step at {user_location(2)}")
        if status == "data_dependent":
            raise _error(f"aten::{name} gives a data-dependent shape; not allowed in a static graph "
                         f"(at {user_location(2)})")
        if status == "unsupported":
            raise _error(f"Unsupported op: aten::{name} has no PopTorch 3.4 handler (at {user_location(2)})")
        return func(*args, **kwargs)


def _split(obj, n):
    """Return n micro-batch copies of `obj`, each tensor cut into n equal slices along dim 0."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0 or obj.shape[0] % n != 0:
            raise _error(f"input of shape {tuple(obj.shape)} cannot be split into {n} micro-batches "
                         "(deviceIterations x replicationFactor x gradientAccumulation)")
        return list(obj.chunk(n, dim=0))
    if isinstance(obj, (list, tuple)):
        parts = [_split(o, n) for o in obj]
        return [type(obj)(p[i] for p in parts) if isinstance(obj, tuple) else [p[i] for p in parts]
                for i in range(n)]
    if isinstance(obj, dict):
        parts = {k: _split(v, n) for k, v in obj.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    return [obj] * n


def _signature(obj):
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_signature(o) for o in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in obj.items()))
    return ("const", repr(obj))


def _combine(outputs, stack_scalars=True):
    """Join per-micro-batch outputs like PopTorch's output mode 'All' (scalars stacked, tensors concatenated)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            return torch.stack(outputs)
        return torch.cat(outputs, dim=0)
    if isinstance(first, (list, tuple)):
        return type(first)(_combine([o[i] for o in outputs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _combine([o[k] for o in outputs]) for k in first}
    return first


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _find_loss(out):
    """The loss PopTorch would find: identity_loss-marked, or the scalar output of a torch loss function."""
    candidates = []
    if isinstance(out, torch.Tensor):
        candidates = [out]
    elif isinstance(out, dict):
        candidates = [v for v in out.values() if isinstance(v, torch.Tensor)]
    elif isinstance(out, (list, tuple)):
        candidates = [v for v in out if isinstance(v, torch.Tensor)]
    marked = [t for t in candidates if getattr(t, "_poptorch_identity_loss", False)]
    if len(marked) == 1:
        return marked[0]
    known = [t for t in candidates if t.grad_fn is not None and type(t.grad_fn).__name__ in KNOWN_LOSS_GRAD_FNS
             and t.numel() == 1]
    if len(marked) + len(known) == 1:
        return (marked + known)[0]
    if len(marked) + len(known) > 1:
        raise _error("Multiple independent losses are output by the model; PopTorch needs exactly one")
    raise _error("No loss found in the training model's output: return a scalar marked with poptorch.identity_loss "
                 "or the output of a torch loss function")


class PoplarExecutor:
    """What trainingModel / inferenceModel return; call it like the wrapped model with a host batch."""

    def __init__(self, model, options, training, optimizer=None):
        self.model = model
        self._options = options
        self.training = training
        self._executable = None
        self._attached = False
        self._signature = None
        self._rng_state = None
        self._losses = 0
        self._optimizer = None
        if training:
            if optimizer is None:
                raise _error("trainingModel: pass the optimizer (cosmolit always trains with one)")
            self._check_optimizer(optimizer)
            self._optimizer = optimizer

    # -- device management used by Lightning's IPUStrategy
    def isAttachedToDevice(self):
        return self._attached

    def attachToDevice(self):
        if self._executable is None:
            raise _error("attachToDevice: the model has not been compiled yet")
        self._attached = True

    def detachFromDevice(self):
        if not self._attached:
            raise _error("detachFromDevice: the model is not attached")
        self._attached = False

    def destroy(self):
        self._executable = None
        self._attached = False
        self._signature = None

    def copyWeightsToHost(self):
        pass

    def copyWeightsToDevice(self):
        pass

    def setOptimizer(self, optimizer):
        if not self.training:
            raise _error("setOptimizer on an inference model")
        self._check_optimizer(optimizer)
        if optimizer is not self._optimizer:
            old = {id(p) for g in self._optimizer.param_groups for p in g["params"]}
            new = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if old != new or type(optimizer) is not type(self._optimizer):
                raise _error("a second optimizer: a PopTorch training model is compiled with exactly one optimizer")
            self._optimizer = optimizer

    @staticmethod
    def _check_optimizer(optimizer):
        if isinstance(optimizer, (list, tuple)):
            raise _error("PopTorch takes exactly one optimizer, got a list")
        if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
            raise _error(f"Unsupported optimizer {type(optimizer).__name__}: use torch.optim SGD, Adam, AdamW, "
                         "RMSprop or poptorch.optim")

    # -- running
    @property
    def _micro_batches(self):
        o = self._options
        acc = o.Training.gradient_accumulation if self.training else 1
        return o.device_iterations, o.replication_factor, acc

    def __call__(self, *args, **kwargs):
        di, rf, ga = self._micro_batches
        n = di * rf * ga
        micro = _split((args, kwargs), n)
        signature = _signature(micro[0])
        if self._signature is None:
            self._signature = signature
            self._executable = object()  # "compiled"
            self._attached = True
        elif signature != self._signature:
            raise _error("input shapes or dtypes changed since the model was compiled "
                         f"({self._signature} -> {signature}); an IPU graph is static: call destroy() to recompile")
        if not self._attached:  # as PopTorch's PoplarExecutor.__call__: a detached model attaches again
            self._attached = True
        with torch.random.fork_rng(devices=[]):
            if self._rng_state is None:
                seed = self._options.random_seed
                torch.manual_seed(seed if seed is not None else torch.initial_seed())
            else:
                torch.set_rng_state(self._rng_state)
            try:
                result = self._train(micro, di, rf, ga) if self.training else self._infer(micro)
            finally:
                self._rng_state = torch.get_rng_state()
        return result

    def _forward(self, mb):
        a, kw = mb
        self._losses = 0
        _RUNNING.append(self)
        try:
            with _no_log(self.model), _Guard():
                return self.model(*a, **kw)
        finally:
            _RUNNING.pop()

    def _train(self, micro, di, rf, ga):
        self.model.train()
        final = [None] * rf
        k = 0
        for _ in range(di):
            self._optimizer.zero_grad(set_to_none=True)
            for r in range(rf):
                for _ in range(ga):
                    out = self._forward(micro[k])
                    k += 1
                    loss = _find_loss(out)
                    if loss.numel() != 1:
                        raise _error(f"the loss has shape {tuple(loss.shape)}; a training model needs a scalar loss")
                    if not loss.requires_grad:
                        raise _error("the loss does not depend on any trainable parameter")
                    # mean over replicas and accumulated micro-batches (PopTorch's default reduction)
                    (loss.reshape(()) / (rf * ga)).backward()
                    final[r] = _detach(out)
            self._optimizer.step()
        return final[0] if rf == 1 else _combine(final)

    def _infer(self, micro):
        with torch.no_grad():
            outs = [_detach(self._forward(mb)) for mb in micro]
        if any(o is None for o in outs):
            return None
        return outs[0] if len(outs) == 1 else _combine(outs)


@contextlib.contextmanager
def _no_log(model):
    """self.log / self.log_dict inside a compiled step raise (Lightning cannot log from the IPU graph)."""
    import pytorch_lightning as pl

    modules = [m for m in model.modules() if isinstance(m, pl.LightningModule)]

    def refuse(*args, **kwargs):
        raise _error("self.log inside a compiled *_step is not supported on IPU: return the value and log it "
                     f"in an epoch-end hook (at {user_location(2)})")

    for m in modules:
        object.__setattr__(m, "log", refuse)
        object.__setattr__(m, "log_dict", refuse)
    try:
        yield
    finally:
        for m in modules:
            for name in ("log", "log_dict"):
                if name in m.__dict__:
                    object.__delattr__(m, name)
