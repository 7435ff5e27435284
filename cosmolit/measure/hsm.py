"""Classical shape measurement with GalSim's HSM module: the baseline the networks are compared with.

For every stamp, one band is measured with `galsim.hsm.EstimateShear` (PSF-corrected):

- REGAUSS (Hirata & Seljak 2003) returns `corrected_e1/e2`, a distortion, |e| = (a^2-b^2)/(a^2+b^2);
- KSB (Kaiser, Squires & Broadhurst 1995) returns `corrected_g1/g2`, a reduced shear,
  |g| = (a-b)/(a+b); it is converted here to a distortion, e = 2 g / (1 + |g|^2), so that both
  are compared with the distortion truth of cosmolit datasets.

The PSF image is the PSF that drew the stamps, rebuilt from a cosmolit.sim file's stored
configuration (`psf_for_dataset`: Kolmogorov of the file's FWHM, convolved with the obscured Airy
of the `airy` preset), or `galsim.Kolmogorov(fwhm=psf_fwhm)` for other files, drawn at the file's
pixel scale. The sky
variance, unless given, is estimated per stamp from the outer frame of pixels (robust: MAD).
A failed measurement (error message set, -10 sentinels, non-finite values) is flagged, never
dropped: ok is False and e1, e2 are NaN.

GalSim is imported inside the functions only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cosmolit.errors import UsageError

METHODS = ("REGAUSS", "KSB")
BORDER = 4  # pixels of the outer frame used to estimate the sky variance


def g_to_e(g1, g2) -> tuple[np.ndarray, np.ndarray]:
    """Reduced shear (g1, g2) -> distortion (e1, e2): e = 2 g / (1 + |g|^2)."""
    g1, g2 = np.asarray(g1, dtype=np.float64), np.asarray(g2, dtype=np.float64)
    f = 2.0 / (1.0 + g1**2 + g2**2)
    return f * g1, f * g2


def e_to_g(e1, e2) -> tuple[np.ndarray, np.ndarray]:
    """Distortion (e1, e2) -> reduced shear: g = e / (1 + sqrt(1 - |e|^2))."""
    e1, e2 = np.asarray(e1, dtype=np.float64), np.asarray(e2, dtype=np.float64)
    f = 1.0 / (1.0 + np.sqrt(np.clip(1.0 - e1**2 - e2**2, 0, None)))
    return f * e1, f * e2


def border_sky_var(stamps: np.ndarray, width: int = BORDER) -> np.ndarray:
    """Robust per-stamp noise variance from the outer `width` pixels: (1.4826 MAD)^2. stamps (N, H, W)."""
    stamps = np.asarray(stamps, dtype=np.float64)
    h, w = stamps.shape[-2:]
    width = max(1, min(width, h // 4, w // 4))
    mask = np.zeros((h, w), bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    frame = stamps[:, mask]  # (N, n_border)
    med = np.median(frame, axis=1, keepdims=True)
    mad = np.median(np.abs(frame - med), axis=1)
    return (1.4826 * mad) ** 2


def psf_image(psf_fwhm: float, pixel_scale: float, size: int):
    """A size x size galsim.Image of a Kolmogorov PSF of FWHM `psf_fwhm` [arcsec] at `pixel_scale` [arcsec/pix]."""
    import galsim

    return galsim.Kolmogorov(fwhm=float(psf_fwhm)).drawImage(nx=size, ny=size, scale=float(pixel_scale))


def psf_for_dataset(info, band: str):
    """(galsim profile, description) of the PSF of `band` in a dataset (cosmolit.dataset.DatasetInfo):
    rebuilt from its stored simulation config (cosmolit.sim.survey.make_psf) at the file's own
    psf_fwhm; Kolmogorov(psf_fwhm) when the file has no cosmolit simulation config (another tool's,
    cosmolit.synthetic), which the description says."""
    import dataclasses

    import galsim

    fwhm = float(info.psf_fwhm[info.bands.index(band)])
    if not (np.isfinite(fwhm) and fwhm > 0):
        raise UsageError(f"dataset {info.path!r} has no positive psf_fwhm for band {band} ({fwhm}); the HSM baseline "
                         "needs it: add the attribute or pass --no-hsm")
    why = "the file stores no simulation config"
    if str(info.config).strip():
        try:
            from cosmolit.sim.config import config_from_yaml_text
            from cosmolit.sim.survey import band_surveys, make_psf

            cfg = config_from_yaml_text(info.config)
            survey = dataclasses.replace(band_surveys(cfg, band)[0], psf_fwhm=fwhm)
            what = "convolved with the obscured Airy of the telescope" if cfg.psf.airy else "alone"
            return make_psf(cfg, survey), f"Kolmogorov FWHM {fwhm:.3f} arcsec {what}, rebuilt from the file's config"
        except Exception:  # not a cosmolit.sim config (another generator, an older or newer cosmolit)
            why = "the file's config is not a cosmolit simulation config"
    return galsim.Kolmogorov(fwhm=fwhm), f"Kolmogorov FWHM {fwhm:.3f} arcsec, assumed ({why})"


def _check_args(images, bands: str, band: str, psf_fwhm, pixel_scale, methods) -> tuple[np.ndarray, int, list[str]]:
    images = np.asarray(images)
    if images.ndim != 4:
        raise UsageError(f"HSM needs images of shape (N, bands, H, W), got shape {images.shape}")
    if len(bands) != images.shape[1]:
        raise UsageError(f"bands {bands!r} name {len(bands)} bands but the images have {images.shape[1]} channels")
    if len(band) != 1 or band not in bands:
        raise UsageError(f"HSM band {band!r} is not one of the dataset's bands {bands!r}")
    if not (np.isfinite(psf_fwhm) and psf_fwhm > 0):
        raise UsageError(f"HSM needs a positive PSF FWHM in arcsec for band {band}, got {psf_fwhm}")
    if not (np.isfinite(pixel_scale) and pixel_scale > 0):
        raise UsageError(f"HSM needs a positive pixel scale in arcsec, got {pixel_scale}")
    methods = [str(m).upper() for m in methods]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"HSM method(s) {', '.join(bad) or '(none)'} not supported; choose from {', '.join(METHODS)}")
    return images, bands.index(band), methods


def run_hsm(images, bands: str, band: str, psf_fwhm: float, pixel_scale: float,
            methods: Sequence[str] = METHODS, sky_var=None, progress: bool = True, psf=None) -> dict[str, dict]:
    """PSF-corrected ellipticities of every stamp in one band, per method.

    images: (N, B, H, W) electrons; bands: the letters of the B channels; band: the one measured;
    psf_fwhm [arcsec] and pixel_scale [arcsec/pixel]: the Kolmogorov PSF model of that band, unless
    `psf` (a galsim profile, e.g. from psf_for_dataset) is given;
    sky_var: None (estimated per stamp from the border), a float, or an (N,) array [electrons^2].

    Returns {method: {"e1": (N,), "e2": (N,), "ok": (N,) bool, "message": list of str}};
    e1, e2 are distortions (KSB's reduced shear converted), NaN where the measurement failed.
    """
    import galsim

    from cosmolit.progress import progress_bar

    images, b, methods = _check_args(images, bands, band, psf_fwhm, pixel_scale, methods)
    n, _, h, w = images.shape
    stamps = images[:, b].astype(np.float64)  # (N, H, W)
    if sky_var is None:
        var = border_sky_var(stamps)
    else:
        var = np.broadcast_to(np.asarray(sky_var, dtype=np.float64), (n,)).copy()
        if (~np.isfinite(var)).any() or (var < 0).any():
            raise UsageError("sky_var must be finite and >= 0 (electrons^2 per pixel)")
    if psf is None:
        psf = psf_image(psf_fwhm, pixel_scale, max(h, w))
    else:
        psf = psf.drawImage(nx=max(h, w), ny=max(h, w), scale=float(pixel_scale))
    out = {m: {"e1": np.full(n, np.nan), "e2": np.full(n, np.nan), "ok": np.zeros(n, bool), "message": [""] * n}
           for m in methods}
    with progress_bar(n, f"HSM {'+'.join(methods)} ({band} band)", enabled=progress) as advance:
        for k in range(n):
            stamp = stamps[k]
            gal = galsim.Image(np.ascontiguousarray(stamp), scale=float(pixel_scale))
            for m in methods:
                res = out[m]
                if not np.isfinite(stamp).all():
                    res["message"][k] = "non-finite pixels"
                    continue
                try:
                    r = galsim.hsm.EstimateShear(gal, psf, sky_var=float(var[k]), shear_est=m, strict=False)
                except (galsim.GalSimError, RuntimeError, ValueError) as exc:  # defensive: strict=False should not raise
                    res["message"][k] = f"{type(exc).__name__}: {exc}"
                    continue
                if r.error_message:
                    res["message"][k] = str(r.error_message).strip().splitlines()[0] if r.error_message.strip() else "failed"
                    continue
                if m == "KSB":
                    a1, a2 = r.corrected_g1, r.corrected_g2
                else:
                    a1, a2 = r.corrected_e1, r.corrected_e2
                if not (np.isfinite(a1) and np.isfinite(a2)) or a1 <= -10 or a2 <= -10:
                    res["message"][k] = "invalid values"
                    continue
                if m == "KSB":
                    a1, a2 = g_to_e(a1, a2)
                res["e1"][k], res["e2"][k], res["ok"][k] = float(a1), float(a2), True
            advance(1)
    return out


def failure_summary(result: dict) -> dict:
    """{n, n_failed, failure_rate, messages: {message: count}} of one method's run_hsm result."""
    ok = np.asarray(result["ok"], bool)
    counts: dict[str, int] = {}
    for msg, good in zip(result.get("message", [""] * ok.size), ok):
        if not good:
            key = (msg or "failed")[:120]
            counts[key] = counts.get(key, 0) + 1
    n = int(ok.size)
    return {"n": n, "n_failed": int((~ok).sum()), "failure_rate": float((~ok).mean()) if n else float("nan"),
            "messages": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])}
