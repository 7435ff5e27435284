"""Synthetic galaxy stamps without GalSim: elliptical Gaussians with Poisson-like noise.

For tests, for the GPU benchmark machine (where GalSim is not installed) and for users who
want a dataset in seconds. The stamps follow the dataset format, with the same truth
conventions as the simulator: e1, e2 are distortions, |e| = (a^2 - b^2) / (a^2 + b^2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cosmolit.dataset import LSST_BANDS, DatasetWriter

# LSST 10-year sky noise per pixel (electrons, sqrt of mean sky level), rounded; see sim/survey.py.
_SKY_SIGMA = {"u": 54.0, "g": 110.0, "r": 240.0, "i": 435.0, "z": 530.0, "y": 540.0}
_PSF_FWHM = {"u": 0.90, "g": 0.86, "r": 0.81, "i": 0.79, "z": 0.77, "y": 0.76}


def synthetic_stamps(n: int, bands: str = LSST_BANDS, size: int = 64, seed: int = 0, noise: bool = True,
                     pixel_scale: float = 0.2):
    """Return (images, clean, truth) for `n` elliptical Gaussian galaxies.

    images, clean: float32 (n, len(bands), size, size), electrons per pixel.
    truth: dict of 1-D arrays (e1, e2, g1, g2, redshift, hlr, mag_i, snr, n_neighbors, blendedness).
    """
    rng = np.random.default_rng(seed)
    e = np.abs(rng.normal(0.0, 0.25, n)).clip(0, 0.8)
    beta = rng.uniform(0, np.pi, n)
    e1, e2 = e * np.cos(2 * beta), e * np.sin(2 * beta)
    sigma = rng.uniform(1.5, 4.0, n)  # pixels, geometric-mean Gaussian sigma
    redshift = rng.uniform(0.1, 2.5, n)
    flux = 10 ** rng.uniform(4.7, 6.5, n)  # electrons in i
    colour = np.stack([np.exp(-((np.arange(len(bands)) - 3 + redshift[k]) ** 2) / 8.0) for k in range(n)])
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2.0
    clean = np.empty((n, len(bands), size, size), np.float32)
    for k in range(n):
        # Moment matrix with distortion e: Q = s^2 [[1+e1, e2],[e2, 1-e1]] / sqrt(1-e^2)
        norm = sigma[k] ** 2 / np.sqrt(1 - e[k] ** 2)
        q11, q22, q12 = norm * (1 + e1[k]), norm * (1 - e1[k]), norm * e2[k]
        det = q11 * q22 - q12**2
        r2 = (q22 * xx**2 - 2 * q12 * xx * yy + q11 * yy**2) / det
        prof = np.exp(-0.5 * r2)
        prof /= prof.sum()
        clean[k] = (flux[k] * colour[k][:, None, None] * prof).astype(np.float32)
    images = clean.copy()
    sky = np.array([_SKY_SIGMA.get(b, 300.0) for b in bands], np.float32)
    if noise:
        images += rng.normal(0.0, 1.0, images.shape).astype(np.float32) * sky[None, :, None, None]
    g = e / (1 + np.sqrt(1 - e**2))
    truth = {
        "e1": e1, "e2": e2,
        "g1": g * np.cos(2 * beta), "g2": g * np.sin(2 * beta),
        "redshift": redshift,
        "hlr": sigma * 1.1774 * pixel_scale,
        "mag_i": 27.81 - 2.5 * np.log10(flux),
        "snr": flux / (sky[min(3, len(bands) - 1)] * np.sqrt(4 * np.pi * sigma**2)),
        "n_neighbors": np.zeros(n, np.int32),
        "blendedness": np.zeros(n),
    }
    return images, clean, truth


def write_synthetic_dataset(path: str | Path, n: int = 64, bands: str = LSST_BANDS, size: int = 64,
                            seed: int = 0, clean: bool = True, noise: bool = True) -> Path:
    """Write `n` synthetic stamps to `path` in the cosmolit dataset format."""
    images, clean_images, truth = synthetic_stamps(n, bands, size, seed, noise)
    attrs = {
        "pixel_scale": 0.2,
        "psf_fwhm": np.array([_PSF_FWHM.get(b, 0.8) for b in bands]),
        "seed": seed,
        "config": f"synthetic: {{n: {n}, size: {size}, seed: {seed}, noise: {str(noise).lower()}}}\n",
        "generator": "cosmolit.synthetic",
    }
    with DatasetWriter(path, n, bands, size, size, list(truth), attrs=attrs, clean=clean,
                       truth_dtypes={"n_neighbors": "i4"}) as w:
        w.write(0, images, truth, clean_images if clean else None)
    return Path(path)
