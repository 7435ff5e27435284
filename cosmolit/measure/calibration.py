"""Quality of predicted uncertainties: coverage, pulls, Gaussian NLL, Spearman, sparsification, AUROC.

Works for any Gaussian prediction: the BNN's total (aleatoric + epistemic) covariance and the
CNN's aleatoric covariance alike. Shapes: y, mean (N, T); cov (N, T, T).
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Sequence

import numpy as np

from cosmolit.errors import UsageError
from cosmolit.measure.bias import CI_LEVEL, bootstrap_means, percentile_interval

NAN = float("nan")
# central-interval probabilities of the calibration curve
LEVELS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2).tolist())


def _check(y, mean, cov) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    if y.ndim == 1:
        y, mean = y[:, None], mean[:, None]
    if cov.ndim == 2 and y.shape[1] == 1:
        cov = cov.reshape(-1, 1, 1)
    if y.ndim != 2 or mean.shape != y.shape:
        raise UsageError(f"truth and mean must both be (N, T), got {y.shape} and {mean.shape}")
    n, t = y.shape
    if cov.shape != (n, t, t):
        raise UsageError(f"covariance must be (N, T, T) = ({n}, {t}, {t}), got {cov.shape}")
    return y, mean, cov


def z_of(level: float) -> float:
    """Half-width in sigma of the central interval holding probability `level` of N(0, 1)."""
    return NormalDist().inv_cdf(0.5 + 0.5 * level)


def covered(y, mean, sigma, level: float) -> np.ndarray:
    """Per galaxy: 1.0 where |y - mean| <= z(level) sigma, 0.0 where not, NaN where it cannot be told
    (non-finite values or sigma <= 0). Arrays of one shape."""
    y, mean, sigma = (np.asarray(a, dtype=np.float64) for a in (y, mean, sigma))
    keep = np.isfinite(y) & np.isfinite(mean) & np.isfinite(sigma) & (sigma > 0)
    out = np.full(y.shape, NAN)
    out[keep] = (np.abs(y[keep] - mean[keep]) <= z_of(level) * sigma[keep]).astype(np.float64)
    return out


def coverage(y, mean, sigma, level: float) -> float:
    """Fraction of |y - mean| <= z(level) sigma (one component, marginal interval)."""
    hit = covered(y, mean, sigma, level)
    hit = hit[np.isfinite(hit)]
    return float(hit.mean()) if hit.size else NAN


def gaussian_nll(y, mean, cov) -> np.ndarray:
    """Per-galaxy negative log-likelihood of y under N(mean, cov) (closed form), shape (N,).

    0.5 (T log 2 pi + log det cov + r^T cov^-1 r) with r = y - mean, via a Cholesky factor;
    a covariance that is not positive definite gives NaN for that galaxy.
    """
    y, mean, cov = _check(y, mean, cov)
    n, t = y.shape
    out = np.full(n, np.nan)
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    r = y - mean  # (N, T)
    ok = np.isfinite(r).all(1) & np.isfinite(cov).all((1, 2))
    if not ok.any():
        return out
    idx = np.flatnonzero(ok)
    try:
        chol = np.linalg.cholesky(cov[idx])  # (n_ok, T, T)
        good = np.ones(idx.size, bool)
    except np.linalg.LinAlgError:
        # slow path: find the covariances that are not positive definite
        chol = np.zeros((idx.size, t, t))
        good = np.zeros(idx.size, bool)
        for k, j in enumerate(idx):
            try:
                chol[k] = np.linalg.cholesky(cov[j])
                good[k] = True
            except np.linalg.LinAlgError:
                pass
    idx, chol = idx[good], chol[good]
    # whitened residual w = L^-1 r, so r^T cov^-1 r = |w|^2
    w = np.linalg.solve(chol, r[idx][..., None])[..., 0]  # (n_ok, T)
    logdet = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
    out[idx] = 0.5 * (t * math.log(2 * math.pi) + logdet + (w**2).sum(1))
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(1, x.size + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for telling labels True (positive) from False.

    Rank (Mann-Whitney) form: P(score of a random positive > score of a random negative),
    ties counted one half. NaN when one class is empty.
    """
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels).astype(bool)
    if s.shape != lab.shape or s.ndim != 1:
        raise UsageError(f"auroc: scores and labels must be 1-D of one length, got {s.shape} and {lab.shape}")
    keep = np.isfinite(s)
    s, lab = s[keep], lab[keep]
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = _average_ranks(s)
    u = ranks[lab].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc_se(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC `a` from n_pos positives and n_neg negatives (Hanley & McNeil 1982)."""
    if not math.isfinite(a) or n_pos < 1 or n_neg < 1:
        return NAN
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return float(math.sqrt(max(var, 0.0)))


def normal_interval(value: float, se: float, level: float = CI_LEVEL, bounds=(0.0, 1.0)) -> list:
    """[lo, hi] = value -+ z(level) se, clipped to `bounds`."""
    if not (math.isfinite(value) and math.isfinite(se)):
        return [NAN, NAN]
    h = z_of(level) * se
    return [max(bounds[0], value - h), min(bounds[1], value + h)]


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3 or np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0:
        return NAN
    return float(spearmanr(a[keep], b[keep])[0])


def sparsification(err, sigma, fractions=None) -> dict:
    """RMSE of the galaxies kept after removing the fraction f with the largest sigma (and, as
    the oracle, with the largest |err|). `ause` is the mean gap between the two curves."""
    err, sigma = np.asarray(err, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    keep = np.isfinite(err) & np.isfinite(sigma)
    err, sigma = err[keep], sigma[keep]
    fr = np.round(np.arange(0.0, 0.95, 0.05), 2) if fractions is None else np.asarray(fractions)
    if err.size == 0:
        return {"fraction_removed": fr.tolist(), "rmse_by_sigma": [NAN] * fr.size, "rmse_oracle": [NAN] * fr.size,
                "ause": NAN}
    by_sigma = err[np.argsort(-sigma, kind="mergesort")] ** 2
    by_err = err[np.argsort(-np.abs(err), kind="mergesort")] ** 2
    n = err.size
    curve_s, curve_o = [], []
    for f in fr:
        k = min(int(round(f * n)), n - 1)
        curve_s.append(float(np.sqrt(by_sigma[k:].mean())))
        curve_o.append(float(np.sqrt(by_err[k:].mean())))
    return {"fraction_removed": fr.tolist(), "rmse_by_sigma": curve_s, "rmse_oracle": curve_o,
            "ause": float(np.mean(np.array(curve_s) - np.array(curve_o)))}


def calibration_metrics(y, mean, cov, names: Sequence[str], epistemic_sigma=None, is_blend=None) -> dict:
    """Calibration of Gaussian predictions N(mean, cov) against truth y.

    y, mean: (N, T); cov: (N, T, T); names: T target names; epistemic_sigma: (N,) or None;
    is_blend: (N,) bool or None.

    Returns (plain floats and lists, ready for JSON)::

        coverage_68, coverage_95     mean over targets of the marginal-interval coverage
        coverage_68_ci95, coverage_95_ci95  their 95 % percentile-bootstrap intervals over galaxies
        nll                          mean per-galaxy Gaussian NLL with the full covariance
        spearman_sigma_error         mean over targets of Spearman(sigma, |error|)
        per_target: {name: {coverage_68, coverage_95, coverage_68_ci95, coverage_95_ci95, pull_mean,
                            pull_std, spearman_sigma_error, sparsification_ause}}
        calibration_curve: {levels: [...], observed: {name: [...]}}
        pulls: {name: [...]}          the pull values (for plots; evaluate_shapes drops them from JSON)
        sparsification: {name: {...}}
        auroc_epistemic_blend        when epistemic_sigma and both classes of is_blend are given, with
        auroc_epistemic_blend_se, auroc_epistemic_blend_ci95  its Hanley-McNeil standard error and 95 % interval
        n, n_nll_failed
    """
    y, mean, cov = _check(y, mean, cov)
    names = list(names)
    if len(names) != y.shape[1]:
        raise UsageError(f"{len(names)} target names given for {y.shape[1]} targets")
    sigma = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None))  # (N, T)
    err = mean - y  # (N, T)
    per, curve, pulls, spars, hits = {}, {}, {}, {}, {}
    for j, name in enumerate(names):
        with np.errstate(divide="ignore", invalid="ignore"):
            pull = err[:, j] / sigma[:, j]
        pull = pull[np.isfinite(pull)]
        sp = sparsification(err[:, j], sigma[:, j])
        for key, level in (("coverage_68", 0.6827), ("coverage_95", 0.9545)):
            hits.setdefault(key, []).append(covered(y[:, j], mean[:, j], sigma[:, j], level))
        per[name] = {
            "coverage_68": coverage(y[:, j], mean[:, j], sigma[:, j], 0.6827),
            "coverage_95": coverage(y[:, j], mean[:, j], sigma[:, j], 0.9545),
            "pull_mean": float(pull.mean()) if pull.size else NAN,
            "pull_std": float(pull.std()) if pull.size else NAN,
            "spearman_sigma_error": spearman(sigma[:, j], np.abs(err[:, j])),
            "sparsification_ause": sp["ause"],
        }
        curve[name] = [coverage(y[:, j], mean[:, j], sigma[:, j], lv) for lv in LEVELS]
        pulls[name] = pull.tolist()
        spars[name] = sp
    nll = gaussian_nll(y, mean, cov)

    def _mean(key):
        vals = [per[n][key] for n in names if np.isfinite(per[n][key])]
        return float(np.mean(vals)) if vals else NAN

    out = {
        "coverage_68": _mean("coverage_68"),
        "coverage_95": _mean("coverage_95"),
        "nll": float(np.nanmean(nll)) if np.isfinite(nll).any() else NAN,
        "spearman_sigma_error": _mean("spearman_sigma_error"),
        "per_target": per,
        "calibration_curve": {"levels": list(LEVELS), "observed": curve},
        "pulls": pulls,
        "sparsification": spars,
        "n": int(y.shape[0]),
        "n_nll_failed": int((~np.isfinite(nll)).sum()),
    }
    # bootstrap over galaxies, the same resamples for every target: per target, and their mean
    for key, cols in hits.items():
        boot = bootstrap_means(np.stack(cols, axis=1))  # (B, T)
        for j, name in enumerate(names):
            per[name][f"{key}_ci95"] = percentile_interval(boot[:, j])
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a target with no usable galaxy
            out[f"{key}_ci95"] = percentile_interval(np.nanmean(boot, axis=1))
    if epistemic_sigma is not None and is_blend is not None:
        eps = np.asarray(epistemic_sigma, dtype=np.float64)
        blend = np.asarray(is_blend).astype(bool)
        if eps.shape != (y.shape[0],) or blend.shape != (y.shape[0],):
            raise UsageError(
                f"epistemic_sigma and is_blend must be ({y.shape[0]},), got {eps.shape} and {blend.shape}"
            )
        if blend.any() and (~blend).any():
            a = auroc(eps, blend)
            ok = np.isfinite(eps)
            se = auroc_se(a, int(blend[ok].sum()), int((~blend[ok]).sum()))
            out["auroc_epistemic_blend"] = a
            out["auroc_epistemic_blend_se"] = se
            out["auroc_epistemic_blend_ci95"] = normal_interval(a, se)
    return out
