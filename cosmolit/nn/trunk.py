"""The convolutional trunk shared by the shape CNN, the Bayesian CNN and the VAE encoder.

Layout (Arcelin 2021, arXiv:2106.02465; channels-first here, channels-last in the study's Keras):

    x (B, C, H, W) -> BatchNorm2d(C)
    -> for f in filters (32, 64, 128, 256):
           Conv2d(k3, padding 1) + PReLU               # same size
           Conv2d(k3, stride 2, padding 1) + PReLU     # halves H, W
    -> flatten (B, filters[-1] * (H / 2^len(filters))^2)    # 4096 for 64x64 stamps

PReLU follows Keras' default: one learned slope per element of the feature map ("element"),
initialised at 0.25 as torch's PReLU (Keras initialises at 0; the study's counts only need the
number of slopes). prelu="channel" shares one slope per channel instead.

With 6 bands, 64x64 stamps and a Linear(4096, 9) head the network has 1,517,205 trainable
parameters, the study's count: 12 BatchNorm (gamma, beta) + 1,173,120 conv (weights and biases)
+ 307,200 PReLU slopes + 36,873 head.

The module is made only of nn.BatchNorm2d, nn.Conv2d and ElementwisePReLU / nn.PReLU attributes,
so a Bayesian version can replace the conv weights (cosmolit.nn.bayes, Pyro's to_pyro_module_).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosmolit.errors import UsageError

PRELU_KINDS = ("element", "channel")
_PRELU_KERNEL = getattr(torch, "_prelu_kernel", None)  # fused, broadcasting PReLU (torch >= 2.0)


class ElementwisePReLU(nn.Module):
    """PReLU with one learned slope per element of `shape`: y = x if x > 0 else a * x.

    shape (C, H, W) gives Keras' default PReLU (one slope per feature-map element); (C, 1, 1)
    one slope per channel; (F,) one per feature of a dense layer. Input (B, *shape), broadcast.

    Runs on torch's fused PReLU kernel (`torch._prelu_kernel`, which broadcasts any slope shape
    and is in PopTorch 3.4's lowered-op list): one pass forward and one backward. On CPU (batch
    32, the trunk's eight feature-map shapes, forward + backward) it takes 0.6x the time of the
    relu form relu(x) - a * relu(-x), which is itself 0.43x that of torch.where(x >= 0, x, a * x).
    The relu form remains as the fallback for a torch without the kernel.
    """

    def __init__(self, shape: tuple[int, ...], init: float = 0.25):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not shape or min(shape) < 1:
            raise UsageError(f"PReLU shape must be a non-empty tuple of positive sizes, got {shape}")
        self.shape = shape
        self.weight = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _PRELU_KERNEL is not None:
            return _PRELU_KERNEL(x, self.weight)  # (B, *shape)
        return F.relu(x) - self.weight * F.relu(-x)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def make_prelu(kind: str, shape: tuple[int, ...]) -> nn.Module:
    """PReLU of `kind`: "element" (one slope per element of shape) or "channel" (per channel, shape[0])."""
    if kind == "element":
        return ElementwisePReLU(shape, init=0.25)
    if kind == "channel":
        return nn.PReLU(int(shape[0]), init=0.25)
    raise UsageError(f"prelu {kind!r} is not allowed; choose one of {', '.join(PRELU_KINDS)}")


class Trunk(nn.Module):
    """(B, in_channels, stamp, stamp) normalised images -> (B, out_features) features."""

    def __init__(self, in_channels: int = 6, stamp: int = 64, filters: Sequence[int] = (32, 64, 128, 256),
                 prelu: str = "element"):
        super().__init__()
        filters = tuple(int(f) for f in filters)
        in_channels, stamp = int(in_channels), int(stamp)
        if in_channels < 1:
            raise UsageError(f"the trunk needs at least one input band, got in_channels={in_channels}")
        if not filters or min(filters) < 1:
            raise UsageError(f"filters must be a non-empty list of positive integers, got {list(filters)}")
        if prelu not in PRELU_KINDS:
            raise UsageError(f"prelu {prelu!r} is not allowed; choose one of {', '.join(PRELU_KINDS)}")
        factor = 2 ** len(filters)
        if stamp < factor or stamp % factor:
            raise UsageError(
                f"stamp size {stamp} is not a multiple of 2^{len(filters)} = {factor} (one halving per filter); "
                f"use a stamp divisible by {factor} or fewer filters"
            )
        self.in_channels, self.stamp, self.filters = in_channels, stamp, filters
        self.norm = nn.BatchNorm2d(in_channels)
        layers: list[nn.Module] = []
        c_in, size = in_channels, stamp
        for f in filters:
            layers += [nn.Conv2d(c_in, f, 3, padding=1), make_prelu(prelu, (f, size, size))]
            size //= 2
            layers += [nn.Conv2d(f, f, 3, stride=2, padding=1), make_prelu(prelu, (f, size, size))]
            c_in = f
        self.blocks = nn.Sequential(*layers)
        self.out_size = size
        self.out_features = filters[-1] * size * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # (B, C, H, W)
        h = self.blocks(h)  # (B, F_last, H / 2^n, W / 2^n)
        return h.flatten(1)  # (B, out_features)
