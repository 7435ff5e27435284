"""What the two shape networks (ShapeCNN, BayesianShapeCNN) share about their targets and loss.

Target standardisation
    The networks predict standardised targets (y - offset) / scale, with offset and scale the
    mean and standard deviation of each truth column over the training split
    (GalaxyDataModule.target_stats), so that e1, e2 (spread ~0.26) and redshift (~0.5) weigh
    alike in the loss. `TargetTransform.to_physical` maps the Gaussian back: mean * scale +
    offset, diag(scale) L. The statistics are hyper-parameters, so checkpoints carry them.

Losses (`loss` hyper-parameter)
    nll        the study's: exact negative log-likelihood of the full-covariance Gaussian.
    decoupled  (default) the means by squared error (0.5 |y - mean|^2 in standardised units),
               the covariance by the Gaussian NLL of those means held fixed, computed on trunk
               features held fixed (`detach`). Measured on 4,000 isolated LSST-like stamps: with
               the exact NLL the network did not learn e1, e2 (slope of prediction on truth 0.00
               after two epochs, NaN losses in the third; the covariance head's large early
               gradients reach the shared trunk), while decoupled reached slopes 0.59 / 0.55 and
               68 % coverage 0.73 / 0.76 in four epochs (plain squared error: 0.72 / 0.65).
    mse        the means only (the study's timing runs); the covariance head is not trained.

Response calibration
    A regression of a noisy quantity is shrunk towards the population mean: e_pred = (1 + m)
    e_true + c with m < 0. `calibrate` names the targets (default e1, e2) whose linear response
    is measured on the validation split at the end of `cosmolit fit` (a least-squares line of
    prediction on truth) and removed from every later prediction: mean -> (mean - c) / (1 + m),
    covariance rows and columns divided by (1 + m). The response is a persistent buffer, saved in
    the checkpoint; the training loss never sees it. A slope below MIN_RESPONSE leaves the target
    uncalibrated (the network has not learned it); one outside PLAUSIBLE_RESPONSE is removed but
    warned about in one line naming the factor 1 / slope it multiplies the predictions by.

Uncertainty calibration
    Right after the response, one scale factor s_k per target is fitted on the same validation
    predictions (response removed): the s_k that brings the observed coverage of the central
    intervals mean +- z_q s_k sigma_k closest to q, in least squares over q = 0.05, 0.10, ..., 0.95
    weighted by 1 / (q (1 - q)), the inverse binomial variance of an observed coverage (a
    one-parameter version of the recalibration of Kuleshov et al. 2018, arXiv:1807.00263). Equal
    weights let the many central levels outvote the tails: the BNN of session 5 then covered
    0.652 at 68 % but only 0.910 at 95 % on isolated test galaxies (recalibrated with the weights
    on 2,000 other stamps: 0.662 and 0.912, the factor on sigma up 1 %; the 95 % shortfall is the
    shape of the pull distribution's tails, which one factor cannot fix).
    Predicted covariances become D C D with D = diag(s); for the BNN the aleatoric and epistemic
    parts are scaled alike. Needed because the covariance head, trained on the training split,
    is over-confident or under-confident on new galaxies (the isolated CNN of session 2 had 68 %
    coverage 0.84, the BNN 0.78). Stored as the persistent buffer `sigma_scale` (T,).

Symmetrised prediction (`symmetrise` hyper-parameter)
    The sky has no preferred direction and cosmolit's stamps none either (round PSFs, square
    pixels), so an estimate of e1, e2 should turn with the galaxy. A network learns this only
    approximately; with `symmetrise` the model predicts each stamp under the eight symmetries of
    the pixel grid (cosmolit.data's augmentation group), turns each answer back (e1 changes sign
    under a transpose, e2 under one flip) and averages: the estimate is then exactly
    equivariant, and an additive bias c cannot come from the network preferring a direction.
    The CNN runs 8 passes; so does every weight draw of the BNN, whose epistemic covariance is
    then the spread of the symmetrised network over its weights. (Giving draw s only symmetry
    s mod 8, at no extra cost, was tried: the disagreement between symmetries then joins the
    epistemic spread of isolated galaxies too, and the epistemic AUROC for blends fell from
    0.81 to 0.69 on 500 mixed stamps.) Moments are averaged in physical units before
    the calibration, which is then applied to the averaged moments; the response of e1, e2 is
    then fitted through the origin (slope only): such an estimate has no intercept in
    expectation, and fitting one adds the validation split's noise (about 0.003 for 2,000
    galaxies) to c.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from cosmolit.errors import UsageError
from cosmolit.nn.gaussian import shape_loss  # noqa: F401 (re-exported: cosmolit.models.targets.shape_loss)

SHAPE_LOSSES = ("decoupled", "nll", "mse")
DEFAULT_CALIBRATE = ("e1", "e2")
MIN_RESPONSE = 0.05  # below this slope a target is left uncalibrated: the network has not learned it
# a calibrated response outside this band is applied but warned about: removing it multiplies the
# predictions by 1 / slope, more than 2 below 0.5 (a network that has barely learned the target)
PLAUSIBLE_RESPONSE = (0.5, 2.0)
# images a shape network predicts in one pass on CPU without autograd: the activations of 16 stamps
# stay in cache; 64 stamps at once took 1.5x longer per stamp (isolated CNN, 8 symmetries, one thread)
CPU_CHUNK = 16
COVERAGE_LEVELS = np.round(np.arange(0.05, 1.0, 0.05), 2)  # levels matched by the uncertainty calibration
# each level weighted by the inverse binomial variance of an observed coverage, 1 / (q (1 - q)):
# the 95 % level counts 5x the 50 % one, as its coverage is measured that much more precisely
COVERAGE_WEIGHTS = 1.0 / (COVERAGE_LEVELS * (1.0 - COVERAGE_LEVELS))
SIGMA_SCALE_GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 1201))  # candidate scale factors


def check_shape_hparams(targets: Sequence[str], loss: str, calibrate: Sequence[str]) -> None:
    """ValueError for a loss or a calibration list that do not fit the targets."""
    if loss not in SHAPE_LOSSES:
        raise ValueError(f"loss {loss!r} is not allowed; choose one of {', '.join(SHAPE_LOSSES)}")
    unknown = [t for t in calibrate if t not in targets]
    if unknown:
        raise ValueError(f"calibrate names {unknown}, which are not among the targets {list(targets)}")


def default_calibrate(targets: Sequence[str]) -> list[str]:
    """The targets calibrated by default: e1 and e2 when predicted."""
    return [t for t in DEFAULT_CALIBRATE if t in targets]


def check_target_stats(stats: Optional[Sequence], n_targets: int) -> tuple[list[float], list[float]]:
    """[[offset, scale], ...] per target -> (offsets, scales); identity when None."""
    if stats is None:
        return [0.0] * n_targets, [1.0] * n_targets
    try:
        pairs = [(float(o), float(s)) for o, s in stats]
    except (TypeError, ValueError):
        raise UsageError(f"target_stats must be a list of [offset, scale] pairs, got {stats!r}") from None
    if len(pairs) != n_targets:
        raise UsageError(f"target_stats has {len(pairs)} pairs for {n_targets} targets; give one per target")
    if not all(np.isfinite(o) and np.isfinite(s) and s > 0 for o, s in pairs):
        raise UsageError(f"target_stats must be finite with positive scales, got {pairs}")
    return [o for o, _ in pairs], [s for _, s in pairs]


N_SYMMETRIES = 8  # the dihedral group of the square pixel grid (cosmolit.data.AUGMENT_GROUP)


def transform_images(x: torch.Tensor, g: int) -> torch.Tensor:
    """Symmetry g (0..7) of the pixel grid on (..., H, W): flip columns (bit 0), rows (bit 1),
    then transpose (bit 2), as cosmolit.data.apply_symmetry."""
    if g & 1:
        x = torch.flip(x, (-1,))
    if g & 2:
        x = torch.flip(x, (-2,))
    if g & 4:
        x = x.transpose(-1, -2)
    return x


class TargetTransform(nn.Module):
    """Standardisation (from hyper-parameters), response and uncertainty calibration (saved
    buffers) and the symmetry signs of T targets."""

    def __init__(self, targets: Sequence[str], stats: Optional[Sequence] = None, calibrate: Sequence[str] = (),
                 symmetrise: bool = False):
        super().__init__()
        self.targets = [str(t) for t in targets]
        self.symmetrise = bool(symmetrise)
        if self.symmetrise:
            from cosmolit.data import augment_signs

            signs = torch.from_numpy(augment_signs(self.targets, "model.symmetrise"))  # (T, 2): under a transpose, under one flip
        else:
            signs = torch.ones(len(self.targets), 2)
        self.register_buffer("signs", signs, persistent=False)
        offset, scale = check_target_stats(stats, len(self.targets))
        self.register_buffer("offset", torch.tensor(offset), persistent=False)  # (T,)
        self.register_buffer("scale", torch.tensor(scale), persistent=False)  # (T,)
        self.calibrate = [str(t) for t in calibrate]
        # (T, 2): slope (1 + m) and intercept c of prediction on truth; identity until measured
        self.register_buffer("response", torch.tensor([[1.0, 0.0]] * len(self.targets)))
        # (T,): factor on each target's predicted sigma (uncertainty calibration); ones until measured
        self.register_buffer("sigma_scale", torch.ones(len(self.targets)))

    @torch.no_grad()
    def reset_calibration(self) -> None:
        """Back to the identity response and sigma factors (before measuring them again)."""
        self.response.copy_(torch.tensor([[1.0, 0.0]] * len(self.targets)))
        self.sigma_scale.fill_(1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the uncertainty calibration existed carry no sigma_scale
        state_dict.setdefault(prefix + "sigma_scale", torch.ones(len(self.targets)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def standardise(self, y: torch.Tensor) -> torch.Tensor:
        """Physical targets (B, T) -> standardised (B, T)."""
        return (y - self.offset.to(y.dtype)) / self.scale.to(y.dtype)

    def to_physical(self, mean: torch.Tensor, scale_tril: torch.Tensor, calibrated: bool = True):
        """Standardised (mean (..., T), L (..., T, T)) -> physical units; unless told not to, with the
        response removed and the uncertainty calibration applied to L."""
        s = self.scale.to(mean.dtype)
        mean = mean * s + self.offset.to(mean.dtype)
        scale_tril = scale_tril * s.unsqueeze(-1)  # diag(s) L: row i times s_i
        if calibrated:
            slope, intercept = self.response[:, 0].to(mean.dtype), self.response[:, 1].to(mean.dtype)
            mean = (mean - intercept) / slope
            scale_tril = scale_tril * (self.sigma_scale.to(mean.dtype) / slope).unsqueeze(-1)
        return mean, scale_tril

    def symmetry_signs(self, g: int) -> torch.Tensor:
        """(T,) factors that turn the targets of a stamp seen under symmetry g back to the stamp's own."""
        one_flip = bool(g & 1) != bool(g & 2)
        out = torch.ones_like(self.signs[:, 0])
        if g & 4:
            out = out * self.signs[:, 0]
        if one_flip:
            out = out * self.signs[:, 1]
        return out

    def calibrate_moments(self, mean: torch.Tensor, *covs: torch.Tensor):
        """Response and uncertainty calibration of physical moments: mean (..., T) -> (mean - c) / (1 + m),
        each covariance (..., T, T) -> D C D with D = diag(sigma_scale / (1 + m)). Returns (mean, *covs)."""
        slope, intercept = self.response[:, 0].to(mean.dtype), self.response[:, 1].to(mean.dtype)
        d = self.sigma_scale.to(mean.dtype) / slope
        return ((mean - intercept) / slope, *(c * d.unsqueeze(-1) * d for c in covs))

    def apply_response(self, mean: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Uncalibrated physical means and marginal sigmas (N, T) with the stored response removed."""
        slope, intercept = (self.response[:, k].double().cpu().numpy() for k in (0, 1))
        return (mean - intercept) / slope, sigma / slope

    @torch.no_grad()
    def fit_response(self, pred: np.ndarray, truth: np.ndarray, echo=None) -> dict[str, dict]:
        """Least-squares line pred = slope * truth + intercept per calibrated target (pred from
        uncalibrated predictions); stores it and returns {target: {slope, intercept}}."""
        pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
        result = {}
        for name in self.calibrate:
            k = self.targets.index(name)
            t, p = truth[:, k], pred[:, k]
            if len(t) < 3 or np.var(t) == 0:
                raise UsageError(f"calibrating {name}: the calibration set needs at least 3 galaxies with "
                                 f"different {name}, got {len(t)}")
            if self.symmetrise and bool((self.signs[k] < 0).any()):
                # an exactly equivariant estimate of a spin-2 quantity has no intercept in
                # expectation; fitting one would only add the validation split's noise
                slope, intercept = float(np.dot(t, p) / np.dot(t, t)), 0.0
            else:
                slope, intercept = np.polyfit(t, p, 1)
            if slope < MIN_RESPONSE:
                if echo is not None:
                    echo(f"{name}: response {slope:.3f} < {MIN_RESPONSE}: the network has not learned it; left uncalibrated")
                continue
            low, high = PLAUSIBLE_RESPONSE
            if not low <= slope <= high and echo is not None:
                echo(f"warning: {name}: response {slope:.3f} is outside [{low}, {high}]: removing it multiplies "
                     f"the {name} predictions by {1 / slope:.3g}; the network has barely learned {name}")
            self.response[k, 0] = float(slope)
            self.response[k, 1] = float(intercept)
            result[name] = {"slope": float(slope), "intercept": float(intercept)}
        return result

    @torch.no_grad()
    def fit_sigma_scale(self, mean: np.ndarray, sigma: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        """Fit and store one factor per target on its marginal sigma (see the module docstring) from
        response-calibrated predictions (N, T); returns {target: factor}."""
        from statistics import NormalDist

        z = np.array([NormalDist().inv_cdf(0.5 + q / 2) for q in COVERAGE_LEVELS])  # (Q,)
        result = {}
        for k, name in enumerate(self.targets):
            ok = np.isfinite(mean[:, k]) & np.isfinite(sigma[:, k]) & (sigma[:, k] > 0)
            if ok.sum() < 3:
                raise UsageError(f"calibrating the uncertainty of {name}: the calibration set needs at least 3 "
                                 f"galaxies with a finite positive sigma, got {int(ok.sum())}")
            pull = np.sort(np.abs(truth[ok, k] - mean[ok, k]) / sigma[ok, k])  # (n,)
            # observed coverage of mean +- z_q s sigma for every (s, q): fraction of |pull| < z_q s
            cover = np.searchsorted(pull, SIGMA_SCALE_GRID[:, None] * z[None, :]) / len(pull)  # (G, Q)
            best = float(SIGMA_SCALE_GRID[np.argmin((((cover - COVERAGE_LEVELS) ** 2) * COVERAGE_WEIGHTS).sum(1))])
            self.sigma_scale[k] = best
            result[name] = best
        return result

    def sigma_scales(self) -> dict[str, float]:
        """{target: factor} for the targets whose uncertainty calibration is not the identity."""
        return {name: float(v) for name, v in zip(self.targets, self.sigma_scale) if float(v) != 1.0}

    def responses(self) -> dict[str, dict]:
        """{target: {slope, intercept}} for the targets whose response is not the identity."""
        out = {}
        for k, name in enumerate(self.targets):
            slope, intercept = (float(v) for v in self.response[k])
            if (slope, intercept) != (1.0, 0.0):
                out[name] = {"slope": slope, "intercept": intercept}
        return out


def monitored_metric(loss: str) -> str:
    """The validation metric that picks the best checkpoint of a shape network trained with `loss`.

    With `decoupled` and `mse` it is `val_mse`, the squared error of the standardised means:
    their covariance is re-scaled on the validation split after training (uncertainty
    calibration), so a covariance that grows over-confident on the training galaxies, which
    drives the validation NLL up long before the means stop improving (isolated CNN, session
    2: validation loss 8.1 against training -0.58 at epoch 20), must not choose the weights.
    With `nll` it is the loss itself, as in the study.
    """
    return "val_loss" if loss == "nll" else "val_mse"


def standardised_mse(y: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Mean squared error over batch and targets, standardised units (y, mean (B, T)) -> ()."""
    return ((mean.detach() - y) ** 2).mean()


CALIBRATION_DRAWS = 16  # BNN weight draws per stamp when calibrating (the moments converge fast)


def calibrate(model, loader, echo=None, progress: bool = True, n: Optional[int] = None,
              source: str = "the validation split") -> dict[str, dict]:
    """Measure and store the response and then the uncertainty calibration of `model` (a shape
    network with `target_transform` and `estimate`) on the (x, y) batches of `loader` (a DataLoader,
    or any iterable of tensor pairs with `n` the number of stamps), replacing any earlier calibration.

    Returns {'response': {target: {slope, intercept}} (targets calibrated), 'sigma_scale': {target: factor}}.
    """
    from cosmolit.progress import progress_bar

    transform = model.target_transform
    transform.reset_calibration()  # a target whose response is now too small to calibrate keeps none
    device = next(model.parameters()).device
    kwargs = {"samples": CALIBRATION_DRAWS, "seed": 0} if hasattr(model, "predict_samples") else {}
    was_training = model.training
    model.eval()
    means, sigmas, truth = [], [], []
    try:
        with torch.no_grad(), progress_bar(len(loader.dataset) if n is None else n, f"calibrating on {source}",
                                           enabled=progress) as advance:
            for x, y in loader:
                est = model.estimate(x.to(device), calibrated=False, **kwargs)
                means.append(est["mean"].double().cpu().numpy())
                sigmas.append(torch.diagonal(est["cov"], dim1=-2, dim2=-1).double().sqrt().cpu().numpy())
                truth.append(y.double().numpy())
                advance(len(x))
    finally:
        model.train(was_training)
    mean, sigma, truth = np.concatenate(means), np.concatenate(sigmas), np.concatenate(truth)
    response = transform.fit_response(mean, truth, echo) if transform.calibrate else {}
    mean, sigma = transform.apply_response(mean, sigma)
    return {"response": response, "sigma_scale": transform.fit_sigma_scale(mean, sigma, truth)}
