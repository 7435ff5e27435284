"""HSM, run on the simulator's own files as `cosmolit evaluate` runs it, recovers the truth columns.

The truth e1, e2 of cosmolit datasets are distortions, |e| = (a^2 - b^2)/(a^2 + b^2), of the
intrinsic (pre-PSF) galaxy; REGAUSS returns a PSF-corrected distortion and KSB a reduced shear that
run_hsm converts to a distortion. On bright, resolved, noiseless, isolated galaxies both must match.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

pytest.importorskip("galsim")

from cosmolit.dataset import inspect_dataset, read_truth  # noqa: E402
from cosmolit.measure.hsm import run_hsm  # noqa: E402
from cosmolit.sim import load_simulation_config, simulate_to_file  # noqa: E402


@pytest.fixture(scope="module")
def bright_file(tmp_path_factory):
    """12 bright (i < 21), resolved (disk hlr 0.8 to 1.2 arcsec), noiseless, isolated galaxies in r and i."""
    cfg = load_simulation_config(None, {"stamp_size": 64, "bands": "ri", "noise.mode": "none",
                                        "population.mag_i_max": 21.0, "population.hlr_min": 0.8,
                                        "population.hlr_max": 1.2, "population.e_max": 0.6})
    path = tmp_path_factory.mktemp("hsm") / "bright.h5"
    return simulate_to_file(cfg, path, n=12, seed=7, progress=False)


@pytest.mark.parametrize("method, tol", [("REGAUSS", 0.01), ("KSB", 0.015)])
def test_hsm_recovers_the_simulated_distortions(bright_file, method, tol):
    info = inspect_dataset(bright_file)
    truth = read_truth(bright_file)
    with h5py.File(bright_file, "r") as f:
        images = f["images"][:]
    assert info.bands == "ri" and np.all(truth["is_blend"] == 0)
    # bulges and disks alike, shapes spread over both signs of both components, so a swapped axis,
    # a flipped sign or a wrong convention cannot pass
    assert truth["bulge_frac"].max() > 0.5
    assert truth["e1"].min() < -0.1 < 0.1 < truth["e1"].max() and truth["e2"].min() < -0.1 < 0.1 < truth["e2"].max()
    fwhm = float(info.psf_fwhm[info.bands.index("i")])  # the file's own PSF model of the band
    res = run_hsm(images, info.bands, "i", fwhm, info.pixel_scale, methods=(method,), progress=False)[method]
    assert res["ok"].all(), res["message"]
    err = np.hypot(res["e1"] - truth["e1"], res["e2"] - truth["e2"])
    assert err.max() < tol, (method, err)
    # the reduced-shear columns differ from the distortions by more than the tolerance: HSM matches e, not g
    assert np.hypot(res["e1"] - truth["g1"], res["e2"] - truth["g2"]).max() > 5 * tol
