"""Shear (ellipticity) bias and point-estimate metrics.

Convention (STEP, Heymans et al. 2006; GREAT3, Mandelbaum et al. 2014), per component::

    e_obs = (1 + m) e_true + c

m and c come from an ordinary least-squares line of e_obs against e_true, with the classical
standard errors of the slope and intercept (residual variance / (n - 2)).
"""

from __future__ import annotations

import numpy as np

from cosmolit.errors import UsageError

NAN = float("nan")

# |dz| / (1 + z) above this counts as a catastrophic redshift outlier (a common photo-z yardstick).
OUTLIER_DZ = 0.15


def _pair(pred, true, what: str = "pred/true") -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.ndim != 1 or true.ndim != 1 or pred.shape != true.shape:
        raise UsageError(f"{what} must be two 1-D arrays of the same length, got shapes {pred.shape} and {true.shape}")
    keep = np.isfinite(pred) & np.isfinite(true)
    return pred[keep], true[keep]


def shear_bias(pred, true) -> dict:
    """m, c (with standard errors), RMSE and n of predicted against true values of one component.

    pred, true: (N,). Non-finite pairs (e.g. failed HSM measurements, NaN) are left out and
    `n` counts the pairs used. With fewer than 3 pairs, or no spread in `true`, m and c are NaN.
    """
    p, t = _pair(pred, true)
    n = int(p.size)
    out = {"m": NAN, "m_err": NAN, "c": NAN, "c_err": NAN, "rmse": NAN, "n": n}
    if n == 0:
        return out
    out["rmse"] = float(np.sqrt(np.mean((p - t) ** 2)))
    t_mean = t.mean()
    sxx = float(np.sum((t - t_mean) ** 2))
    if n < 3 or sxx <= 0.0:
        return out
    slope = float(np.sum((t - t_mean) * (p - p.mean())) / sxx)
    intercept = float(p.mean() - slope * t_mean)
    resid = p - (intercept + slope * t)
    s2 = float(np.sum(resid**2) / (n - 2))  # residual variance
    out["m"] = slope - 1.0
    out["m_err"] = float(np.sqrt(s2 / sxx))
    out["c"] = intercept
    out["c_err"] = float(np.sqrt(s2 * (1.0 / n + t_mean**2 / sxx)))
    return out


def redshift_metrics(pred, true) -> dict:
    """Point-estimate metrics of a redshift: rmse, bias (mean dz) and |dz|/(1+z) statistics.

    dz_norm = (z_pred - z_true) / (1 + z_true); sigma_nmad = 1.4826 median |dz_norm - median(dz_norm)|;
    outlier_frac = fraction with |dz_norm| > 0.15.
    """
    p, t = _pair(pred, true)
    n = int(p.size)
    if n == 0:
        return {"rmse": NAN, "bias": NAN, "dz_norm_mean": NAN, "dz_norm_std": NAN, "abs_dz_norm_mean": NAN,
                "sigma_nmad": NAN, "outlier_frac": NAN, "n": 0}
    dz = p - t
    dzn = dz / (1.0 + t)
    return {
        "rmse": float(np.sqrt(np.mean(dz**2))),
        "bias": float(dz.mean()),
        "dz_norm_mean": float(dzn.mean()),
        "dz_norm_std": float(dzn.std()),
        "abs_dz_norm_mean": float(np.abs(dzn).mean()),
        "sigma_nmad": float(1.4826 * np.median(np.abs(dzn - np.median(dzn)))),
        "outlier_frac": float(np.mean(np.abs(dzn) > OUTLIER_DZ)),
        "n": n,
    }


def bin_edges(x, n_bins: int = 5, min_per_bin: int = 10) -> np.ndarray | None:
    """Quantile bin edges of `x` (finite values), fewer bins for small samples; None if x has no spread."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2 * min_per_bin or np.ptp(x) == 0:
        return None
    n_bins = int(max(1, min(n_bins, x.size // min_per_bin)))
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size < 2:
        return None
    return edges


def binned_bias(pred, true, x, edges) -> dict:
    """shear_bias of (pred, true) in bins of `x` with the given `edges` (last bin closed).

    Returns {"edges": [...], "centre": [...], "m": [...], "m_err": [...], "c": [...], "c_err": [...],
    "rmse": [...], "n": [...]} (lists, one entry per bin).
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if not (pred.shape == true.shape == x.shape):
        raise UsageError(f"binned_bias: pred, true and x must have one shape, got {pred.shape}, {true.shape}, {x.shape}")
    edges = np.asarray(edges, dtype=np.float64)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    inside = np.isfinite(x) & (x >= edges[0]) & (x <= edges[-1])
    out: dict = {"edges": edges.tolist(), "centre": [], "m": [], "m_err": [], "c": [], "c_err": [], "rmse": [], "n": []}
    for k in range(len(edges) - 1):
        sel = inside & (idx == k)
        res = shear_bias(pred[sel], true[sel])
        xs = x[sel]
        out["centre"].append(float(np.median(xs)) if xs.size else float(0.5 * (edges[k] + edges[k + 1])))
        for key in ("m", "m_err", "c", "c_err", "rmse", "n"):
            out[key].append(res[key])
    return out


# ---------------------------------------------------------------------------- confidence intervals
# Percentile bootstrap over stamps: B resamples with replacement, drawn from a fixed seed, so the same
# stamps give the same intervals (and metrics.json the same bytes). Every call with the same number of
# stamps draws the same resamples.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 20240
CI_LEVEL = 0.95


def bootstrap_means(values, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Mean of each column of `values` (N,) or (N, K) in each of n_boot resamples of its rows, NaN
    entries left out of their column's mean; shape (n_boot,) or (n_boot, K)."""
    v = np.asarray(values, dtype=np.float64)
    flat = v.reshape(v.shape[0], -1)
    n, k = flat.shape
    ok = np.isfinite(flat)
    filled = np.where(ok, flat, 0.0)
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, k))
    step = max(1, 4_000_000 // max(n, 1))  # resamples per chunk: a (step, N) table of counts
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:start + b] = (counts @ filled) / (counts @ ok.astype(np.float64))
    return out if v.ndim > 1 else out[:, 0]


def percentile_interval(samples, level: float = CI_LEVEL) -> list:
    """[lo, hi], the central `level` interval of bootstrap samples (n_boot,) (non-finite left out)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return [NAN, NAN]
    lo, hi = np.quantile(s, [0.5 - 0.5 * level, 0.5 + 0.5 * level])
    return [float(lo), float(hi)]


def rmse_interval(pred, true, level: float = CI_LEVEL) -> list:
    """95 % percentile-bootstrap interval [lo, hi] of the RMSE of pred against true (finite pairs)."""
    p, t = _pair(pred, true)
    if p.size == 0:
        return [NAN, NAN]
    return percentile_interval(np.sqrt(bootstrap_means((p - t) ** 2)), level)
