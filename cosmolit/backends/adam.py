"""Adam over parameters stored in any dense memory order, without layout copies.

torch's fused Adam kernel walks each tensor as a flat array and copies a non-contiguous one
to contiguous and back at every step. Under torch.compile on a CPU the shape networks keep their
convolution weights channels-last (CosmolitModule.compile_network), and with them their
gradients and moment buffers: measured on the shape CNN, the copies took the optimizer step
from 0.97 to 1.8 ms. Adam is element-wise, so it can walk the elements in their memory order
instead: `Adam` hands the kernel flat views of the parameter, its gradient and its moments
whenever all of them share one dense layout. Same mathematics and state dict as torch.optim.Adam,
and the same name, so Lightning's LearningRateMonitor still logs `lr-Adam`. Not for the IPU, which
takes no Python optimizer of its own: there cosmolit.backends.make_adam builds torch's Adam.
"""

from __future__ import annotations

from typing import Optional

import torch


def memory_order_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A 1-D view of the elements of `t` in the order they lie in memory, or None when `t` is
    contiguous already or not dense (gaps or overlaps between its elements)."""
    if t.dim() < 2 or t.is_contiguous():
        return None
    order = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


class Adam(torch.optim.Adam):
    """torch.optim.Adam that steps parameters stored in another dense layout than contiguous
    through flat views in their memory order (module docstring)."""

    def _init_group(self, group, *args):
        # args: the index-aligned lists torch fills (params with a gradient first, then grads,
        # moments, steps) and flags; the lists are rebuilt at every step
        out = super()._init_group(group, *args)
        lists = [a for a in args if isinstance(a, list)]
        n = len(lists[0])
        aligned = [lst for lst in lists if len(lst) == n]
        for i in range(n):
            p = aligned[0][i]
            flat = memory_order_view(p)
            if flat is None:
                continue
            same = [lst for lst in aligned if lst[i].shape == p.shape]  # not the scalar step counts
            if all(lst[i].stride() == p.stride() for lst in same):
                for lst in same:
                    lst[i] = memory_order_view(lst[i])
        return out
