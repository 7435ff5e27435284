"""The Bayesian shape network: ShapeCNN's layers with every conv / linear weight a Pyro latent variable.

As the study's TFP network (Arcelin 2021, arXiv:2106.02465): prior N(0, prior_scale) on each
weight entry, mean-field Normal posterior (loc He-normal, untransformed scale around -9),
biases / BatchNorm / PReLU slopes as point estimates, the full-covariance Gaussian likelihood
over the targets, and the KL of a minibatch divided by the training-set size.

Pyro pieces:

- `model(x, y=None)`: weights `pyro.sample("<layer>.weight", Normal(0, prior_scale))`, the
  network run with them (torch.func.functional_call); see "The declared model".
- `guide(x, y=None)`: `pyro.sample("<layer>.weight", Normal(loc, softplus(rho)))`; loc and rho
  are ordinary nn.Parameters of `self.posterior` (no global param store), trained by Adam.

Both are plain callables, so `pyro.infer.Predictive(bnn.model, guide=bnn.guide, num_samples=n)`
works on a model loaded from a checkpoint.

The training loss is a graph-safe ELBO built from effect handlers (Pyro's Trace_ELBO calls
.item(), a host synchronisation that a PopTorch graph cannot contain): the guide is traced, the
model replayed against it, the KL of the guide's weight sites to the prior taken in closed form
(`cosmolit.nn.bayes.kl_sum`), and the likelihood term from the closed-form `gaussian_nll`
(no Cholesky, no triangular solve). One loss tensor, static shapes, no .item(). Targets are
standardised, the likelihood term is `decoupled` by default and the e1, e2 response calibrated
after training, as for ShapeCNN (cosmolit.models.targets).

The declared model
    With targets y, `model` declares the likelihood the weights are trained with, in a plate over
    the batch scaled by train_size / B, so that Pyro's TraceMeanField_ELBO on (model, guide) is
    train_size x the training loss plus a constant, gradients included (tests/test_bnn.py):
    `nll`: obs ~ MultivariateNormal(mean, L L^T) of the network's outputs, its exact ELBO.
    `decoupled`: obs ~ Normal(mean, 1) per standardised target (unit variance: the spread of
    each target over the training split) for the means, and a factor "aleatoric", the Gaussian
    NLL of y under the means and trunk features held fixed, which only the covariance head's
    weights and biases see. The guide is then a generalised (Gibbs) variational posterior:
    for the trunk and the mean rows of the head, that of a Normal likelihood of fixed variance 1
    in standardised units, i.e. the posterior under the true residual variance s^2 tempered to
    temperature 1 / s^2 (wider when the network does better than the training spread); for
    the covariance rows, that of the head's NLL given the rest. Not the ELBO of one joint
    likelihood: the stop-gradients make it two losses on disjoint weights.
    Without y (Predictive): obs ~ N(mean_w, C_w), the draw's mean and aleatoric covariance as
    `predict_samples` computes them (symmetrised, calibrated), so the draws' mean and covariance
    are `estimate`'s mean and total covariance (aleatoric + epistemic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import register_kl
from torch.func import functional_call, vmap

from cosmolit.models.base import CosmolitModule, check_network_hparams
from cosmolit.nn.bayes import (MeanFieldWeights, build_shape_net, kl_sum, normal_kl_zero_mean, run_shape_net,
                               strip_weights)
from cosmolit.models.targets import (CPU_CHUNK, N_SYMMETRIES, TargetTransform, check_shape_hparams, default_calibrate,
                                     monitored_metric, shape_loss, standardised_mse, transform_images)
from cosmolit.nn.gaussian import covariance, gaussian_nll

DEFAULT_TARGETS = ("e1", "e2", "redshift")


class ZeroMeanNormal(dist.Normal):
    """Normal(0, scale), the weight prior. Its own type so that kl_divergence(Normal, ZeroMeanNormal),
    which Pyro's own TraceMeanField_ELBO takes on these sites, dispatches to the lean closed form
    `normal_kl_zero_mean` (registered below)."""

    def __init__(self, scale: torch.Tensor, validate_args=None):
        super().__init__(scale.new_zeros(()).expand(scale.shape), scale, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return ZeroMeanNormal(self.scale.expand(batch_shape))


@register_kl(dist.Normal, ZeroMeanNormal)
def _kl_normal_zero_mean_normal(p, q):
    return normal_kl_zero_mean(p.loc, p.scale, q.scale)


class DrawnNormal(dist.Normal):
    """Normal(loc, scale) whose reparameterised draw `value` (loc + scale * eps) was already made.

    The guide computes all sites' draws in one call (`BayesianShapeCNN._draw_guide`, which
    torch.compile fuses) and hands each site its value through this distribution; Pyro records
    it as an ordinary Normal site. A draw with a sample shape, or from an expanded copy (as a plate
    around the guide would make), is a fresh one. (Predictive's parallel=True mode still fails: the
    network takes one weight set per pass.)"""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, value: torch.Tensor, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        self._value = value

    def rsample(self, sample_shape=torch.Size()):
        if len(sample_shape) == 0:
            return self._value
        return super().rsample(sample_shape)

    def expand(self, batch_shape, _instance=None):
        return dist.Normal(self.loc, self.scale).expand(batch_shape)


@dataclass
class BayesianShapeCNNConfig:
    """The `model:` section of a BNN fit config (configs/bnn.yaml)."""

    targets: tuple[str, ...] = DEFAULT_TARGETS
    filters: tuple[int, ...] = (32, 64, 128, 256)
    prelu: str = "element"
    prior_scale: float = 1.0
    init_scale: float = -9.0
    lr: float = 1e-3
    lr_schedule: str = "constant"
    samples: int = 100
    loss: str = "decoupled"
    calibrate: Optional[tuple[str, ...]] = None  # None: e1, e2 when among the targets
    symmetrise: bool = True  # the model's own default stays False (checkpoints without the key)

    def __post_init__(self):
        if self.calibrate is None:
            self.calibrate = tuple(default_calibrate(self.targets))
        _check_hparams(self.targets, self.filters, self.prelu, self.prior_scale, self.lr, self.samples,
                       loss=self.loss, calibrate=self.calibrate, lr_schedule=self.lr_schedule)


def _check_hparams(targets, filters, prelu, prior_scale, lr, samples, train_size=1, loss="decoupled",
                   calibrate=(), lr_schedule="constant") -> None:
    check_network_hparams(filters, prelu, lr, targets, lr_schedule)
    check_shape_hparams(targets, loss, calibrate)
    if loss == "mse":
        raise ValueError("loss mse is for the cnn; the BNN's likelihood term is decoupled or nll")
    if not prior_scale > 0:
        raise ValueError(f"prior_scale must be > 0, got {prior_scale}")
    if int(samples) <= 0:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    if int(train_size) <= 0:
        raise ValueError(f"train_size must be a positive integer, got {train_size}")


class BayesianShapeCNN(CosmolitModule):
    """Pyro BNN estimating (e1, e2, redshift) with aleatoric and epistemic covariances.

    Input x: raw electrons (B, C, H, W), normalised inside. `forward(x)` draws one weight set and
    returns (mean (B, T), scale_tril (B, T, T)); `predict_samples(x, samples)` the moments over
    many draws.
    """

    def __init__(
        self,
        targets: Sequence[str] = DEFAULT_TARGETS,
        filters: Sequence[int] = (32, 64, 128, 256),
        prelu: str = "element",
        prior_scale: float = 1.0,
        init_scale: float = -9.0,
        lr: float = 1e-3,
        lr_schedule: str = "constant",
        samples: int = 100,
        train_size: int = 8000,
        seed: int = 0,
        loss: str = "decoupled",
        calibrate: Optional[Sequence[str]] = None,
        target_stats: Optional[Sequence] = None,
        symmetrise: bool = False,
        bands: str = "ugrizy",
        stamp: int = 64,
        normalisation: Optional[Sequence] = None,
        provenance: Optional[dict] = None,
    ):
        targets = [str(t) for t in targets]
        calibrate = default_calibrate(targets) if calibrate is None else [str(t) for t in calibrate]
        try:
            _check_hparams(targets, filters, prelu, prior_scale, lr, samples, train_size, loss, calibrate, lr_schedule)
        except ValueError as exc:
            from cosmolit.errors import UsageError

            raise UsageError(str(exc)) from None
        super().__init__(bands=bands, stamp=stamp, normalisation=normalisation, provenance=provenance)
        self.save_hyperparameters()
        self.n_targets = len(targets)
        self.prior_scale = float(prior_scale)
        self.train_size = int(train_size)
        # Deterministic layers (biases, BatchNorm, PReLU) stay parameters of `net`; its conv /
        # linear weights are removed and supplied per call from posterior or prior draws.
        self.net = build_shape_net(len(bands), int(stamp), tuple(filters), prelu, self.n_targets)
        sites = strip_weights(self.net)
        gen = torch.Generator().manual_seed(int(seed))
        self.posterior = MeanFieldWeights(sites, float(init_scale), generator=gen)
        self.site_names = [f"{name}.weight" for name, _ in sites]  # Pyro site = functional_call key
        self._site_shapes = [tuple(shape) for _, shape in sites]
        self._priors = None  # cached prior distributions, per (device, dtype)
        self.target_transform = TargetTransform(targets, target_stats, calibrate, symmetrise)

    # the network under one weight draw, the guide's draw and the KL; Pyro's tracing stays eager
    compiled_methods = ("_run_net", "_draw_guide", "_kl")

    # ---------------------------------------------------------------- Pyro model and guide
    def _prior_dists(self, like: torch.Tensor) -> list:
        """The N(0, prior_scale) prior of each weight site, cached per device and dtype."""
        key = (like.device, like.dtype)
        if self._priors is None or self._priors[0] != key:
            base = ZeroMeanNormal(torch.full((), self.prior_scale, device=like.device, dtype=like.dtype))
            self._priors = (key, [base.expand(shape).to_event(len(shape)) for shape in self._site_shapes])
        return self._priors[1]

    def _run_net(self, x: torch.Tensor, weights: dict, fixed_features: bool = False):
        """Standardised outputs for raw images x and one weight set (cosmolit.nn.bayes.run_shape_net)."""
        return run_shape_net(self.net, weights, self.normalise(x), fixed_features)

    def _draw_guide(self, eps: list) -> tuple[list, list]:
        """(scales, weights) of one posterior draw for the noise eps (cosmolit.nn.bayes.MeanFieldWeights.draw)."""
        return self.posterior.draw(eps)

    def _kl(self, locs: list, scales: list) -> torch.Tensor:
        """Summed closed-form KL of the guide's Normal(loc, scale) sites to the N(0, prior_scale) prior."""
        return kl_sum(locs, scales, self.prior_scale)

    def model(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        """Pyro model (module docstring, "The declared model"): weights from the N(0, prior_scale) prior.

        With targets y (B, T): the likelihood the weights are trained with, in a plate over the batch
        scaled by train_size / B (uncalibrated, single view, as in training); returns the network's
        standardised outputs (mean, scale_tril, scale_tril from fixed features or None) for the loss.
        Without y: `obs` (B, T) drawn from N(mean, cov) of the draw's (symmetrised, calibrated) mean and
        aleatoric covariance, whose moments over draws are those of `estimate`; returns (mean, cov).
        """
        priors = self._prior_dists(self.posterior.loc[0])
        weights = {name: pyro.sample(name, prior) for name, prior in zip(self.site_names, priors)}
        if y is None:
            mean, cov = self._predictive_moments(x, weights)
            with pyro.plate("data", x.shape[0]):
                # cholesky_ex: no error for the prior's absurd draws (Predictive runs the model alone once)
                tril = torch.linalg.cholesky_ex(cov)[0]
                pyro.sample("obs", dist.MultivariateNormal(mean, scale_tril=tril, validate_args=False))
            return mean, cov
        decoupled = self.hparams.loss == "decoupled"
        outputs = self._run_net(x, weights, fixed_features=decoupled)
        mean, scale_tril, fixed = outputs  # standardised: (B, T), (B, T, T), (B, T, T) | None
        tt = self.target_transform
        with poutine.scale(scale=self.train_size / x.shape[0]), pyro.plate("data", x.shape[0]):
            if decoupled:  # the means: unit variance in standardised units; the covariance head apart
                scale = tt.scale.to(mean.dtype)
                pyro.sample("obs", dist.Normal(mean * scale + tt.offset.to(mean.dtype), scale).to_event(1), obs=y)
                pyro.factor("aleatoric", -gaussian_nll(tt.standardise(y), mean.detach(), fixed))
            else:
                mean, scale_tril = tt.to_physical(mean, scale_tril, calibrated=False)
                pyro.sample("obs", dist.MultivariateNormal(mean, scale_tril=scale_tril), obs=y)
        return outputs

    def _draw_moments(self, xn: torch.Tensor, weights: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One weight set's physical, uncalibrated (mean (B, T), aleatoric cov (B, T, T)) for normalised
        images xn, averaged over the 8 grid symmetries with `symmetrise`, BatchNorm in eval mode."""
        tt = self.target_transform
        n_sym = N_SYMMETRIES if self.hparams.get("symmetrise", False) else 1
        was_training = self.net.training
        self.net.eval()
        try:
            mean, cov = 0.0, 0.0
            for g in range(n_sym):
                m, tril = tt.to_physical(*functional_call(self.net, weights, (transform_images(xn, g),)),
                                         calibrated=False)
                sign = tt.symmetry_signs(g).to(m.dtype)  # (T,)
                mean = mean + m * sign / n_sym
                cov = cov + covariance(tril) * sign.unsqueeze(-1) * sign / n_sym
        finally:
            self.net.train(was_training)
        return mean, cov

    def _predictive_moments(self, x: torch.Tensor, weights: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated (mean (B, T), cov (B, T, T)) of `obs` under one weight set, for raw images x.

        `estimate` calibrates the moments over draws: mean -> (mean - c) / (1 + m), the aleatoric and
        epistemic covariances -> D C D with D = diag(sigma_scale / (1 + m)). Per draw this is: the
        draw's mean m_w -> (centre - c) / (1 + m) + D (m_w - centre), its covariance -> D C_w D. With
        sigma_scale 1 the centre drops out (it is m_w); otherwise it is the mean of the posterior-mean
        network (weights = loc, one more pass), which differs from the draws' average by a term of
        second order in the weights' spread, so the covariance is exact and the mean nearly so.
        """
        tt = self.target_transform
        xn = self.normalise(x)
        mean, cov = self._draw_moments(xn, weights)
        slope, intercept = tt.response[:, 0].to(mean.dtype), tt.response[:, 1].to(mean.dtype)
        d = tt.sigma_scale.to(mean.dtype) / slope  # (T,)
        centre = mean
        if bool((tt.sigma_scale != 1).any()):
            with torch.no_grad():
                centre = self._draw_moments(xn, self.posterior.as_dict([w.detach() for w in self.posterior.loc]))[0]
        return (centre - intercept) / slope + d * (mean - centre), cov * d.unsqueeze(-1) * d

    def guide(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        """Pyro guide: mean-field Normal(loc, softplus(rho)) on every weight entry."""
        scales, weights = self._draw_guide(self.posterior.noise())
        for name, loc, scale, w in zip(self.site_names, self.posterior.loc, scales, weights):
            pyro.sample(name, DrawnNormal(loc, scale, w).to_event(loc.dim()))

    def elbo_terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Graph-safe negative ELBO per sample: {'loss', 'nll', 'kl', 'mse'}; loss = mean likelihood term
        (standardised units, `loss` hyper-parameter) + KL / train_size, the declared model's
        (TraceMeanField_ELBO / train_size, less a constant); mse = squared error of the draw's
        standardised means (no gradient)."""
        with pyro.validation_enabled(False):
            guide_trace = poutine.trace(self.guide).get_trace(x, y)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(x, y)
        # Each weight site's prior is N(0, prior_scale) expanded to the weight's shape; the KL is
        # the closed form against the scalar prior (same value, but broadcasting a 0-dim scale is
        # several times cheaper than reading a zero-stride expanded one), summed over entries.
        sites = [guide_trace.nodes[name]["fn"].base_dist for name in self.site_names]
        kl = self._kl([d.loc for d in sites], [d.scale for d in sites])  # ()
        mean, scale_tril, fixed = model_trace.nodes["_RETURN"]["value"]  # (B, T), (B, T, T), (B, T, T) | None
        y = self.target_transform.standardise(y)
        nll = shape_loss(self.hparams.loss, y, mean, scale_tril, fixed).mean()
        return {"loss": nll + kl / self.train_size, "nll": nll, "kl": kl, "mse": standardised_mse(y, mean)}

    # ---------------------------------------------------------------- Lightning
    @property
    def monitor(self) -> str:
        return monitored_metric(self.hparams.loss)

    def forward(self, x: torch.Tensor, calibrated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One posterior weight draw: (mean (B, T), scale_tril (B, T, T)) in the targets' units."""
        mean, scale_tril, _ = self._run_net(x, self.posterior.as_dict(self.posterior.rsample()))
        return self.target_transform.to_physical(mean, scale_tril, calibrated)

    def estimate(self, x: torch.Tensor, calibrated: bool = True, samples: Optional[int] = None,
                 seed: Optional[int] = None) -> dict:
        """Predictions for raw images x over `samples` draws (seeded when `seed` is given): {'mean',
        'cov' (total), 'aleatoric_cov', 'epistemic_cov'}."""
        res = self.predict_samples(x, samples=samples, seed=seed, calibrated=calibrated)
        return {"mean": res["mean"], "cov": res["total_cov"], "aleatoric_cov": res["aleatoric_cov"],
                "epistemic_cov": res["epistemic_cov"]}

    def batch_terms(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch  # (B, C, H, W), (B, T)
        return self.elbo_terms(x, y)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.predict_samples(x, samples=int(self.hparams.samples))

    # ---------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict_samples(self, x: torch.Tensor, samples: Optional[int] = None, seed: Optional[int] = None,
                        vectorise: Optional[bool] = None, max_pairs: int = 1024,
                        max_draws: int = 32, calibrated: bool = True) -> dict[str, torch.Tensor]:
        """Moments over `samples` posterior weight draws for raw images x (B, C, H, W).

        Returns mean (B, T), aleatoric_cov (B, T, T) = mean of the draws' L L^T, epistemic_cov
        (B, T, T) = covariance of the draws' means (divisor S - 1), total_cov = their sum.

        vectorise=True runs the draws through torch.func.vmap (grouped convolutions), in chunks of
        at most `max_pairs` (draw, image) pairs and `max_draws` weight sets (one draw of the default
        network is 1.2 M weights, 4.8 MB); False runs one pass per draw. None (default): vmap on
        GPUs, one pass per draw on CPUs, where grouped convolutions are slower than plain ones and
        drawing the weights (1.2 M normals per draw) costs about as much as a pass at small batch.
        `seed` makes the draws reproducible; the draws do not depend on `vectorise` or the chunking.
        Outputs are in the targets' units, calibrated (response and uncertainty) unless `calibrated` is False.
        With the `symmetrise` hyper-parameter every draw predicts the stamp under the 8 grid
        symmetries, turns the answers back and averages them (cosmolit.models.targets,
        "Symmetrised prediction"): 8 times the work, the epistemic spread is that of the
        symmetrised network's weights.
        BatchNorm uses its running statistics (eval mode) whatever the module's mode.
        """
        samples = int(self.hparams.samples if samples is None else samples)
        if samples <= 0:
            from cosmolit.errors import UsageError

            raise UsageError(f"samples must be a positive integer, got {samples}")
        if vectorise is None:
            vectorise = x.device.type == "cuda"
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.posterior.loc[0].device).manual_seed(int(seed))
        xn = self.normalise(x)  # (B, C, H, W)
        tt, batch = self.target_transform, x.shape[0]
        n_sym = N_SYMMETRIES if self.hparams.get("symmetrise", False) else 1
        if n_sym > 1:  # every draw sees the 8 views of each stamp, stacked along the batch
            xn = torch.cat([transform_images(xn, g) for g in range(n_sym)])  # (8 B, C, H, W)
        sign = torch.stack([tt.symmetry_signs(g) for g in range(n_sym)]).to(xn.dtype)  # (n_sym, T)
        sign = sign.view(1, n_sym, 1, -1)  # (1, n_sym, 1, T)
        chunk = max(1, min(samples, max_draws, max_pairs // max(1, n_sym * batch))) if vectorise else 1
        was_training = self.net.training
        self.net.eval()
        try:
            means, covs = [], []
            done = 0
            while done < samples:
                s = min(chunk, samples - done)
                draws = self.posterior.as_dict(self.posterior.rsample(samples=s, generator=gen, detach=True))
                if vectorise:
                    mean, scale_tril = vmap(lambda w: functional_call(self.net, w, (xn,)))(draws)  # (s, n_sym B, T), (.., T, T)
                else:  # one draw; on CPU its pass goes CPU_CHUNK images at a time (cache), same values
                    weights = {k: w[0] for k, w in draws.items()}
                    step = CPU_CHUNK if xn.device.type == "cpu" else len(xn)
                    parts = [functional_call(self.net, weights, (xn[i:i + step],)) for i in range(0, len(xn), step)]
                    mean = torch.cat([p[0] for p in parts]).unsqueeze(0)  # (1, n_sym B, T)
                    scale_tril = torch.cat([p[1] for p in parts]).unsqueeze(0)  # (1, n_sym B, T, T)
                mean, scale_tril = tt.to_physical(mean, scale_tril, calibrated=False)
                mean = mean.view(s, n_sym, batch, -1) * sign  # (s, n_sym, B, T), turned back
                cov = covariance(scale_tril).view(s, n_sym, batch, *scale_tril.shape[-2:])
                cov = cov * sign.unsqueeze(-1) * sign.unsqueeze(-2)  # (s, n_sym, B, T, T)
                means.append(mean.mean(1))  # (s, B, T): each draw's (symmetrised) estimate
                covs.append(cov.mean(1))  # (s, B, T, T)
                done += s
        finally:
            self.net.train(was_training)
        means = torch.cat(means)  # (S, B, T)
        aleatoric = torch.cat(covs).mean(0)  # (B, T, T)
        mean = means.mean(0)  # (B, T)
        dev = means - mean  # (S, B, T)
        epistemic = torch.einsum("sbi,sbj->bij", dev, dev) / max(samples - 1, 1)
        if calibrated:
            mean, aleatoric, epistemic = tt.calibrate_moments(mean, aleatoric, epistemic)
        return {"mean": mean, "aleatoric_cov": aleatoric, "epistemic_cov": epistemic,
                "total_cov": aleatoric + epistemic}
