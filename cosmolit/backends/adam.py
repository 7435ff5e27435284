"""Adam over parameters stored in any dense memory order, without layout copies.

torch's fused Adam kernel walks each tensor as a flat array and copies a non-contiguous one
to contiguous and back at every step. Under torch.compile on a CPU the shape networks keep their
convolution weights channels-last (CosmolitModule.compile_network), and with them their
gradients and moment buffers: measured on the shape CNN, the copies took the optimizer step
from 0.97 to 1.8 ms. Adam is element-wise, so it can walk the elements in their memory order
instead: `Adam` hands the kernel flat views of the parameter, its gradient and its moments.

It also keeps them in one layout, which torch's fused CPU kernel needs and does not check: given
a channels-last weight and a contiguous gradient or moment (torch 2.13), it pairs the elements by
memory position and silently computes a wrong update. That happens to torch's own fused Adam
whenever a parameter changes layout while its optimizer holds moments: a run resumed eager from
the checkpoint of a compiled one, or a compiled run falling back to eager. Here a moment buffer in
another layout than its parameter is copied once into the parameter's layout, and such a gradient
(autograd gives each gradient its parameter's layout) is handed over as a copy in that layout.

Same mathematics and state dict as torch.optim.Adam, and the same name, so Lightning's
LearningRateMonitor still logs `lr-Adam`. Not for the IPU, which takes no Python optimizer of its
own: there cosmolit.backends.make_adam builds torch's Adam.
"""

from __future__ import annotations

from typing import Optional

import torch


def memory_order_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A 1-D view of the elements of `t` in the order they lie in memory, or None when `t` is
    contiguous already or not dense (gaps or overlaps between its elements)."""
    if t.is_contiguous():
        return None
    expected = 1  # dense: sorted by stride, each stride is the number of elements below it
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda e: e[1]):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class Adam(torch.optim.Adam):
    """torch.optim.Adam that steps parameters stored in another dense layout than contiguous
    through flat views in their memory order (module docstring)."""

    def _init_group(self, group, *args):
        out = super()._init_group(group, *args)
        # args: the index-aligned lists torch fills at every step (params with a gradient first,
        # then grads, moments, step counts; max moments only with amsgrad) and flags
        lists = [a for a in args if isinstance(a, list)]
        params = lists[0]
        others = [lst for lst in lists[1:] if len(lst) == len(params)]
        for i, p in enumerate(params):
            if p.is_contiguous() and all(lst[i].is_contiguous() for lst in others):
                continue  # the common case: nothing to do
            self._align(p, i, params, others)
        return out

    def _align(self, p: torch.Tensor, i: int, params: list, others: list) -> None:
        """Bring the gradient and moments at index i to p's layout (a moment for good, in the
        state), then, for a non-contiguous p, put flat memory-order views of all of them in the lists."""
        state = self.state[p]
        for lst in others:
            t = lst[i]
            if t.shape == p.shape and t.stride() != p.stride():  # (the step count is a scalar)
                lst[i] = torch.empty_like(p).copy_(t)
                for key, value in state.items():
                    if value is t:
                        state[key] = lst[i]
        flat = memory_order_view(p)
        if flat is None:
            return
        params[i] = flat
        for lst in others:  # all in p's layout now
            t = lst[i]
            if t.shape == p.shape:
                lst[i] = t.as_strided(flat.shape, (1,), t.storage_offset())
