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

The module is made only of nn.BatchNorm2d, Conv2d (cosmolit.nn.conv: torch's, with a faster weight
gradient for small outputs under torch.compile) and ElementwisePReLU / nn.PReLU attributes,
so a Bayesian version can replace the conv weights (cosmolit.nn.bayes, Pyro's to_pyro_module_).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosmolit.errors import UsageError
from cosmolit.nn.conv import Conv2d
from cosmolit.nn.tracing import tracing_check

PRELU_KINDS = ("element", "channel")
_PRELU_KERNEL = getattr(torch, "_prelu_kernel", None)  # fused, broadcasting PReLU (torch >= 2.0)


def _is_nhwc(x: torch.Tensor) -> bool:
    """True for a channels-last (not also contiguous) 4-D tensor; False inside vmap, which cannot say."""
    try:
        return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    except RuntimeError:  # torch.func.vmap's batched tensors answer only the default format
        return False


# None before torch 2.3 (cosmolit.nn.tracing.tracing_check): there torch 2.0's Dynamo also
# mis-traces the custom Function below (the IPU stack's CI run gave a loss of 1e32), so older torch
# keeps the kernel.
_IS_COMPILING = tracing_check()


class _CPUPReLU(torch.autograd.Function):
    """torch's fused PReLU forward with a backward built from vectorised element-wise ops.

    Why: on CPU, torch's `_prelu_kernel_backward` runs a per-element select that is not
    vectorised (as torch.where is not): 0.88 ms for the trunk's first feature map at batch 2
    (2 x 32 x 64 x 64), where the five passes below take 0.38 ms. Over the trunk's eight PReLUs,
    forward + backward, 3.2 -> 2.3 ms at batch 2 and 44.7 -> 20.9 ms at batch 32; a whole training
    step of the shape CNN, 1.05x to 1.26x faster at batch 8 to 128 and no faster at batch 2, where
    the Python-level backward costs what it saves (benchmarks/RESULTS.md). The input gradient is
    bit-identical to torch's, the slope gradient equal up to the order of the batch sum
    (tests/test_nn.py):

        kept = g where x > 0 else 0        (threshold_backward, ReLU's backward)
        rest = g - kept                    (g where x <= 0 else 0, exactly)
        dx   = kept + a * rest             (g or a * g, exactly)
        da   = sum over broadcast dims of rest * x
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, a):
        return _PRELU_KERNEL(x, a)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        kept = torch.ops.aten.threshold_backward(g, x, 0)
        rest = g - kept
        dx = torch.addcmul(kept, a, rest) if ctx.needs_input_grad[0] else None
        da = (rest * x).sum_to_size(a.shape) if ctx.needs_input_grad[1] else None
        return dx, da


class ElementwisePReLU(nn.Module):
    """PReLU with one learned slope per element of `shape`: y = x if x > 0 else a * x.

    shape (C, H, W) gives Keras' default PReLU (one slope per feature-map element); (C, 1, 1)
    one slope per channel; (F,) one per feature of a dense layer. Input (B, *shape), broadcast.

    Runs on torch's fused PReLU kernel (`torch._prelu_kernel`, which broadcasts any slope shape
    and is in PopTorch 3.4's lowered-op list): one pass forward and one backward. On CPU (batch
    32, the trunk's eight feature-map shapes, forward + backward) it takes 0.6x the time of the
    relu form relu(x) - a * relu(-x), which is itself 0.43x that of torch.where(x >= 0, x, a * x).
    The relu form remains as the fallback for a torch without the kernel. On CPU, with gradients
    on and outside torch.compile, the backward is _CPUPReLU's (same gradients, vectorised ops).
    """

    def __init__(self, shape: tuple[int, ...], init: float = 0.25):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not shape or min(shape) < 1:
            raise UsageError(f"PReLU shape must be a non-empty tuple of positive sizes, got {shape}")
        self.shape = shape
        self.weight = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dim() == 3 and x.dim() == 4 and _is_nhwc(x):
            # NHWC activations: give the slopes the same layout, else the broadcast walks them
            # across strides (17x slower on CPU for (32, 64, 64) slopes at batch 32)
            w = w.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # (1, C, H, W)
        if _PRELU_KERNEL is None:
            return F.relu(x) - w * F.relu(-x)
        eager_cpu = x.device.type == "cpu" and _IS_COMPILING is not None and not _IS_COMPILING()
        if eager_cpu and torch.is_grad_enabled():
            return _CPUPReLU.apply(x, w)  # (B, *shape)
        return _PRELU_KERNEL(x, w)  # (B, *shape); under torch.compile Inductor fuses its backward

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def he_normal_(t: torch.Tensor, generator: Optional[torch.Generator] = None,
               fan_in: Optional[float] = None) -> torch.Tensor:
    """He-normal initialisation in place (gain sqrt 2, untruncated, as Keras' he_normal); fan_in
    defaults to the number of entries per output unit (t[0].numel(): in_features, C_in k^2)."""
    fan_in = t[0].numel() if fan_in is None else fan_in
    with torch.no_grad():
        return t.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)


def init_he_(module: nn.Module) -> nn.Module:
    """He-normal weights and zero biases for every Linear, Conv2d and ConvTranspose2d of `module`.

    Why: torch's default (uniform, variance 1 / (3 fan_in)) shrinks the signal at every layer;
    measured on 64 LSST-like stamps at initialisation, the spread across galaxies of the trunk's
    features fell from 0.55 after the first convolution to 8e-4 after the eighth, the VAE's
    latent means varied by 1.5e-4 against a posterior sigma of 0.69, and its decoder's output
    by 4e-9: the networks start blind to their input. With He-normal the spread stays of order
    0.1 to 1 through every layer. A transposed convolution of stride s feeds each output pixel
    from C_in k^2 / s^2 weights on average, which is its fan-in here.
    """
    for m in module.modules():
        if isinstance(m, nn.ConvTranspose2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            he_normal_(m.weight, fan_in=m.in_channels * k / (m.stride[0] * m.stride[1]))
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            he_normal_(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return module


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
            layers += [Conv2d(c_in, f, 3, padding=1), make_prelu(prelu, (f, size, size))]
            size //= 2
            layers += [Conv2d(f, f, 3, stride=2, padding=1), make_prelu(prelu, (f, size, size))]
            c_in = f
        self.blocks = init_he_(nn.Sequential(*layers))
        self.out_size = size
        self.out_features = filters[-1] * size * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # (B, C, H, W)
        h = self.blocks(h)  # (B, F_last, H / 2^n, W / 2^n)
        return h.flatten(1)  # (B, out_features)
