"""CatSim-format input catalogs (FITS, read with astropy), turned into Galaxy records.

The recipe follows BlendingToolKit's CatSim generator: disk = Exponential(hlr = sqrt(a_d b_d))
sheared to axis ratio q = b_d / a_d at position angle pa_disk [degrees], bulge likewise with
DeVaucouleurs; the flux in each band comes from the band's AB magnitude (u_ab .. y_ab) and is
split between bulge, disk and AGN (a point source) by fluxnorm_bulge / fluxnorm_disk / fluxnorm_agn.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from cosmolit.errors import UsageError
from cosmolit.sim.config import LSST_BANDS
from cosmolit.sim.population import Galaxy

REQUIRED_COLUMNS = (
    "ra", "dec", "redshift", "fluxnorm_bulge", "fluxnorm_disk", "fluxnorm_agn",
    "a_b", "a_d", "b_b", "b_d", "pa_bulge", "pa_disk",
) + tuple(f"{b}_ab" for b in LSST_BANDS)


def _distortion(a: np.ndarray, b: np.ndarray, pa_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distortion (e1, e2) of an ellipse of semi-axes a >= b at position angle pa [degrees]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(a > 0, b / a, 1.0)
    q = np.clip(q, 1e-3, 1.0)
    e = (1 - q**2) / (1 + q**2)
    beta = np.deg2rad(pa_deg)
    return e * np.cos(2 * beta), e * np.sin(2 * beta)


class CatSimCatalog:
    """All rows of a CatSim FITS file as numpy columns; `galaxy(row)` gives a Galaxy."""

    def __init__(self, path: str | Path, mag_i_max: float | None = None):
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"catalog {str(path)!r} does not exist")
        try:
            from astropy.table import Table

            table = Table.read(path, format="fits")
        except Exception as exc:  # astropy raises many kinds for a bad file
            raise UsageError(f"catalog {str(path)!r} cannot be read as a FITS table: {exc}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
        if missing:
            raise UsageError(
                f"catalog {str(path)!r} lacks CatSim column(s) {', '.join(missing)}; "
                f"required: {', '.join(REQUIRED_COLUMNS)}"
            )
        cols = {c: np.asarray(table[c], dtype=float) for c in REQUIRED_COLUMNS}
        finite = np.all([np.isfinite(v) for v in cols.values()], axis=0)
        self.n_rows = len(table)
        mags = np.stack([cols[f"{b}_ab"] for b in LSST_BANDS], axis=1)  # (rows, 6)
        norm = cols["fluxnorm_bulge"] + cols["fluxnorm_disk"] + cols["fluxnorm_agn"]
        ok = finite & (norm > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.frac = np.stack([cols[k] / norm for k in ("fluxnorm_bulge", "fluxnorm_disk", "fluxnorm_agn")], 1)
        self.maggies = 10.0 ** (-0.4 * mags)
        self.hlr_b = np.sqrt(np.clip(cols["a_b"] * cols["b_b"], 0, None))
        self.hlr_d = np.sqrt(np.clip(cols["a_d"] * cols["b_d"], 0, None))
        self.e_b = _distortion(cols["a_b"], cols["b_b"], cols["pa_bulge"])
        self.e_d = _distortion(cols["a_d"], cols["b_d"], cols["pa_disk"])
        self.redshift = cols["redshift"]
        # components without a size are dropped (their flux goes nowhere, as in BTK)
        self.frac[:, 0] = np.where(self.hlr_b > 0, self.frac[:, 0], 0.0)
        self.frac[:, 1] = np.where(self.hlr_d > 0, self.frac[:, 1], 0.0)
        self.usable = np.flatnonzero(ok & (self.frac.sum(1) > 0))
        cut = mags[:, 3] <= mag_i_max if mag_i_max is not None else np.ones(self.n_rows, bool)
        self.targets = np.intersect1d(self.usable, np.flatnonzero(cut))
        if len(self.targets) == 0:
            raise UsageError(
                f"catalog {str(path)!r} has no usable galaxy with i_ab <= {mag_i_max} "
                f"(of {self.n_rows} rows); raise population.mag_i_max"
            )

    def galaxy(self, row: int) -> Galaxy:
        m, (fb, fd, fa) = self.maggies[row], self.frac[row]
        return Galaxy(
            bulge_maggies=m * fb, disk_maggies=m * fd, agn_maggies=m * fa,
            hlr_bulge=float(self.hlr_b[row]), hlr_disk=float(self.hlr_d[row]),
            e_bulge=(float(self.e_b[0][row]), float(self.e_b[1][row])),
            e_disk=(float(self.e_d[0][row]), float(self.e_d[1][row])),
            redshift=float(self.redshift[row]), sed_type=-1, catalog_row=int(row),
        )


@functools.lru_cache(maxsize=4)
def load_catalog(path: str, mag_i_max: float | None) -> CatSimCatalog:
    return CatSimCatalog(path, mag_i_max)
