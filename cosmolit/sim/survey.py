"""Survey numbers per band (zero point, sky, exposure, PSF) and the per-band PSF profiles.

Numbers come from surveycodex (LSST.yaml; Ivezic et al. 2019, arXiv:0805.2366), read once per
process and turned into plain floats so that no astropy Quantity enters the drawing loop.
Counts follow surveycodex: electrons = exposure * 10**(-0.4 * (mag - zeropoint)).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cosmolit.sim.config import SimulationConfig

VISIT_SECONDS = 30.0  # one LSST visit: 2 x 15 s


@dataclass(frozen=True)
class BandSurvey:
    band: str
    zeropoint: float  # [mag] giving 1 electron / s
    exposure: float  # [s] actually simulated (10-year total, or visits * 30 s)
    sky_mag: float  # [mag / arcsec^2]
    psf_fwhm: float  # [arcsec]
    wavelength: float  # effective wavelength [nm]
    sky_level: float  # mean sky [electrons / pixel] over `exposure`

    def mag_to_electrons(self, mag):
        return self.exposure * 10.0 ** (-0.4 * (mag - self.zeropoint))


@functools.lru_cache(maxsize=None)
def _survey_table(name: str) -> dict:
    import surveycodex

    survey = surveycodex.get_survey(name)
    table = {
        "mirror_diameter": float(survey.mirror_diameter.to_value("m")),
        "obscuration": float(survey.obscuration.value),
        "bands": {},
    }
    for band in survey.available_filters:
        f = survey.get_filter(band)
        table["bands"][band] = dict(
            zeropoint=float(f.zeropoint.value),
            full_exposure=float(f.full_exposure_time.to_value("s")),
            sky_mag=float(f.sky_brightness.value),
            psf_fwhm=float(f.psf_fwhm.to_value("arcsec")),
            wavelength=float(f.effective_wavelength.to_value("nm")),
        )
    return table


def band_surveys(config: SimulationConfig, bands: str | None = None) -> list[BandSurvey]:
    """BandSurvey for each band of `bands` (default: the config's), with exposure and PSF overrides applied."""
    table = _survey_table(config.survey)
    out = []
    for band in bands or config.bands:
        row = table["bands"][band]
        exposure = row["full_exposure"] if config.noise.visits is None else VISIT_SECONDS * config.noise.visits
        fwhm = float((config.psf.fwhm or {}).get(band, row["psf_fwhm"]))
        sky = exposure * 10.0 ** (-0.4 * (row["sky_mag"] - row["zeropoint"])) * config.pixel_scale**2
        out.append(BandSurvey(band, row["zeropoint"], exposure, row["sky_mag"], fwhm, row["wavelength"], sky))
    return out


def make_psf(config: SimulationConfig, band: BandSurvey):
    """Kolmogorov(FWHM of the band), convolved with an obscured Airy when config.psf.airy is set."""
    import galsim

    psf = galsim.Kolmogorov(fwhm=band.psf_fwhm)
    if config.psf.airy:
        table = _survey_table(config.survey)
        lam_over_diam = band.wavelength * 1e-9 / table["mirror_diameter"] * 206264.80624709636  # [arcsec]
        airy = galsim.Airy(lam_over_diam=lam_over_diam, obscuration=table["obscuration"])
        psf = galsim.Convolve(psf, airy)
    return psf
