"""The latent normalizing flow (cosmolit.models.flow.LatentFlow)."""

import math

import pytest
import torch

from cosmolit.errors import UsageError
from cosmolit.models.flow import LatentFlow


def _perturbed(dim=6, layers=3, hidden=(16, 16), seed=0, scale=0.2):
    torch.manual_seed(seed)
    flow = LatentFlow(dim, layers, hidden)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-trivial bijection (fresh Pyro MADEs are close to the identity)
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return flow


def test_parameter_count_matches_the_study():
    # TF MaskedAutoregressiveFlow, 8 layers, MADE [256, 256], 32-d: 725,504 trainable parameters.
    flow = LatentFlow(32, 8, (256, 256))
    assert sum(p.numel() for p in flow.parameters()) == 725_504
    assert len(flow.layers) == 8


def test_fast_inverse_equals_pyro_inverse_and_roundtrips():
    flow = _perturbed(dim=8, layers=3)
    u = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    z = flow.from_base(u)
    with torch.no_grad():
        ref = u
        for k in range(len(flow.layers) - 1, -1, -1):
            ref = flow.layers[k]._inverse(ref)  # Pyro's own sequential inverse
            if k > 0:
                ref = torch.flip(ref, dims=[-1])
        back, _ = flow.to_base(z)
    assert torch.allclose(z, ref, atol=1e-5)
    assert torch.allclose(back, u, atol=1e-4)


def test_log_prob_is_a_normalised_density():
    # 2-D: integrate exp(log_prob) on a grid; a density integrates to 1.
    flow = _perturbed(dim=2, layers=2, hidden=(8,), scale=0.3)
    lin = torch.linspace(-12, 12, 601)
    xx, yy = torch.meshgrid(lin, lin, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    with torch.no_grad():
        dens = flow.log_prob(pts).exp()
    cell = float(lin[1] - lin[0]) ** 2
    assert abs(float(dens.sum()) * cell - 1.0) < 0.02


def test_log_prob_of_samples_is_finite_and_matches_change_of_variables():
    flow = _perturbed(dim=5, layers=2)
    g = torch.Generator().manual_seed(4)
    u = torch.randn(32, 5, generator=g)
    z = flow.from_base(u)
    with torch.no_grad():
        lp = flow.log_prob(z)
        _, logdet = flow.to_base(z)
    assert torch.isfinite(lp).all()
    base = -0.5 * (u.pow(2).sum(-1) + 5 * math.log(2 * math.pi))
    assert torch.allclose(lp, base + logdet, atol=1e-3)


def test_sample_is_deterministic_with_a_seeded_generator():
    flow = _perturbed(dim=4, layers=2)
    a = flow.sample(10, generator=torch.Generator().manual_seed(7))
    b = flow.sample(10, generator=torch.Generator().manual_seed(7))
    c = flow.sample(10, generator=torch.Generator().manual_seed(8))
    assert a.shape == (10, 4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_fit_learns_a_gaussian_mixture():
    g = torch.Generator().manual_seed(0)
    n = 800
    comp = torch.randint(0, 2, (n,), generator=g)
    centres = torch.tensor([[-2.0, 1.0], [2.0, -1.0]])
    data = centres[comp] + 0.4 * torch.randn(n, 2, generator=g)  # (n, 2)
    torch.manual_seed(0)
    flow = LatentFlow(2, 3, (24, 24))
    with torch.no_grad():
        before = float(flow.log_prob(data).mean())
    hist = flow.fit(data, epochs=25, batch_size=100, lr=5e-3, seed=1, progress=False)
    with torch.no_grad():
        after = float(flow.log_prob(data).mean())
    assert len(hist["nll"]) == 25 and hist["nll"][-1] < hist["nll"][0]
    assert after > before + 1.0
    s = flow.sample(3000, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(s.mean(0), data.mean(0), atol=0.25)
    cov_s, cov_d = torch.cov(s.T), torch.cov(data.T)
    assert torch.allclose(cov_s, cov_d, atol=0.5)
    # bimodal: samples fall near both centres
    near = torch.cdist(s, centres).argmin(1)
    assert 0.3 < float(near.float().mean()) < 0.7


def test_fit_is_reproducible_for_a_seed():
    data = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        f = LatentFlow(3, 2, (8,))
        f.fit(data, epochs=3, batch_size=50, seed=5, progress=False)
        out.append(torch.cat([p.detach().reshape(-1) for p in f.parameters()]))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("bad", [torch.zeros(10, 3), torch.zeros(1, 2), torch.full((4, 2), float("nan"))])
def test_fit_refuses_bad_latents(bad):
    flow = LatentFlow(2, 1, (4,))
    with pytest.raises(UsageError):
        flow.fit(bad, epochs=1, progress=False)


def test_constructor_refuses_bad_sizes():
    with pytest.raises(UsageError):
        LatentFlow(1)
    with pytest.raises(UsageError):
        LatentFlow(4, layers=0)
    with pytest.raises(UsageError):
        LatentFlow(4, hidden=())
