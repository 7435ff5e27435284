"""Plots of the evaluation (matplotlib, Agg backend): stamp grids, bias in bins, scatter, pulls,
calibration curve, distributions. Every function writes one PNG atomically and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from cosmolit.dataset import atomic_path  # noqa: E402

COLOURS = {"network": "C0", "REGAUSS": "C1", "KSB": "C2"}


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _display(stamp: np.ndarray, bands: str) -> np.ndarray:
    """(B, H, W) electrons -> (H, W, 3) asinh-stretched colour image (i, r, g) or (H, W) grey."""
    stamp = np.nan_to_num(np.asarray(stamp, dtype=np.float64))
    if all(b in bands for b in "irg"):
        rgb = np.stack([stamp[bands.index(b)] for b in "irg"], axis=-1)  # (H, W, 3)
    else:
        k = bands.index("i") if "i" in bands else (bands.index("r") if "r" in bands else len(bands) // 2)
        rgb = stamp[k][..., None]
    scale = np.percentile(rgb.sum(-1), 99.5) if rgb.size else 1.0
    scale = scale if scale > 0 else (np.abs(rgb).max() or 1.0)
    soft = 0.05 * scale
    out = np.arcsinh(np.clip(rgb, 0, None) / soft) / np.arcsinh(scale / soft)
    out = np.clip(out, 0, 1)
    return out if out.shape[-1] == 3 else out[..., 0]


def stamp_grid(images, bands: str, path, ncols: int = 8, titles: Sequence[str] | None = None,
               title: str | None = None) -> Path:
    """A grid of stamps (N, B, H, W) as colour (i, r, g, asinh stretch) or grey images."""
    images = np.asarray(images)
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, 1.4 * nrows + (0.4 if title else 0)), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(_display(images[k], bands), origin="lower", cmap="gray", interpolation="nearest")
            if titles is not None and k < len(titles):
                ax.set_title(titles[k], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def reconstruction_grid(inputs, targets, recon, bands: str, path, n: int = 8) -> Path:
    """Rows: input (noisy), clean target, VAE reconstruction, residual (target - reconstruction)."""
    k = min(n, len(inputs))
    fig, axes = plt.subplots(4, k, figsize=(1.5 * k, 6.4), squeeze=False)
    rows = [("input", inputs), ("clean target", targets), ("reconstruction", recon)]
    for j in range(k):
        for i, (label, arr) in enumerate(rows):
            ax = axes[i, j]
            ax.imshow(_display(arr[j], bands), origin="lower", cmap="gray", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
        b = bands.index("i") if "i" in bands else len(bands) // 2
        res = np.asarray(targets[j][b], dtype=np.float64) - np.asarray(recon[j][b], dtype=np.float64)
        lim = np.abs(res).max() or 1.0
        ax = axes[3, j]
        ax.imshow(res, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        if j == 0:
            ax.set_ylabel(f"residual ({bands[b]})", fontsize=8)
    fig.suptitle("VAE reconstructions (colour: i, r, g; asinh stretch)", fontsize=10)
    return _save(fig, path)


def pred_vs_true(y, mean, names: Sequence[str], path, hsm: Mapping[str, Mapping] | None = None) -> Path:
    """Predicted against true value per target (network; HSM methods for e1/e2 when given)."""
    y, mean = np.asarray(y), np.asarray(mean)
    t = len(names)
    fig, axes = plt.subplots(1, t, figsize=(4 * t, 4), squeeze=False)
    for j, (name, ax) in enumerate(zip(names, axes[0])):
        ax.scatter(y[:, j], mean[:, j], s=3, alpha=0.5, c=COLOURS["network"], label="network")
        for method, res in (hsm or {}).items():
            if name in ("e1", "e2"):
                ax.scatter(y[:, j], res[name], s=3, alpha=0.35, c=COLOURS.get(method, "C3"), label=f"HSM {method}")
        lo, hi = np.nanmin(y[:, j]), np.nanmax(y[:, j])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        unit = " (distortion)" if name in ("e1", "e2") else ""
        ax.set_xlabel(f"true {name}{unit}")
        ax.set_ylabel(f"estimated {name}")
        if name in ("e1", "e2"):
            ax.set_ylim(-1.05, 1.05)
        ax.legend(fontsize=7, markerscale=3)
    return _save(fig, path)


def binned_bias_plot(curves: Mapping[str, Mapping[str, dict]], xlabel: str, path) -> Path:
    """m and c per component in bins of a variable; curves = {label: {"e1": binned_bias(...), "e2": ...}}."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True)
    for col, comp in enumerate(("e1", "e2")):
        for row, key in enumerate(("m", "c")):
            ax = axes[row, col]
            for k, (label, per_comp) in enumerate(curves.items()):
                b = per_comp.get(comp)
                if not b:
                    continue
                x = np.asarray(b["centre"], dtype=float)
                dx = 0.01 * (np.nanmax(x) - np.nanmin(x) or 1.0) * (k - 1)  # small offsets to separate error bars
                ax.errorbar(x + dx, np.asarray(b[key], float), yerr=np.asarray(b[f"{key}_err"], float), marker="o",
                            ms=4, capsize=2, color=COLOURS.get(label.replace("HSM ", ""), f"C{k + 3}"), label=label)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_ylabel(f"{key} ({comp})")
            if row == 1:
                ax.set_xlabel(xlabel)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"shear bias e_obs = (1 + m) e_true + c in bins of {xlabel}", fontsize=10)
    return _save(fig, path)


def pull_histogram(pulls: Mapping[str, Sequence[float]], path) -> Path:
    """Histogram of (pred - true) / sigma per target against the N(0, 1) density."""
    names = list(pulls)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    grid = np.linspace(-5, 5, 201)
    for ax, name in zip(axes[0], names):
        p = np.asarray(pulls[name], dtype=float)
        p = p[np.isfinite(p)]
        ax.hist(np.clip(p, -5, 5), bins=40, range=(-5, 5), density=True, alpha=0.6,
                label=f"mean {p.mean():+.2f}, std {p.std():.2f}" if p.size else "no data")
        ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), "k-", lw=1, label="N(0, 1)")
        ax.set_xlabel(f"pull ({name}): (pred - true) / sigma")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    return _save(fig, path)


def calibration_curve(levels: Sequence[float], observed: Mapping[str, Sequence[float]], path) -> Path:
    """Observed against expected coverage of central marginal intervals, per target."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for k, (name, obs) in enumerate(observed.items()):
        ax.plot(levels, obs, marker="o", ms=3, label=name, color=f"C{k}")
    ax.set_xlabel("expected coverage (central interval probability)")
    ax.set_ylabel("observed coverage")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("calibration: above the diagonal = under-confident", fontsize=9)
    return _save(fig, path)


def sparsification_plot(curves: Mapping[str, dict], path) -> Path:
    """RMSE of kept galaxies after removing the most uncertain (solid) or the worst (oracle, dashed)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for k, (name, c) in enumerate(curves.items()):
        ax.plot(c["fraction_removed"], c["rmse_by_sigma"], color=f"C{k}", label=f"{name} (by sigma)")
        ax.plot(c["fraction_removed"], c["rmse_oracle"], color=f"C{k}", ls="--", label=f"{name} (oracle)")
    ax.set_xlabel("fraction removed")
    ax.set_ylabel("RMSE of the rest")
    ax.legend(fontsize=7)
    return _save(fig, path)


def distributions(real: Mapping[str, np.ndarray], generated: Mapping[str, np.ndarray], ks: Mapping[str, float],
                  path, units: Mapping[str, str] | None = None) -> Path:
    """Histograms of simulated against generated statistics, with the KS statistic in each title."""
    names = [n for n in real if n in generated]
    ncols = min(4, len(names)) or 1
    nrows = int(np.ceil(len(names) / ncols)) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.8 * nrows), squeeze=False)
    units = units or {}
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        a = np.asarray(real[name], float)
        b = np.asarray(generated[name], float)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        log = name.startswith("flux_")
        if log:
            a, b = np.log10(a[a > 0]), np.log10(b[b > 0])
        both = np.concatenate([a, b])
        if both.size:
            lo, hi = np.percentile(both, [0.5, 99.5])
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            ax.hist(a, bins=30, range=(lo, hi), density=True, histtype="step", lw=1.5, label="simulated")
            ax.hist(b, bins=30, range=(lo, hi), density=True, histtype="step", lw=1.5, label="generated")
        label = f"log10 {name} [{units.get(name, 'e-')}]" if log else f"{name} [{units.get(name, '')}]"
        ax.set_xlabel(label.replace(" []", ""), fontsize=8)
        ks_val = ks.get(name, float("nan"))
        ax.set_title(f"KS = {ks_val:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def shape_transfer(target_e, recon_e, transfer: Mapping, path) -> Path:
    """Left: reconstructed against true abs(e); right: shape response and median abs(e) per S/N bin."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    t, r = np.asarray(target_e, float), np.asarray(recon_e, float)
    ok = np.isfinite(t) & np.isfinite(r)
    a.scatter(t[ok], r[ok], s=3, alpha=0.4, c=COLOURS["network"])
    hi = float(max(np.nanmax(t[ok], initial=0.1), np.nanmax(r[ok], initial=0.1)))
    a.plot([0, hi], [0, hi], "k--", lw=1, label="y = x")
    a.set_xlabel("abs(e) of the clean target")
    a.set_ylabel("abs(e) of the reconstruction")
    a.legend(fontsize=7)
    rows = [row for row in transfer.get("by_snr") or [] if np.isfinite(row["response"]) and row["snr_max"] > 0]
    if rows:
        mid = [np.sqrt(row["snr_min"] * row["snr_max"]) if row["snr_min"] > 0 else row["snr_max"] / 2 for row in rows]
        b.plot(mid, [row["response"] for row in rows], "o-", label="shape response")
        ratio = [row["median_abs_e_reconstruction"] / row["median_abs_e_target"]
                 if row["median_abs_e_target"] else np.nan for row in rows]
        b.plot(mid, ratio, "s--", label="median abs(e) ratio")
        b.axhline(1.0, color="k", lw=1)
        b.set_xscale("log")
        b.xaxis.set_minor_formatter(NullFormatter())  # the bins' own ticks only: minor labels overlap
        b.set_xticks(mid, [f"{m:.0f}" for m in mid])
        b.set_xlabel("S/N of the target (geometric centre of each quantile bin)")
        b.set_ylabel("reconstruction / target")
        b.legend(fontsize=7)
    else:
        b.axis("off")
        b.text(0.5, 0.5, "no S/N bin with measured shapes", ha="center", va="center", fontsize=8)
    fig.suptitle("do reconstructions keep the galaxies' shapes?", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
