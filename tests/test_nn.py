"""The trunk, the element-wise PReLU and the Gaussian head / likelihood (cosmolit.nn)."""

import math

import pytest
import torch
from torch import nn

import cosmolit.nn.conv as conv_module
from cosmolit.errors import UsageError
from cosmolit.nn.conv import Conv2d, conv2d_weight_grad
from cosmolit.nn.gaussian import GaussianHead, covariance, gaussian_nll, head_to_gaussian, tril_size
from cosmolit.nn.tracing import tracing_check
from cosmolit.nn.trunk import ElementwisePReLU, Trunk


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "relu-fallback"])
def test_prelu_matches_the_where_formulation_values_and_gradients(fused, monkeypatch):
    import cosmolit.nn.trunk as trunk_mod

    if not fused:
        monkeypatch.setattr(trunk_mod, "_PRELU_KERNEL", None)
    elif trunk_mod._PRELU_KERNEL is None:
        pytest.skip("this torch has no fused PReLU kernel")
    torch.manual_seed(0)
    p = ElementwisePReLU((4, 5, 5), init=0.25)
    with torch.no_grad():
        p.weight.uniform_(-0.5, 0.9)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    ref_w = p.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = p(x)
    y_ref = torch.where(x_ref >= 0, x_ref, ref_w * x_ref)
    assert torch.allclose(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad) and torch.allclose(p.weight.grad, ref_w.grad)
    assert p.weight.grad.shape == (4, 5, 5)  # a slope per element
    assert torch.allclose(p.weight.grad, (g * x.detach() * (x.detach() < 0)).sum(0))
    # per-channel slopes broadcast over H, W
    pc = ElementwisePReLU((4, 1, 1), init=0.1)
    assert torch.allclose(pc(-torch.ones(2, 4, 3, 3)), torch.full((2, 4, 3, 3), -0.1))
    # channels_last inputs (slopes laid out alike on the fly) give the same values and gradients
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    p.weight.grad = None
    y_cl = p(x_cl)
    assert torch.allclose(y_cl, y.detach())
    (y_cl * g).sum().backward()
    assert torch.allclose(x_cl.grad, x.grad) and torch.allclose(p.weight.grad, ref_w.grad)
    assert p.weight.grad.shape == (4, 5, 5)


@pytest.mark.parametrize("shape", [(4, 5, 5), (4, 1, 1), (7,)], ids=["element", "channel", "dense"])
def test_cpu_prelu_backward_is_bit_identical_to_torchs_kernel(shape):
    """The CPU backward built from vectorised ops gives exactly the gradients of torch's own kernel,
    including at x == 0 (slope a, as torch) and for negative slopes."""
    import cosmolit.nn.trunk as trunk_mod

    if trunk_mod._PRELU_KERNEL is None:
        pytest.skip("this torch has no fused PReLU kernel")
    torch.manual_seed(1)
    a = torch.empty(shape).uniform_(-0.5, 0.9).requires_grad_(True)
    x = torch.randn(3, *shape)
    x.view(-1)[::5] = 0.0  # exact zeros take the negative side's slope, as in torch
    x.requires_grad_(True)
    g = torch.randn_like(x)
    y = trunk_mod._CPUPReLU.apply(x, a)
    dx, da = torch.autograd.grad(y, (x, a), g)
    x_ref, a_ref = x.detach().clone().requires_grad_(True), a.detach().clone().requires_grad_(True)
    y_ref = torch._prelu_kernel(x_ref, a_ref)
    dx_ref, da_ref = torch.autograd.grad(y_ref, (x_ref, a_ref), g)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert torch.allclose(da, da_ref, rtol=1e-6, atol=1e-7)  # a sum over the batch: order may differ
    assert da.shape == a.shape
    # the module takes this path on CPU with gradients on (where torch can tell compiled code,
    # torch >= 2.3), and the plain kernel without them
    p = ElementwisePReLU(shape)
    custom = trunk_mod._IS_COMPILING is not None
    assert p(x).grad_fn.name().startswith("_CPUPReLU") == custom
    with torch.no_grad():
        assert torch.equal(p(x), torch._prelu_kernel(x, p.weight))


@pytest.mark.parametrize("prelu", ["element", "channel"])
def test_trunk_shapes(prelu):
    trunk = Trunk(in_channels=3, stamp=32, filters=(4, 8, 8, 16), prelu=prelu)
    assert trunk.out_features == 16 * 2 * 2
    out = trunk(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 64)
    layers = [m for m in trunk.modules() if not isinstance(m, (Trunk, nn.Sequential))]
    assert sum(isinstance(m, nn.Conv2d) for m in layers) == 8
    assert sum(isinstance(m, nn.BatchNorm2d) for m in layers) == 1


def test_parameter_count_matches_the_study():
    """6 bands, 64x64, filters 32..256, element PReLU, Linear(4096, 9): 1,517,205 as TensorFlow counts."""
    trunk = Trunk()
    head = GaussianHead(trunk.out_features, 3)
    assert trunk.out_features == 4096 and head.linear.out_features == 9
    n = sum(p.numel() for m in (trunk, head) for p in m.parameters() if p.requires_grad)
    assert n == 1_517_205
    assert sum(p.numel() for m in trunk.modules() if isinstance(m, ElementwisePReLU) for p in m.parameters()) == 307_200


@pytest.mark.parametrize("c_in,c_out,k,stride,padding,size",
                         [(3, 5, 3, 1, 1, 7), (4, 8, 3, 2, 1, 8), (2, 3, 5, 2, 2, 9), (6, 4, 1, 1, 0, 5), (4, 6, 3, 2, 0, 7)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_weight_gradient_as_one_matrix_product_equals_torchs(c_in, c_out, k, stride, padding, size, channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, c_in, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, k, k, requires_grad=True)
    out = torch.nn.functional.conv2d(x, w, None, stride, padding)
    g = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, w, g)
    got = conv2d_weight_grad(g, x, k, stride, padding)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_conv2d_takes_the_product_weight_gradient_only_for_small_outputs_under_compile(monkeypatch):
    if tracing_check() is None:
        pytest.skip("no torch.compiler.is_compiling in this torch: Conv2d is torch's everywhere")
    calls = []  # the shapes of the inputs whose weight gradient went through the product
    product = conv_module.conv2d_weight_grad
    monkeypatch.setattr(conv_module, "conv2d_weight_grad", lambda g, x, *a: calls.append(tuple(x.shape)) or product(g, x, *a))
    torch.manual_seed(0)
    # batch 2: the first has 2 * 4 * 4 = 32 output positions for 32 output channels, the second 32 for 4
    net = nn.Sequential(Conv2d(8, 32, 3, stride=2, padding=1), nn.PReLU(), Conv2d(32, 4, 3, padding=1))
    reference = nn.Sequential(nn.Conv2d(8, 32, 3, stride=2, padding=1), nn.PReLU(), nn.Conv2d(32, 4, 3, padding=1))
    reference.load_state_dict(net.state_dict())
    x = torch.randn(2, 8, 8, 8, requires_grad=True)

    def grads(model, run):
        loss = run(x).square().sum()
        return torch.autograd.grad(loss, [x, *model.parameters()])

    expected = grads(reference, reference)
    eager = grads(net, net)
    assert calls == []  # eager: torch's convolution backward
    compiled = grads(net, torch.compile(net, backend="aot_eager", dynamic=False))
    assert calls == [(2, 8, 8, 8)]  # traced once, the first convolution only
    for got, want in zip(compiled, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(eager, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(stamp=60), dict(stamp=8), dict(prelu="shared"), dict(filters=()),
                                dict(filters=(8, 0))])
def test_trunk_refuses_bad_settings(kw):
    with pytest.raises(UsageError):
        Trunk(**{"in_channels": 3, "stamp": 32, "filters": (4, 8, 8, 16), **kw})


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_gaussian_nll_equals_torch_multivariate_normal(d):
    gen = torch.Generator().manual_seed(d)
    raw = torch.randn(16, d + tril_size(d), generator=gen, dtype=torch.float64) * 1.5
    mean, scale_tril = head_to_gaussian(raw, d)
    assert mean.shape == (16, d) and scale_tril.shape == (16, d, d)
    assert torch.equal(scale_tril, torch.tril(scale_tril))
    assert torch.all(torch.diagonal(scale_tril, dim1=-2, dim2=-1) > 0)
    y = mean + torch.randn(16, d, generator=gen, dtype=torch.float64) * 2
    ref = -torch.distributions.MultivariateNormal(mean, scale_tril=scale_tril).log_prob(y)
    assert torch.allclose(gaussian_nll(y, mean, scale_tril), ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(covariance(scale_tril), scale_tril @ scale_tril.mT)


def test_head_mapping_uses_softplus_diagonal_and_free_off_diagonal():
    raw = torch.tensor([[0.5, -1.0, 0.0, 2.0, -3.0, 7.0, 11.0, 13.0, -17.0]])  # d = 3
    mean, L = head_to_gaussian(raw, 3)
    assert torch.equal(mean, raw[:, :3])
    diag = torch.nn.functional.softplus(raw[0, 3:6]) + 1e-5
    assert torch.allclose(torch.diagonal(L[0]), diag)
    # strict lower triangle in row order: (1,0), (2,0), (2,1)
    assert torch.equal(torch.stack([L[0, 1, 0], L[0, 2, 0], L[0, 2, 1]]), torch.tensor([11.0, 13.0, -17.0]))
    assert L[0, 0, 1] == 0 and L[0, 0, 2] == 0 and L[0, 1, 2] == 0
    with pytest.raises(UsageError):
        head_to_gaussian(raw[:, :8], 3)


def test_gaussian_head_gradients_and_known_value():
    head = GaussianHead(7, 2)
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.tensor([0.0, 0.0, 20.0, 20.0, 0.0]))  # L ~ 20 I
    mean, L = head(torch.randn(4, 7))
    y = torch.zeros(4, 2)
    # N(0, s^2 I) at 0: log(2 pi s^2)
    s = 20.0 + 1e-5
    assert torch.allclose(gaussian_nll(y, mean, L), torch.full((4,), math.log(2 * math.pi * s * s)), rtol=1e-5)
    head2 = GaussianHead(7, 3)
    m2, L2 = head2(torch.randn(4, 7))
    gaussian_nll(torch.randn(4, 3), m2, L2).mean().backward()
    assert torch.isfinite(head2.linear.weight.grad).all() and head2.linear.weight.grad.abs().sum() > 0


def test_nll_uses_only_lowerable_ops():
    """No cholesky / triangular solve / diagonal: every aten op of head + NLL is in PopTorch 3.4's list."""
    from pathlib import Path

    from torch.utils._python_dispatch import TorchDispatchMode

    allowed_file = Path(__file__).resolve().parents[2] / "shared" / "reference" / "poptorch-3.4-aten-ops.txt"
    if not allowed_file.exists():
        pytest.skip("poptorch op list not present")
    allowed = {line.strip() for line in allowed_file.read_text().splitlines() if line.strip()}
    allowed |= {"empty", "lift_fresh", "detach", "alias", "t"}
    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func._schema.name.split("::")[-1].rstrip("_"))
            return func(*args, **(kwargs or {}))

    raw = torch.randn(8, 3 + 6)
    y = torch.randn(8, 3)
    with Record():
        mean, L = head_to_gaussian(raw, 3)
        gaussian_nll(y, mean, L).mean()
    assert seen and not (seen - allowed), sorted(seen - allowed)


def test_he_initialisation_keeps_the_signal_through_trunk_and_decoder():
    """At initialisation the spread of features across different inputs stays of order one through
    all eight trunk convolutions and the decoder (torch's default init shrank it ~1000x)."""
    from cosmolit.nn.decoder import Decoder
    from cosmolit.nn.trunk import Trunk, init_he_

    torch.manual_seed(0)
    x = torch.randn(32, 6, 64, 64)
    trunk = Trunk()
    spreads = []
    h = trunk.norm(x)
    for layer in trunk.blocks:
        h = layer(h)
        if isinstance(layer, torch.nn.Conv2d):
            spreads.append(float(h.std(0).mean()))
    assert min(spreads) > 0.3, spreads
    dec = Decoder()
    out = dec(torch.randn(32, 32))
    assert float(out.std(0).mean()) > 0.05
    # biases start at zero; a stride-2 transposed convolution uses its average fan-in C_in k^2 / 4
    assert all(float(m.bias.abs().max()) == 0 for m in trunk.blocks if isinstance(m, torch.nn.Conv2d))
    tconv = init_he_(torch.nn.ConvTranspose2d(400, 8, 3, stride=2, padding=1, output_padding=1))
    assert float(tconv.weight.std()) == pytest.approx((2 / (400 * 9 / 4)) ** 0.5, rel=0.05)
    # without it (torch's default) the same trunk loses the signal: the test can tell the difference
    plain = Trunk()
    for m in plain.blocks:
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    assert float(plain(x).std(0).mean()) < 0.1 * spreads[-1]
