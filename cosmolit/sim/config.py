"""The simulation configuration: one dataclass tree, loaded strictly from YAML (cosmolit.config).

Every number the simulator uses lives here; CLI options override single fields, and the
resolved tree is stored as YAML text in each dataset's `config` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from cosmolit.config import dump_yaml, from_dict, read_yaml
from cosmolit.errors import UsageError

LSST_BANDS = "ugrizy"


@dataclass
class PSFConfig:
    """Per-band PSF: Kolmogorov of the band's FWHM [arcsec], optionally convolved with an obscured Airy."""

    airy: bool = False
    # per-band FWHM override [arcsec], e.g. {i: 0.65}; bands not named keep the survey value
    fwhm: Optional[dict] = None

    def __post_init__(self):
        for band, value in (self.fwhm or {}).items():
            if band not in LSST_BANDS:
                raise UsageError(f"psf.fwhm: unknown band {band!r}; allowed bands: {', '.join(LSST_BANDS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise UsageError(f"psf.fwhm.{band}: expected a positive number of arcsec, got {value!r}")


@dataclass
class NoiseConfig:
    """Poisson noise of sky + source at `visits` 30-second visits per band (None: 10-year depth)."""

    mode: Literal["poisson", "none"] = "poisson"
    visits: Optional[int] = None

    def __post_init__(self):
        if self.visits is not None and self.visits < 1:
            raise UsageError(f"noise.visits must be a positive integer or null (10-year depth), got {self.visits}")


@dataclass
class PopulationConfig:
    """The embedded galaxy population (sources in README.md and cosmolit/sim/population.py)."""

    mag_i_min: float = 18.0  # brightest i-band AB magnitude drawn
    mag_i_max: float = 25.3  # LSST gold sample limit
    count_slope: float = 0.31  # d log10 N / d m, LSST Science Book eq. 3.7
    sigma_e: float = 0.26  # ellipticity dispersion (distortion, per galaxy)
    e_max: float = 0.85  # largest intrinsic distortion drawn
    size_scatter: float = 0.35  # log-normal scatter (natural log) of the disk half-light radius
    hlr_min: float = 0.1  # [arcsec]
    hlr_max: float = 3.0  # [arcsec]
    z_max: float = 3.5
    disk_only: bool = False  # no bulges (bulge_frac 0): pure exponential disks, e.g. for shape tests

    def __post_init__(self):
        if not self.mag_i_min < self.mag_i_max:
            raise UsageError(f"population: mag_i_min ({self.mag_i_min}) must be below mag_i_max ({self.mag_i_max})")
        if not 0 < self.e_max < 1:
            raise UsageError(f"population.e_max must lie in (0, 1), got {self.e_max}")
        if self.sigma_e <= 0 or self.size_scatter < 0:
            raise UsageError("population: sigma_e must be > 0 and size_scatter >= 0")
        if not 0 < self.hlr_min < self.hlr_max:
            raise UsageError(f"population: need 0 < hlr_min < hlr_max, got {self.hlr_min}, {self.hlr_max}")
        if not 0 < self.z_max <= 4.0:
            raise UsageError(f"population.z_max must lie in (0, 4], got {self.z_max}")


@dataclass
class BlendConfig:
    """Blends: a centred target with 1..max_neighbors neighbours uniform (in area) in an annulus [arcsec]."""

    fraction: float = 0.0
    max_neighbors: int = 3
    min_separation: float = 0.325
    max_separation: float = 1.5

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise UsageError(f"blend fraction must lie in [0, 1], got {self.fraction}")
        if self.max_neighbors < 1:
            raise UsageError(f"max neighbors must be at least 1, got {self.max_neighbors}")
        if not 0.0 <= self.min_separation < self.max_separation:
            raise UsageError(
                f"blend annulus needs 0 <= min_separation < max_separation, got {self.min_separation}, "
                f"{self.max_separation}"
            )


@dataclass
class SimulationConfig:
    """Everything that shapes the simulated stamps (not n, seed or workers: they are arguments)."""

    survey: Literal["LSST"] = "LSST"
    bands: str = LSST_BANDS
    stamp_size: int = 64  # pixels, a positive multiple of 16
    pixel_scale: float = 0.2  # [arcsec / pixel]
    psf: PSFConfig = field(default_factory=PSFConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    catalog: Optional[str] = None  # CatSim FITS file; None: the embedded population
    store_clean: bool = True  # store the noiseless isolated target as `clean`
    store_scene: bool = False  # store the noiseless scene (target + neighbours) as `scene`: fresh noise in training

    def __post_init__(self):
        bad = [b for b in self.bands if b not in LSST_BANDS]
        if not self.bands or bad or len(set(self.bands)) != len(self.bands):
            raise UsageError(
                f"bands {self.bands!r}: use distinct letters among {LSST_BANDS!r}"
                + (f" (unknown: {', '.join(bad)})" if bad else "")
            )
        if self.stamp_size <= 0 or self.stamp_size % 16:
            raise UsageError(f"stamp size must be a positive multiple of 16, got {self.stamp_size}")
        if self.pixel_scale <= 0:
            raise UsageError(f"pixel scale must be positive [arcsec], got {self.pixel_scale}")
        if self.store_scene and self.noise.mode == "none":
            raise UsageError("store_scene keeps the noiseless scene to draw fresh noise from, but noise.mode is "
                             "'none' (the images are the scene already); use noise.mode: poisson or store_scene: false")

    def to_yaml(self) -> str:
        return dump_yaml(self)


def load_simulation_config(path: str | Path | None = None, overrides: dict | None = None) -> SimulationConfig:
    """Defaults, updated by the YAML file at `path`, then by dotted `overrides` ({"blend.fraction": 0.5}).

    None values in `overrides` are skipped. Raises UsageError with one line for any bad key or value.
    """
    data = read_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            sub = node.get(p)
            if sub is None:
                sub = node[p] = {}
            if not isinstance(sub, dict):
                raise UsageError(f"config key {p!r} must be a mapping to set {key}")
            node = sub
        node[leaf] = value
    where = Path(path).name if path is not None else "config"
    return from_dict(SimulationConfig, data, where)


def config_from_yaml_text(text: str) -> SimulationConfig:
    import yaml

    return from_dict(SimulationConfig, yaml.safe_load(text) or {}, "stored config")
