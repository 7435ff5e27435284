"""Galaxies: the SED/bandpass flux table and the embedded default population (no download).

Each galaxy is a bulge (DeVaucouleurs, SED CWW_E_ext) plus a disk (Exponential, the SED of its
type), at a redshift, seen through GalSim's LSST bandpasses. Per band, a component is its
achromatic profile scaled by its band flux, so colours carry the redshift.

Distributions of the embedded population (see README.md, "Simulating LSST-like galaxies", for the full list):
- i-band magnitude: number counts log10 N(<i) = const + 0.31 i (LSST Science Book, 2009,
  arXiv:0912.0201, eq. 3.7), from mag_i_min to mag_i_max (25.3, the LSST gold sample).
- redshift given i: p(z) ~ z^2 exp(-z / z0) / (2 z0^3), z0 = 0.0417 i - 0.744 (LSST Science
  Book eq. 3.8), stretched per SED type (early types slightly nearer; our assumption).
- SED type given i: type fractions interpolated between a bright and a faint mix (our assumption,
  following the rise of late types at faint magnitudes).
- size given i: median disk scale length exp(-1.145 - 0.269 (i - 23)) arcsec (Miller et al. 2013,
  MNRAS 429, 2858, lensfit prior), half-light radius = 1.678 scale length, log-normal scatter.
- bulge fraction (of the i-band flux) given type; intrinsic distortion |e| with density
  ~ e (1 - e^2)^2 exp(-e^2 / 2 sigma^2), sigma = 0.26 (form of Bernstein & Jarvis 2002, AJ 123, 583),
  uniform position angle; bulge and disk share the shape, so the truth e is exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from cosmolit.sim.config import LSST_BANDS, PopulationConfig

SED_NAMES = ("CWW_E_ext", "CWW_Sbc_ext", "CWW_Scd_ext", "CWW_Im_ext")
BULGE_SED = 0  # bulges always have the elliptical template
Z_GRID = np.round(np.arange(0.0, 4.0 + 1e-9, 0.01), 6)  # redshift grid of the flux table

# type mix at the bright (mag_i_min) and faint (mag_i_max) ends, types in SED_NAMES order
_TYPE_MIX_BRIGHT = np.array([0.35, 0.35, 0.20, 0.10])
_TYPE_MIX_FAINT = np.array([0.10, 0.25, 0.35, 0.30])
_Z_STRETCH = np.array([0.85, 0.95, 1.05, 1.15])  # z0 factor per type
_BULGE_FRAC_RANGE = np.array([[0.6, 1.0], [0.15, 0.5], [0.0, 0.2], [0.0, 0.0]])  # i-band B/T per type
_BULGE_HLR_RATIO = (0.3, 0.7)  # bulge hlr / disk hlr, uniform


@functools.lru_cache(maxsize=None)
def load_seds_and_bandpasses():
    """GalSim's shipped CWW SEDs (Angstrom, f_lambda) and LSST bandpasses (nm), as dicts."""
    import galsim

    seds = {name: galsim.SED(f"{name}.sed", wave_type="Ang", flux_type="flambda") for name in SED_NAMES}
    bandpasses = {b: galsim.Bandpass(f"LSST_{b}.dat", wave_type="nm") for b in LSST_BANDS}
    return seds, bandpasses


@functools.lru_cache(maxsize=None)
def flux_table() -> np.ndarray:
    """(n_sed, n_z, 6) band fluxes in AB maggies per unit SED normalisation, on Z_GRID.

    maggies = sed.calculateFlux(bandpass) * 10**(-0.4 * AB zero point of the bandpass), so that
    -2.5 log10(maggies) is the AB magnitude. Computed once per process (~0.2 s).
    """
    seds, bandpasses = load_seds_and_bandpasses()
    ab_zp = np.array([bandpasses[b].withZeropoint("AB").zeropoint for b in LSST_BANDS])
    table = np.empty((len(SED_NAMES), len(Z_GRID), len(LSST_BANDS)))
    for s, name in enumerate(SED_NAMES):
        for k, z in enumerate(Z_GRID):
            sed = seds[name].atRedshift(float(z))
            table[s, k] = [sed.calculateFlux(bandpasses[b]) for b in LSST_BANDS]
    return table * 10.0 ** (-0.4 * ab_zp)


def band_fluxes(sed_index: int, z: float) -> np.ndarray:
    """(6,) interpolated band fluxes (AB maggies per unit SED normalisation), linear in log flux."""
    logt = np.log(flux_table()[sed_index])  # (n_z, 6)
    k = int(np.clip(np.searchsorted(Z_GRID, z) - 1, 0, len(Z_GRID) - 2))
    w = (z - Z_GRID[k]) / (Z_GRID[k + 1] - Z_GRID[k])
    return np.exp((1 - w) * logt[k] + w * logt[k + 1])


def exact_band_fluxes(sed_index: int, z: float) -> np.ndarray:
    """(6,) the same as band_fluxes computed exactly with calculateFlux (for tests)."""
    seds, bandpasses = load_seds_and_bandpasses()
    sed = seds[SED_NAMES[sed_index]].atRedshift(float(z))
    ab_zp = np.array([bandpasses[b].withZeropoint("AB").zeropoint for b in LSST_BANDS])
    return np.array([sed.calculateFlux(bandpasses[b]) for b in LSST_BANDS]) * 10.0 ** (-0.4 * ab_zp)


@dataclass
class Galaxy:
    """One galaxy's parameters; fluxes are AB maggies in the six LSST bands (ugrizy)."""

    bulge_maggies: np.ndarray  # (6,)
    disk_maggies: np.ndarray  # (6,)
    agn_maggies: np.ndarray  # (6,) point source (CatSim AGN), zeros otherwise
    hlr_bulge: float  # [arcsec]
    hlr_disk: float  # [arcsec]
    e_bulge: tuple  # (e1, e2) distortion
    e_disk: tuple  # (e1, e2) distortion
    redshift: float
    sed_type: int  # index in SED_NAMES, -1 for catalog galaxies
    catalog_row: int = -1

    @property
    def total_maggies(self) -> np.ndarray:
        return self.bulge_maggies + self.disk_maggies + self.agn_maggies

    @property
    def mags(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return -2.5 * np.log10(self.total_maggies)

    def bulge_frac(self, band: int = 3) -> float:
        total = self.total_maggies[band]
        return float(self.bulge_maggies[band] / total) if total > 0 else float("nan")

    def truth_shape(self, band: int = 3) -> tuple[float, float]:
        """(e1, e2): flux-weighted (band `band`) mean of the component distortions."""
        wb, wd = self.bulge_maggies[band], self.disk_maggies[band]
        if wb + wd <= 0:
            return 0.0, 0.0
        return tuple(float((wb * b + wd * d) / (wb + wd)) for b, d in zip(self.e_bulge, self.e_disk))

    def hlr(self, band: int = 3) -> float:
        """Flux-weighted (band `band`) mean of the component half-light radii [arcsec]."""
        wb, wd = self.bulge_maggies[band], self.disk_maggies[band]
        return float((wb * self.hlr_bulge + wd * self.hlr_disk) / (wb + wd)) if wb + wd > 0 else 0.0


@functools.lru_cache(maxsize=None)
def _e_inverse_cdf(sigma: float, e_max: float) -> tuple[np.ndarray, np.ndarray]:
    e = np.linspace(0.0, e_max, 4097)
    pdf = e * (1 - e**2) ** 2 * np.exp(-(e**2) / (2 * sigma**2))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(e))])
    return cdf / cdf[-1], e


class EmbeddedPopulation:
    """Draws Galaxy records from the default distributions with a numpy Generator."""

    def __init__(self, config: PopulationConfig):
        self.cfg = config
        flux_table()  # build the table now, not inside the first stamp

    def sample_mag_i(self, rng: np.random.Generator) -> float:
        a, lo, hi = self.cfg.count_slope * np.log(10.0), self.cfg.mag_i_min, self.cfg.mag_i_max
        # inverse CDF of p(m) ~ exp(a m) on [lo, hi]
        u = rng.uniform()
        return float(lo + np.log1p(u * np.expm1(a * (hi - lo))) / a)

    def sample(self, rng: np.random.Generator, mag_i: float | None = None) -> Galaxy:
        cfg = self.cfg
        m = self.sample_mag_i(rng) if mag_i is None else float(mag_i)
        t = np.clip((m - cfg.mag_i_min) / (cfg.mag_i_max - cfg.mag_i_min), 0.0, 1.0)
        mix = (1 - t) * _TYPE_MIX_BRIGHT + t * _TYPE_MIX_FAINT
        sed_type = int(rng.choice(len(SED_NAMES), p=mix / mix.sum()))
        z0 = max(0.0417 * m - 0.744, 0.05) * _Z_STRETCH[sed_type]
        z = float(np.clip(rng.gamma(3.0, z0), 0.01, cfg.z_max))
        lo, hi = _BULGE_FRAC_RANGE[sed_type]
        bf = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
        bf = 0.0 if cfg.disk_only else bf  # the draw above still happens: same stream either way
        r_d = np.exp(-1.145 - 0.269 * (m - 23.0)) * 1.678  # median disk hlr [arcsec]
        hlr_d = float(np.clip(r_d * np.exp(cfg.size_scatter * rng.standard_normal()), cfg.hlr_min, cfg.hlr_max))
        hlr_b = float(max(hlr_d * rng.uniform(*_BULGE_HLR_RATIO), 0.05))
        cdf, grid = _e_inverse_cdf(cfg.sigma_e, cfg.e_max)
        e = float(np.interp(rng.uniform(), cdf, grid))
        beta = rng.uniform(0.0, np.pi)
        shape = (e * np.cos(2 * beta), e * np.sin(2 * beta))
        # component fluxes: bulge (E template) and disk (type template), normalised in i
        fi = 10.0 ** (-0.4 * m)
        fb, fd = band_fluxes(BULGE_SED, z), band_fluxes(sed_type, z)
        bulge = fb * (bf * fi / fb[3])
        disk = fd * ((1 - bf) * fi / fd[3])
        return Galaxy(bulge, disk, np.zeros(6), hlr_b, hlr_d, shape, shape, z, sed_type)
