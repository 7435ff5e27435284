"""Summary statistics of galaxy images, for comparing generated with simulated galaxies.

Per stamp: adaptive-moment size and shape (galsim.hsm.FindAdaptiveMom: `moments_sigma` in
pixels, `observed_shape` as a distortion e1, e2; not PSF-corrected), summed flux per band
[electrons] and colours -2.5 log10(F_b1 / F_b2) of adjacent bands [mag]. Distributions of the
two sets are compared with the two-sample Kolmogorov-Smirnov statistic (scipy.stats.ks_2samp),
as Lanusse et al. 2021 (arXiv:2008.03833) and Arcelin et al. 2021 do with such statistics.

GalSim is imported inside the functions only.
"""

from __future__ import annotations

import numpy as np

from cosmolit.errors import UsageError

NAN = float("nan")


def shape_band(bands: str) -> str:
    """The band used for sizes and shapes: i if present, else r, else the middle band."""
    for b in ("i", "r"):
        if b in bands:
            return b
    return bands[len(bands) // 2]


def adaptive_moments(stamps, pixel_scale: float = 0.2, progress: bool = False, label: str = "") -> dict:
    """FindAdaptiveMom on every stamp of (N, H, W).

    Returns {"sigma": (N,) pixels, "e1": (N,), "e2": (N,) (observed distortion), "ok": (N,) bool,
    "n_failed": int}; NaN where the fit failed.
    """
    import galsim

    from cosmolit.progress import progress_bar

    stamps = np.asarray(stamps, dtype=np.float64)
    if stamps.ndim != 3:
        raise UsageError(f"adaptive moments need stamps of shape (N, H, W), got {stamps.shape}")
    n = stamps.shape[0]
    out = {"sigma": np.full(n, np.nan), "e1": np.full(n, np.nan), "e2": np.full(n, np.nan), "ok": np.zeros(n, bool)}
    with progress_bar(n, f"adaptive moments {label}".strip(), enabled=progress) as advance:
        for k in range(n):
            s = stamps[k]
            if np.isfinite(s).all() and s.sum() > 0:
                try:
                    r = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(s), scale=float(pixel_scale)),
                                                   strict=False)
                except (galsim.GalSimError, RuntimeError, ValueError):
                    r = None
                if r is not None and not r.error_message and r.moments_status == 0 and r.moments_sigma > 0:
                    out["sigma"][k] = r.moments_sigma
                    out["e1"][k], out["e2"][k] = r.observed_shape.e1, r.observed_shape.e2
                    out["ok"][k] = True
            advance(1)
    out["n_failed"] = int((~out["ok"]).sum())
    return out


def fluxes(images) -> np.ndarray:
    """Summed flux per band [electrons], (N, B) from (N, B, H, W)."""
    images = np.asarray(images, dtype=np.float64)
    return images.sum(axis=(-2, -1))


def colours(flux: np.ndarray, bands: str) -> dict[str, np.ndarray]:
    """{"<b1><b2>": -2.5 log10(F_b1 / F_b2)} for adjacent bands; NaN where a flux is not positive."""
    out = {}
    for k in range(len(bands) - 1):
        f1, f2 = flux[:, k], flux[:, k + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            c = -2.5 * np.log10(f1 / f2)
        c[(f1 <= 0) | (f2 <= 0)] = np.nan
        out[bands[k] + bands[k + 1]] = c
    return out


def image_statistics(images, bands: str, pixel_scale: float = 0.2, band: str | None = None,
                     progress: bool = False, label: str = "") -> dict:
    """All per-stamp statistics of (N, B, H, W) images: size, abs_e, e1, e2, flux_<b>, colour_<b1><b2>.

    Returns {"stats": {name: (N,)}, "n_failed_moments": int, "band": band used for size and shape}.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != len(bands):
        raise UsageError(f"images must be (N, {len(bands)}, H, W) for bands {bands!r}, got {images.shape}")
    band = band or shape_band(bands)
    if band not in bands:
        raise UsageError(f"band {band!r} is not one of {bands!r}")
    mom = adaptive_moments(images[:, bands.index(band)], pixel_scale, progress=progress, label=label)
    stats = {
        "size": mom["sigma"],
        "abs_e": np.hypot(mom["e1"], mom["e2"]),
        "e1": mom["e1"],
        "e2": mom["e2"],
    }
    flux = fluxes(images)
    for k, b in enumerate(bands):
        stats[f"flux_{b}"] = flux[:, k]
    for name, c in colours(flux, bands).items():
        stats[f"colour_{name}"] = c
    return {"stats": stats, "n_failed_moments": mom["n_failed"], "band": band}


def ks_statistics(a: dict, b: dict) -> dict:
    """Two-sample KS statistic and p-value per statistic present in both dicts (finite values only)."""
    from scipy.stats import ks_2samp

    ks, pvalue = {}, {}
    for name in a:
        if name not in b:
            continue
        x = np.asarray(a[name], dtype=np.float64)
        y = np.asarray(b[name], dtype=np.float64)
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        if x.size == 0 or y.size == 0:
            ks[name], pvalue[name] = NAN, NAN
            continue
        res = ks_2samp(x, y)
        ks[name], pvalue[name] = float(res.statistic), float(res.pvalue)
    return {"ks": ks, "ks_pvalue": pvalue}


def shape_transfer(target: dict, recon: dict, snr=None, bins: int = 4) -> dict:
    """How a VAE's reconstructions carry the shapes of their targets, overall and in S/N bins.

    `target`, `recon`: image_statistics(...)["stats"] of the same stamps (N,) in the same order;
    `snr` (N,) the targets' signal-to-noise (truth column `snr`), or None for the overall row only.
    Per row: n (stamps measured in both), the median abs(e) of targets and reconstructions, and the
    shape response sum(e_rec . e_true) / sum(e_true . e_true) over both components: 1 when
    reconstructions keep their targets' ellipticities, below 1 when they are rounder.
    Bins are S/N quantiles, so each holds about N / bins stamps.
    """
    et = np.stack([np.asarray(target["e1"], float), np.asarray(target["e2"], float)], axis=1)  # (N, 2)
    er = np.stack([np.asarray(recon["e1"], float), np.asarray(recon["e2"], float)], axis=1)  # (N, 2)
    if et.shape != er.shape:
        raise UsageError(f"target and reconstruction statistics differ in length: {len(et)} and {len(er)}")
    ok = np.isfinite(et).all(axis=1) & np.isfinite(er).all(axis=1)

    def row(sel) -> dict:
        sel = sel & ok
        t, r = et[sel], er[sel]
        denom = float((t * t).sum())
        return {"n": int(sel.sum()),
                "median_abs_e_target": float(np.median(np.hypot(*t.T))) if len(t) else NAN,
                "median_abs_e_reconstruction": float(np.median(np.hypot(*r.T))) if len(r) else NAN,
                "response": float((r * t).sum() / denom) if denom > 0 else NAN}

    out = {"all": row(np.ones(len(et), bool)), "by_snr": []}
    if snr is not None:
        snr = np.asarray(snr, float)
        if snr.shape != (len(et),):
            raise UsageError(f"snr must have one value per stamp ({len(et)}), got shape {snr.shape}")
        good = np.isfinite(snr)
        if good.sum() >= bins:
            edges = np.quantile(snr[good], np.linspace(0, 1, bins + 1))
            for k in range(bins):
                hi_ok = snr <= edges[k + 1] if k == bins - 1 else snr < edges[k + 1]
                r = row(good & (snr >= edges[k]) & hi_ok)
                r.update(snr_min=float(edges[k]), snr_max=float(edges[k + 1]))
                out["by_snr"].append(r)
    return out
