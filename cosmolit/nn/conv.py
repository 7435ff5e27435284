"""Conv2d whose weight gradient, for small outputs on a CPU under torch.compile, is one matrix product.

The weight gradient of a convolution is a sum over output positions:

    dL/dW[o, c, i, j] = sum over b, y, x of g[b, o, y, x] * x_pad[b, c, s*y + i, s*x + j]

that is G^T @ P, with G the output gradient as a (B*Ho*Wo, C_out) matrix and P the input patches
as a (B*Ho*Wo, k*k*C_in) matrix (im2col). oneDNN, which computes it inside
`aten.convolution_backward` on a CPU, is slow when there are few output positions and many
weights. Measured on a 2-core AVX-512 CPU at batch 2, compiled as in a training step
(benchmarks/bench_conv_wgrad.py, benchmarks/RESULTS.md): the shape trunk's last convolution
(256 -> 256 channels, 4x4 outputs, 590k weights) 0.62 ms for oneDNN's weight and bias gradients
against 0.25 ms for the patch copy and the product, the 128 -> 128 and 128 -> 256 ones (8x8
outputs) 1.56x and 1.22x; at 16x16 outputs the two are even, at 32x32 and 64x64 oneDNN is up to
1.6x faster. So the product is used where B*Ho*Wo <= C_out: for the trunk's last three
convolutions at batch 2, its last two at batch 4, its last one at batch 8 to 16, none from 32 on. The compiled shape-CNN step at batch 2:
1.09x to 1.14x faster. Same sum, in another order: the gradients agree with oneDNN's to float
rounding (tests/test_nn.py).

Only where it was measured to pay: on a CPU, with gradients, inside code that torch.compile traces
(Inductor fuses the patch copy into one kernel; eager, the extra Python-level backward and
channels-first activations made the step 0.94x as fast at batch 2). Elsewhere, and on torch older
than 2.3 (the IPU stack, whose tracer cannot be told apart: cosmolit.backends.compiling), this is
torch's Conv2d. The input gradient is always oneDNN's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cosmolit.nn.tracing import tracing_check

# the product is used where (output positions) <= ROWS_PER_FILTER * (output channels)
ROWS_PER_FILTER = 1
_IS_COMPILING = tracing_check()


def conv2d_weight_grad(g: torch.Tensor, x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """dL/dW (C_out, C_in, k, k) of conv2d(x, W, stride=stride, padding=padding) for the output
    gradient g (B, C_out, Ho, Wo) and the input x (B, C_in, H, W): square kernel, zero padding,
    no dilation, one group. Returned with channels-last strides (the product's natural order)."""
    b, c_in = x.shape[:2]
    c_out, ho, wo = g.shape[1:]
    xp = F.pad(x, (padding, padding, padding, padding))  # (B, C_in, H + 2p, W + 2p)
    s_b, s_c, s_h, s_w = xp.stride()
    # patches[b, y, x, i, j, c] = xp[b, c, stride*y + i, stride*x + j]: a strided view, one copy
    patches = xp.as_strided((b, ho, wo, kernel, kernel, c_in), (s_b, stride * s_h, stride * s_w, s_h, s_w, s_c))
    patches = patches.reshape(b * ho * wo, kernel * kernel * c_in)  # columns (i, j, c)
    grad = g.permute(0, 2, 3, 1).reshape(b * ho * wo, c_out)  # (B*Ho*Wo, C_out)
    return (grad.t() @ patches).view(c_out, kernel, kernel, c_in).permute(0, 3, 1, 2)  # (C_out, C_in, k, k)


class _ProductWeightGradConv2d(torch.autograd.Function):
    """conv2d forward; backward: input gradient from aten.convolution_backward, weight gradient
    from conv2d_weight_grad, bias gradient a sum."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding):
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(g, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            dw = conv2d_weight_grad(g, x, weight.shape[-1], s, p)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum((0, 2, 3))
        return dx, dw, db, None, None


class Conv2d(nn.Conv2d):
    """torch's Conv2d (same parameters, state dict and forward values); its weight gradient is a
    matrix product where that was measured faster (see the module docstring)."""

    def _product_weight_grad(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        if _IS_COMPILING is None or not _IS_COMPILING() or x.device.type != "cpu" or x.dim() != 4:
            return False
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return False
        k, s, p = self.kernel_size, self.stride, self.padding
        if (self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(p, str)
                or k[0] != k[1] or s[0] != s[1] or p[0] != p[1]):
            return False
        h_out = (x.shape[-2] + 2 * p[0] - k[0]) // s[0] + 1
        w_out = (x.shape[-1] + 2 * p[1] - k[1]) // s[1] + 1
        return x.shape[0] * h_out * w_out <= ROWS_PER_FILTER * self.out_channels

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        if self._product_weight_grad(input, weight):
            return _ProductWeightGradConv2d.apply(input, weight, bias, self.stride[0], self.padding[0])
        return super()._conv_forward(input, weight, bias)
