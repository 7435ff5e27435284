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
    the checkpoint; the training loss never sees it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from cosmolit.errors import UsageError
from cosmolit.nn.gaussian import gaussian_nll

SHAPE_LOSSES = ("decoupled", "nll", "mse")
DEFAULT_CALIBRATE = ("e1", "e2")
MIN_RESPONSE = 0.05  # below this slope a target is left uncalibrated: the network has not learned it


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


class TargetTransform(nn.Module):
    """Standardisation (from hyper-parameters) and response calibration (a saved buffer) of T targets."""

    def __init__(self, targets: Sequence[str], stats: Optional[Sequence] = None, calibrate: Sequence[str] = ()):
        super().__init__()
        self.targets = [str(t) for t in targets]
        offset, scale = check_target_stats(stats, len(self.targets))
        self.register_buffer("offset", torch.tensor(offset), persistent=False)  # (T,)
        self.register_buffer("scale", torch.tensor(scale), persistent=False)  # (T,)
        self.calibrate = [str(t) for t in calibrate]
        # (T, 2): slope (1 + m) and intercept c of prediction on truth; identity until measured
        self.register_buffer("response", torch.tensor([[1.0, 0.0]] * len(self.targets)))

    def standardise(self, y: torch.Tensor) -> torch.Tensor:
        """Physical targets (B, T) -> standardised (B, T)."""
        return (y - self.offset.to(y.dtype)) / self.scale.to(y.dtype)

    def to_physical(self, mean: torch.Tensor, scale_tril: torch.Tensor, calibrated: bool = True):
        """Standardised (mean (..., T), L (..., T, T)) -> physical units, calibrated unless told not to."""
        s = self.scale.to(mean.dtype)
        mean = mean * s + self.offset.to(mean.dtype)
        scale_tril = scale_tril * s.unsqueeze(-1)  # diag(s) L: row i times s_i
        if calibrated:
            slope, intercept = self.response[:, 0].to(mean.dtype), self.response[:, 1].to(mean.dtype)
            mean = (mean - intercept) / slope
            scale_tril = scale_tril / slope.unsqueeze(-1)
        return mean, scale_tril

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
                raise UsageError(f"calibrating {name}: the validation split needs at least 3 galaxies with "
                                 f"different {name}, got {len(t)}")
            slope, intercept = np.polyfit(t, p, 1)
            if slope < MIN_RESPONSE:
                if echo is not None:
                    echo(f"{name}: response {slope:.3f} < {MIN_RESPONSE}: the network has not learned it; left uncalibrated")
                continue
            self.response[k, 0] = float(slope)
            self.response[k, 1] = float(intercept)
            result[name] = {"slope": float(slope), "intercept": float(intercept)}
        return result

    def responses(self) -> dict[str, dict]:
        """{target: {slope, intercept}} for the targets whose response is not the identity."""
        out = {}
        for k, name in enumerate(self.targets):
            slope, intercept = (float(v) for v in self.response[k])
            if (slope, intercept) != (1.0, 0.0):
                out[name] = {"slope": slope, "intercept": intercept}
        return out


def shape_loss(kind: str, y: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor,
               scale_tril_fixed_features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample loss (B,) in standardised units (see the module docstring).

    `scale_tril_fixed_features` is the covariance factor computed from detached trunk features
    (decoupled only); the means (B, T) carry the gradient of the squared error.
    """
    if kind == "nll":
        return gaussian_nll(y, mean, scale_tril)
    squared = 0.5 * ((mean - y) ** 2).sum(-1)  # (B,)
    if kind == "mse":
        return squared
    if scale_tril_fixed_features is None:
        raise ValueError("the decoupled loss needs the covariance factor computed on detached features")
    return squared + gaussian_nll(y, mean.detach(), scale_tril_fixed_features)


CALIBRATION_DRAWS = 16  # BNN weight draws per stamp when measuring the response (the mean converges fast)


def measure_response(model, loader, echo=None, progress: bool = True) -> dict[str, dict]:
    """Measure and store the response of `model` (a shape network with `target_transform` and
    `estimate`) on the (x, y) batches of `loader`: {target: {slope, intercept}} of those calibrated."""
    from cosmolit.progress import progress_bar

    transform = model.target_transform
    if not transform.calibrate:
        return {}
    device = next(model.parameters()).device
    kwargs = {"samples": CALIBRATION_DRAWS, "seed": 0} if hasattr(model, "predict_samples") else {}
    was_training = model.training
    model.eval()
    preds, truth = [], []
    try:
        with torch.no_grad(), progress_bar(len(loader.dataset), "calibrating the response", enabled=progress) as advance:
            for x, y in loader:
                preds.append(model.estimate(x.to(device), calibrated=False, **kwargs)["mean"].float().cpu().numpy())
                truth.append(y.numpy())
                advance(len(x))
    finally:
        model.train(was_training)
    return transform.fit_response(np.concatenate(preds), np.concatenate(truth), echo)
