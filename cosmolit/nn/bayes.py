"""Mean-field Gaussian weights for Bayesian networks, in plain torch.

The building blocks shared by the Pyro BNN (cosmolit.models.bnn) and a hand-written
reparameterised reference BNN with the same layers (`TorchBayesianShapeNet`, used by the
benchmarks to measure what Pyro's bookkeeping costs).

Conventions, as the study's TensorFlow-Probability layers (Convolution2DReparameterization,
DenseReparameterization; Arcelin 2021, arXiv:2106.02465):

- every convolution and linear WEIGHT is a random variable; biases, BatchNorm and PReLU slopes
  are point estimates;
- posterior q(w) = Normal(loc, softplus(rho)) per weight entry, loc He-normal initialised,
  rho initialised at `init_scale` (-9 by default: a standard deviation of about 1.2e-4, so the
  network starts almost deterministic);
- prior p(w) = Normal(0, prior_scale) per entry.

A network is made Bayesian by *stripping* its weights: `strip_weights(net)` removes the
`weight` parameter of each nn.Conv2d / nn.Linear and returns the sites; the forward pass then
supplies the weights with `torch.func.functional_call(net, {"<site>.weight": w, ...}, (x,))`.
With a leading sample dimension on every weight, `torch.func.vmap` runs S weight draws in one
pass (convolutions become grouped convolutions inside vmap).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cosmolit.nn.trunk import he_normal_

BAYES_LAYERS = (nn.Conv2d, nn.Linear)


def strip_weights(net: nn.Module) -> list[tuple[str, torch.Size]]:
    """Remove the `weight` parameter of every conv / linear layer of `net` (in place).

    Returns [(site name, weight shape)] in module order; the site name is the module's
    dotted path (e.g. "trunk.blocks.0.conv1"), the functional_call key is name + ".weight".
    """
    sites = []
    for name, module in net.named_modules():
        if isinstance(module, BAYES_LAYERS) and isinstance(module._parameters.get("weight"), nn.Parameter):
            sites.append((name, module.weight.shape))
            del module.weight  # the forward pass supplies it through functional_call
    return sites


def normal_kl_zero_mean(loc: torch.Tensor, scale: torch.Tensor, prior_scale) -> torch.Tensor:
    """Elementwise KL(N(loc, scale) || N(0, prior_scale)) = (s^2 + m^2) / (2 p^2) - log s + log p - 1/2.

    prior_scale: a float or a tensor broadcastable to loc. Six elementwise passes forward (torch's
    generic Normal/Normal KL takes ten), which matters: the KL runs over all 1.2 M weights.
    """
    if isinstance(prior_scale, torch.Tensor):
        c, const = 0.5 / (prior_scale * prior_scale), torch.log(prior_scale) - 0.5
    else:
        c, const = 0.5 / float(prior_scale) ** 2, math.log(float(prior_scale)) - 0.5
    return torch.addcmul(loc * loc, scale, scale) * c - torch.log(scale) + const


def kl_sum(locs: list[torch.Tensor], scales: list[torch.Tensor], prior_scale) -> torch.Tensor:
    """sum over sites and entries of KL(N(loc, scale) || N(0, prior_scale)), a 0-dim tensor."""
    total = locs[0].new_zeros(())
    for loc, scale in zip(locs, scales):
        total = total + normal_kl_zero_mean(loc, scale, prior_scale).sum()
    return total


class MeanFieldWeights(nn.Module):
    """loc and untransformed scale (rho) per weight entry of each site: 2 x (number of weights) parameters.

    Parameters are ordinary nn.Parameters (`loc.<i>`, `rho.<i>`), so Lightning checkpoints hold
    them and a torch optimizer trains them.
    """

    def __init__(self, sites: list[tuple[str, torch.Size]], init_scale: float = -9.0,
                 init_scale_std: float = 0.1, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.names = [name for name, _ in sites]
        self.loc = nn.ParameterList()
        self.rho = nn.ParameterList()
        for _, shape in sites:
            loc = he_normal_(torch.empty(shape), generator)
            rho = torch.empty(shape).normal_(init_scale, init_scale_std, generator=generator)
            self.loc.append(nn.Parameter(loc))
            self.rho.append(nn.Parameter(rho))

    def scales(self) -> list[torch.Tensor]:
        return [F.softplus(r) for r in self.rho]

    def rsample(self, samples: Optional[int] = None, generator: Optional[torch.Generator] = None,
                detach: bool = False) -> list[torch.Tensor]:
        """One reparameterised draw per site, or `samples` draws stacked on a leading dim (S, *shape).

        Noise is drawn draw by draw, site by site, so a seeded generator gives the same weight
        sets however the draws are grouped. (Training draws one set with `draw(noise())`.)
        """
        locs, scales = list(self.loc), self.scales()
        if detach:
            locs, scales = [t.detach() for t in locs], [t.detach() for t in scales]
        draws = 1 if samples is None else int(samples)
        eps = [[self._noise(loc, generator) for loc in locs] for _ in range(draws)]  # [draw][site]
        out = []
        for i, (loc, scale) in enumerate(zip(locs, scales)):
            e = eps[0][i] if samples is None else torch.stack([eps[d][i] for d in range(draws)])
            out.append(loc + scale * e)  # (*shape) or (S, *shape)
        return out

    @staticmethod
    def _noise(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        if generator is None:
            return torch.randn(like.shape, dtype=like.dtype, device=like.device)
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)

    def noise(self) -> list[torch.Tensor]:
        """One standard-normal tensor per site, drawn site by site as torch.distributions.Normal.rsample
        draws them (same generator calls, so the same numbers for the same seed)."""
        return [loc.new_empty(loc.shape).normal_() for loc in self.loc]

    def draw(self, eps: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(scales, weights) for the noise `eps` (from `noise()`): softplus(rho) and loc + scale * eps per
        site. A pure tensor function, so torch.compile can fuse it, forward and backward, into one
        pass over the weights instead of three."""
        scales = self.scales()
        return scales, [loc + scale * e for loc, scale, e in zip(self.loc, scales, eps)]

    def kl(self, prior_scale: float = 1.0, scales: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Closed-form KL(q || N(0, prior_scale)) summed over every weight entry (a 0-dim tensor)."""
        return kl_sum(list(self.loc), self.scales() if scales is None else scales, prior_scale)

    def as_dict(self, weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """functional_call mapping {"<site>.weight": tensor}."""
        return {f"{name}.weight": w for name, w in zip(self.names, weights)}


def build_shape_net(in_channels: int, stamp: int, filters=(32, 64, 128, 256), prelu: str = "element",
                    targets: int = 3) -> nn.Module:
    """The shape network, deterministic: Trunk -> GaussianHead, x (B, C, H, W) -> (mean (B, T), scale_tril (B, T, T)).

    The layers of ShapeCNN; normalised images in.
    """
    from cosmolit.nn.gaussian import GaussianHead
    from cosmolit.nn.trunk import Trunk

    trunk = Trunk(in_channels=in_channels, stamp=stamp, filters=tuple(filters), prelu=prelu)
    return nn.Sequential(trunk, GaussianHead(trunk.out_features, targets))


def run_shape_net(net: nn.Module, weights: dict, x: torch.Tensor, fixed_features: bool = False):
    """Run `build_shape_net`'s network with the weight tensors `weights` ({"<site>.weight": w}).

    x: normalised images (B, C, H, W). Returns (mean (B, T), scale_tril (B, T, T), and with
    fixed_features the scale_tril the head computes from detached trunk features, else None), in
    the network's (standardised) units.
    """
    trunk, head = net[0], net[1]
    trunk_w = {k[2:]: w for k, w in weights.items() if k.startswith("0.")}
    head_w = {k[2:]: w for k, w in weights.items() if k.startswith("1.")}
    h = torch.func.functional_call(trunk, trunk_w, (x,))  # (B, F)
    mean, scale_tril = torch.func.functional_call(head, head_w, (h,))  # (B, T), (B, T, T)
    fixed = torch.func.functional_call(head, head_w, (h.detach(),))[1] if fixed_features else None
    return mean, scale_tril, fixed


class TorchBayesianShapeNet(nn.Module):
    """Reference BNN without Pyro: the same layers, priors, guide and loss as BayesianShapeCNN.

    `loss(x, y)` = mean likelihood term (cosmolit.nn.gaussian.shape_loss, `loss` decoupled or
    nll) + KL / train_size with one reparameterised weight draw, written directly in torch. x is the
    network input (already normalised), (B, C, H, W); y the targets as the network sees them.
    """

    def __init__(self, in_channels: int = 6, stamp: int = 64, filters=(32, 64, 128, 256),
                 prelu: str = "element", targets: int = 3, prior_scale: float = 1.0,
                 init_scale: float = -9.0, train_size: int = 8000, seed: int = 0, loss: str = "decoupled"):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.targets = targets
        self.prior_scale = float(prior_scale)
        self.train_size = int(train_size)
        self.loss_kind = str(loss)
        self.net = build_shape_net(in_channels, stamp, filters, prelu, targets)
        self.weights = MeanFieldWeights(strip_weights(self.net), init_scale, generator=gen)

    def forward(self, x: torch.Tensor):
        """(mean (B, T), scale_tril (B, T, T)) with one fresh weight draw."""
        return run_shape_net(self.net, self.weights.as_dict(self.weights.rsample()), x)[:2]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean likelihood term + KL / train_size with one weight draw (softplus computed once)."""
        from cosmolit.nn.gaussian import shape_loss

        scales, weights = self.weights.draw(self.weights.noise())
        mean, scale_tril, fixed = run_shape_net(self.net, self.weights.as_dict(weights), x,
                                                fixed_features=self.loss_kind == "decoupled")
        kl = self.weights.kl(self.prior_scale, scales=scales)
        return shape_loss(self.loss_kind, y, mean, scale_tril, fixed).mean() + kl / self.train_size
