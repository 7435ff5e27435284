"""Scientific-evaluation metrics: shear bias, calibration, AUROC, HSM baseline, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cosmolit.errors import UsageError
from cosmolit.measure.bias import bin_edges, binned_bias, redshift_metrics, shear_bias
from cosmolit.measure.calibration import auroc, calibration_metrics, coverage, gaussian_nll


# ---------------------------------------------------------------- shear bias
@pytest.mark.parametrize("m_true,c_true", [(0.0, 0.0), (0.05, 0.01), (-0.2, -0.003)])
def test_shear_bias_recovers_m_and_c(m_true, c_true):
    rng = np.random.default_rng(1)
    true = rng.normal(0, 0.3, 4000)
    pred = (1 + m_true) * true + c_true + rng.normal(0, 0.05, true.size)
    res = shear_bias(pred, true)
    assert res["n"] == 4000
    assert abs(res["m"] - m_true) < 4 * res["m_err"]
    assert abs(res["c"] - c_true) < 4 * res["c_err"]
    # standard errors of the right size: sigma / (sqrt(n) std(true)) and sigma / sqrt(n)
    assert res["m_err"] == pytest.approx(0.05 / (np.sqrt(4000) * 0.3), rel=0.1)
    assert res["c_err"] == pytest.approx(0.05 / np.sqrt(4000), rel=0.1)
    assert res["rmse"] == pytest.approx(np.sqrt(np.mean((pred - true) ** 2)))


def test_shear_bias_errors_are_honest():
    """Over many realisations, |m - m_true| < m_err about 68% of the time."""
    rng = np.random.default_rng(7)
    hits_m = hits_c = 0
    reps = 300
    for _ in range(reps):
        true = rng.uniform(-0.5, 0.5, 200)
        pred = 1.02 * true - 0.004 + rng.normal(0, 0.03, 200)
        r = shear_bias(pred, true)
        hits_m += abs(r["m"] - 0.02) < r["m_err"]
        hits_c += abs(r["c"] + 0.004) < r["c_err"]
    assert 0.6 < hits_m / reps < 0.76
    assert 0.6 < hits_c / reps < 0.76


def test_shear_bias_drops_nan_and_degenerate_cases():
    true = np.array([0.1, 0.2, np.nan, 0.3, 0.4])
    pred = np.array([0.1, np.nan, 0.5, 0.3, 0.4])
    res = shear_bias(pred, true)
    assert res["n"] == 3 and res["m"] == pytest.approx(0.0, abs=1e-12)
    few = shear_bias(np.array([0.1, 0.2]), np.array([0.1, 0.2]))
    assert few["n"] == 2 and np.isnan(few["m"]) and few["rmse"] == 0.0
    with pytest.raises(UsageError):
        shear_bias(np.zeros(3), np.zeros(4))


def test_redshift_metrics():
    true = np.array([0.5, 1.0, 2.0, 1.5])
    pred = true + np.array([0.0, 0.1, -0.9, 0.0])
    res = redshift_metrics(pred, true)
    assert res["bias"] == pytest.approx(-0.2)
    assert res["outlier_frac"] == pytest.approx(0.25)  # |-0.9| / 3 = 0.3 > 0.15
    assert res["rmse"] == pytest.approx(np.sqrt((0.01 + 0.81) / 4))


def test_binned_bias_finds_bias_in_one_bin():
    rng = np.random.default_rng(3)
    x = rng.uniform(20, 25, 3000)
    true = rng.normal(0, 0.3, x.size)
    m = np.where(x > 24, 0.1, 0.0)
    pred = (1 + m) * true + rng.normal(0, 0.01, x.size)
    edges = bin_edges(x, n_bins=5)
    b = binned_bias(pred, true, x, edges)
    assert len(b["m"]) == 5 and sum(b["n"]) == x.size
    assert abs(b["m"][-1] - 0.1) < 5 * b["m_err"][-1]
    assert all(abs(v) < 5 * e for v, e in zip(b["m"][:3], b["m_err"][:3]))
    assert bin_edges(np.zeros(100)) is None


# ---------------------------------------------------------------- calibration
def _correlated_gaussian(n, rng, scale=1.0):
    sig = rng.uniform(0.02, 0.1, (n, 2))
    rho = rng.uniform(-0.6, 0.6, n)
    cov = np.empty((n, 2, 2))
    cov[:, 0, 0], cov[:, 1, 1] = sig[:, 0] ** 2, sig[:, 1] ** 2
    cov[:, 0, 1] = cov[:, 1, 0] = rho * sig[:, 0] * sig[:, 1]
    y = rng.normal(0, 0.3, (n, 2))
    noise = np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.normal(size=(n, 2)))
    return y, y + scale * noise, cov


def test_coverage_of_calibrated_predictions():
    rng = np.random.default_rng(11)
    y, mean, cov = _correlated_gaussian(20000, rng)
    res = calibration_metrics(y, mean, cov, ["e1", "e2"])
    for name in ("e1", "e2"):
        assert res["per_target"][name]["coverage_68"] == pytest.approx(0.6827, abs=0.015)
        assert res["per_target"][name]["coverage_95"] == pytest.approx(0.9545, abs=0.008)
        assert res["per_target"][name]["pull_std"] == pytest.approx(1.0, abs=0.03)
    curve = res["calibration_curve"]
    assert np.allclose(curve["observed"]["e1"], curve["levels"], atol=0.02)
    # over-dispersed errors (2x the claimed sigma) are detected
    y2, mean2, cov2 = _correlated_gaussian(5000, rng, scale=2.0)
    bad = calibration_metrics(y2, mean2, cov2, ["e1", "e2"])
    assert bad["coverage_68"] < 0.45 and bad["nll"] > res["nll"]


def test_nll_matches_scipy():
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(5)
    n, t = 50, 3
    a = rng.normal(size=(n, t, t))
    cov = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(t)
    y, mean = rng.normal(size=(n, t)), rng.normal(size=(n, t))
    nll = gaussian_nll(y, mean, cov)
    ref = np.array([-multivariate_normal(mean[k], cov[k]).logpdf(y[k]) for k in range(n)])
    assert np.allclose(nll, ref, rtol=1e-10, atol=1e-10)
    # a covariance that is not positive definite gives NaN for that galaxy only
    cov[0] = -np.eye(t)
    nll = gaussian_nll(y, mean, cov)
    assert np.isnan(nll[0]) and np.allclose(nll[1:], ref[1:])


def test_auroc_perfect_random_reversed():
    rng = np.random.default_rng(2)
    labels = rng.uniform(size=4000) < 0.3
    perfect = labels + rng.uniform(0, 0.5, labels.size)
    assert auroc(perfect, labels) == 1.0
    assert auroc(-perfect, labels) == 0.0
    assert auroc(rng.uniform(size=labels.size), labels) == pytest.approx(0.5, abs=0.03)
    assert auroc(np.ones(labels.size), labels) == 0.5  # all ties
    assert np.isnan(auroc(np.arange(5.0), np.zeros(5, bool)))


def test_calibration_metrics_epistemic_auroc_and_spearman():
    rng = np.random.default_rng(4)
    n = 2000
    blend = rng.uniform(size=n) < 0.4
    sigma = np.where(blend, 0.1, 0.03) * rng.uniform(0.8, 1.2, n)
    y = rng.normal(0, 0.3, (n, 2))
    mean = y + sigma[:, None] * rng.normal(size=(n, 2))
    cov = sigma[:, None, None] ** 2 * np.eye(2)
    res = calibration_metrics(y, mean, cov, ["e1", "e2"], epistemic_sigma=sigma, is_blend=blend)
    assert res["auroc_epistemic_blend"] > 0.95
    assert res["spearman_sigma_error"] > 0.2
    only_isolated = calibration_metrics(y, mean, cov, ["e1", "e2"], epistemic_sigma=sigma,
                                        is_blend=np.zeros(n, bool))
    assert "auroc_epistemic_blend" not in only_isolated
    with pytest.raises(UsageError):
        calibration_metrics(y, mean, cov[:, :1, :1], ["e1", "e2"])
    assert coverage([0.0], [0.0], [0.0], 0.68) != coverage([0.0], [0.0], [0.0], 0.68)  # NaN: no valid sigma


# ---------------------------------------------------------------- HSM
def _galsim_stamps(shapes, size=48, fwhm=0.79, scale=0.2):
    galsim = pytest.importorskip("galsim")
    stamps = []
    for e1, e2 in shapes:
        gal = galsim.Exponential(half_light_radius=0.6, flux=1e5).shear(e1=e1, e2=e2)
        im = galsim.Convolve(gal, galsim.Kolmogorov(fwhm=fwhm)).drawImage(nx=size, ny=size, scale=scale).array
        stamps.append(np.stack([0.5 * im, im]))  # (2, H, W): bands "ri"
    return np.asarray(stamps, np.float32)


def test_run_hsm_recovers_noiseless_shapes():
    from cosmolit.measure.hsm import run_hsm

    shapes = [(0.2, -0.1), (-0.3, 0.15), (0.0, 0.4), (0.05, 0.05)]
    res = run_hsm(_galsim_stamps(shapes), "ri", "i", 0.79, 0.2, progress=False)
    truth = np.array(shapes)
    for method in ("REGAUSS", "KSB"):
        r = res[method]
        assert r["ok"].all()
        assert np.abs(r["e1"] - truth[:, 0]).max() < 0.02, method
        assert np.abs(r["e2"] - truth[:, 1]).max() < 0.02, method


def test_g_to_e_matches_galsim():
    galsim = pytest.importorskip("galsim")
    from cosmolit.measure.hsm import e_to_g, g_to_e

    s = galsim.Shear(e1=0.3, e2=-0.45)
    assert np.allclose(g_to_e(s.g1, s.g2), (0.3, -0.45))
    assert np.allclose(e_to_g(0.3, -0.45), (s.g1, s.g2))


def test_run_hsm_counts_failures():
    from cosmolit.measure.hsm import failure_summary, run_hsm

    good = _galsim_stamps([(0.1, 0.0)])
    blank = np.zeros_like(good)
    nan = good.copy()
    nan[0, 1, 3, 3] = np.nan
    images = np.concatenate([good, blank, nan, good])
    res = run_hsm(images, "ri", "i", 0.79, 0.2, methods=("REGAUSS",), sky_var=1.0, progress=False)
    r = res["REGAUSS"]
    assert r["ok"].tolist() == [True, False, False, True]
    assert np.isnan(r["e1"][1]) and np.isnan(r["e2"][2])
    s = failure_summary(r)
    assert s["n_failed"] == 2 and s["failure_rate"] == 0.5 and sum(s["messages"].values()) == 2
    with pytest.raises(UsageError, match="band"):
        run_hsm(images, "ri", "z", 0.79, 0.2, progress=False)
    with pytest.raises(UsageError, match="method"):
        run_hsm(images, "ri", "i", 0.79, 0.2, methods=("BOGUS",), progress=False)


def test_border_sky_var():
    from cosmolit.measure.hsm import border_sky_var

    rng = np.random.default_rng(0)
    stamps = rng.normal(0, 3.0, (20, 40, 40))
    stamps[:, 15:25, 15:25] += 1e4  # a bright source in the centre does not bias the estimate
    assert np.median(border_sky_var(stamps)) == pytest.approx(9.0, rel=0.1)


# ---------------------------------------------------------------- reports
def _strict_json(path):
    def _bad(token):
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=_bad)


def _info(n, bands, size, path="synthetic.h5", psf_fwhm=(0.86, 0.81, 0.79)):
    from cosmolit.dataset import DatasetInfo

    return DatasetInfo(path=path, n=n, bands=bands, height=size, width=size, pixel_scale=0.2,
                       psf_fwhm=list(psf_fwhm)[: len(bands)], seed=9, config="", truth_names=[],
                       has_clean=True, format_version=1, cosmolit_version="0.1.0")


def _simulated_bright(n, seed):
    """The simulator's noiseless, bright, resolved gri 32x32 stamps (PSF-convolved), with their truth and PSFs."""
    pytest.importorskip("galsim")
    from cosmolit.sim import draw_stamps, load_simulation_config
    from cosmolit.sim.survey import band_surveys

    cfg = load_simulation_config(None, {"stamp_size": 32, "bands": "gri", "noise.mode": "none",
                                        "population.mag_i_max": 22.0, "population.hlr_min": 0.4,
                                        "population.hlr_max": 0.7})
    images, _, truth = draw_stamps(cfg, n, seed=seed)
    return images, truth, [b.psf_fwhm for b in band_surveys(cfg)]


def test_evaluate_shapes_writes_required_keys(tmp_path):
    from cosmolit.measure.report import evaluate_shapes

    n, names = 60, ["e1", "e2", "redshift"]
    images, truth, psf_fwhm = _simulated_bright(n, seed=9)
    rng = np.random.default_rng(0)
    truth["is_blend"] = (np.arange(n) % 3 == 0).astype(np.int32)
    y = np.stack([truth[t] for t in names], 1)
    sig = np.array([0.05, 0.05, 0.1])
    mean = y + rng.normal(size=y.shape) * sig
    mean[0, 0] = np.nan  # a NaN prediction is dropped, not fatal
    cov = np.broadcast_to(np.diag(sig**2), (n, 3, 3)).copy()
    eps = cov * np.where(truth["is_blend"] > 0, 4.0, 1.0)[:, None, None]
    out = tmp_path / "eval"
    m = evaluate_shapes(out, y, mean, cov, names, truth, iter([images[:25], images[25:]]),
                        _info(n, "gri", 32, psf_fwhm=psf_fwhm), "bnn", epistemic_cov=eps, progress=False)
    disk = _strict_json(out / "metrics.json")
    assert disk == m
    for name in ("e1", "e2"):
        assert set(disk[name]) >= {"rmse", "m", "m_err", "c", "c_err"}
    assert disk["e1"]["n"] == n - 1 and disk["e2"]["n"] == n
    assert set(disk["redshift"]) >= {"rmse", "bias", "sigma_nmad", "outlier_frac"}
    # HSM on the i band of bright, noiseless, PSF-convolved stamps recovers the truth (KSB less closely)
    for key, tol in (("hsm_regauss", 0.01), ("hsm_ksb", 0.02)):
        h = disk[key]
        assert h["n"] == n and h["n_failed"] == 0 and h["failure_rate"] == 0.0 and h["n_abs_e_gt_1"] == 0
        assert h["band"] == "i" and h["psf"].startswith("Kolmogorov FWHM 0.790 arcsec")
        for t in ("e1", "e2"):
            assert h[t]["n"] == n and h[t]["rmse"] < tol, (key, t, h[t])
            assert abs(h[t]["m"]) < 0.05 and abs(h[t]["c"]) < 0.01, (key, t, h[t])
        # the network's figures on the same (all measured) galaxies: those of its predictions
        assert h["network"]["e2"]["rmse"] == pytest.approx(np.sqrt(np.mean((mean[:, 1] - y[:, 1]) ** 2)))
    for key in ("coverage_68", "coverage_95", "nll", "spearman_sigma_error"):
        assert key in disk
    assert disk["auroc_epistemic_blend"] == 1.0
    assert disk["n"] == n and disk["dataset"] == "synthetic.h5" and disk["seed"] == 9
    assert "magnitude" in disk["binned"] and "size" in disk["binned"]
    for fname in disk["figures"] + ["report.md"]:
        assert (out / fname).stat().st_size > 0
    assert "REGAUSS" in (out / "report.md").read_text()
    assert not list(out.glob(".*partial*"))


def test_evaluate_shapes_cnn_without_hsm_and_bad_input(tmp_path):
    from cosmolit.measure.report import evaluate_shapes

    rng = np.random.default_rng(1)
    y = rng.normal(0, 0.3, (30, 2))
    m = evaluate_shapes(tmp_path / "cnn", y, y + 0.01, None, ["e1", "e2"], {}, None, _info(30, "gri", 32), "cnn",
                        hsm=False, progress=False)
    assert m["e1"]["c"] == pytest.approx(0.01) and "coverage_68" not in m and "hsm_regauss" not in m
    with pytest.raises(UsageError):
        evaluate_shapes(tmp_path / "bad", y, y[:, :1], None, ["e1", "e2"], {}, None, None, "cnn", hsm=False)
    with pytest.raises(UsageError, match="images"):
        evaluate_shapes(tmp_path / "bad", y, y, None, ["e1", "e2"], {}, None, _info(30, "gri", 32), "cnn")


def test_evaluate_shapes_reads_the_rmse_against_zero_and_the_uncalibrated_estimate(tmp_path):
    """A noisy, shrunk estimate (response 0.5) delivered with the response removed: metrics.json also
    gives the RMSE before the removal and that of answering e = 0; without a response, only the latter.
    As on blends, removing the response makes the RMSE worse than answering e = 0."""
    from cosmolit.measure.report import evaluate_shapes

    rng = np.random.default_rng(2)
    y = rng.normal(0, 0.3, (400, 2))
    raw = 0.5 * y + rng.normal(0, 0.2, y.shape) + 0.01
    delivered = (raw - 0.01) / 0.5
    delivered[0, 0] = np.nan  # dropped from every RMSE alike
    response = {name: {"slope": 0.5, "intercept": 0.01} for name in ("e1", "e2")}
    m = evaluate_shapes(tmp_path / "cal", y, delivered, None, ["e1", "e2"], {}, None, _info(400, "gri", 32), "cnn",
                        hsm=False, progress=False, response=response)
    rms = lambda a: float(np.sqrt(np.mean(a ** 2)))  # noqa: E731
    assert m["e1"]["rmse_uncalibrated"] == pytest.approx(rms(raw[1:, 0] - y[1:, 0]))
    assert m["e1"]["rmse_zero"] == pytest.approx(rms(y[1:, 0])) and m["e2"]["rmse_zero"] == pytest.approx(rms(y[:, 1]))
    assert m["e2"]["rmse"] > m["e2"]["rmse_zero"] > m["e2"]["rmse_uncalibrated"]
    assert "before the response removal" in (tmp_path / "cal" / "report.md").read_text()
    plain = evaluate_shapes(tmp_path / "plain", y, raw, None, ["e1", "e2"], {}, None, _info(400, "gri", 32), "cnn",
                            hsm=False, progress=False)
    assert "rmse_uncalibrated" not in plain["e1"] and plain["e1"]["rmse_zero"] == pytest.approx(rms(y[:, 0]))


def test_evaluate_generation_ks(tmp_path):
    pytest.importorskip("galsim")
    from cosmolit.measure.report import evaluate_generation
    from cosmolit.synthetic import synthetic_stamps

    _, clean, _ = synthetic_stamps(40, bands="gri", size=32, seed=4, noise=False)
    same = evaluate_generation(tmp_path / "same", clean, clean.copy(), "gri", 0.2,
                               reconstructions=(clean[:4], clean[:4], clean[:4]), progress=False)
    assert all(v == 0.0 for v in same["ks"].values())
    assert {"size", "abs_e", "flux_g", "flux_r", "flux_i", "colour_gr", "colour_ri"} <= set(same["ks"])
    assert same["adaptive_moments_failures"] == {"real": 0, "generated": 0}
    assert same["reconstruction"]["rmse_per_band"]["i"] == 0.0
    assert same["reconstruction"]["ks"] == {"size": 0.0, "abs_e": 0.0}
    assert same["reconstruction"]["shape_transfer"]["all"]["response"] == pytest.approx(1.0)
    assert (tmp_path / "same" / "shape_transfer.png").stat().st_size > 0
    assert "Shape response" in (tmp_path / "same" / "report.md").read_text()
    # very different galaxies: 100x brighter, blown up (larger), redder
    other = np.repeat(np.repeat(clean[:, :, 8:24, 8:24], 2, axis=2), 2, axis=3) * 100.0
    other[:, 0] *= 0.1
    diff = evaluate_generation(tmp_path / "diff", clean, other, "gri", 0.2, progress=False)
    assert diff["ks"]["flux_i"] > 0.9 and diff["ks"]["size"] > 0.5 and diff["ks"]["colour_gr"] > 0.9
    disk = _strict_json(tmp_path / "diff" / "metrics.json")
    assert disk["ks"] == diff["ks"]
    assert (tmp_path / "diff" / "generated_grid.png").exists() and (tmp_path / "diff" / "report.md").exists()
    with pytest.raises(UsageError):
        evaluate_generation(tmp_path / "bad", clean, clean[:, :2], "gri", 0.2, progress=False)


def test_write_json_is_strict_and_atomic(tmp_path):
    from cosmolit.measure.report import write_json

    p = write_json(tmp_path / "m.json", {"a": np.float32(np.nan), "b": [np.inf, 1], "c": np.int64(3),
                                          "d": np.array([0.5])})
    assert _strict_json(p) == {"a": None, "b": [None, 1], "c": 3, "d": [0.5]}
    with pytest.raises(TypeError):
        write_json(tmp_path / "m.json", {"x": object()})
    assert _strict_json(p)["c"] == 3  # the old file is intact
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]


def test_shape_transfer_response_and_snr_bins():
    from cosmolit.measure.morphology import shape_transfer

    rng = np.random.default_rng(3)
    n = 400
    e1, e2 = rng.normal(0, 0.2, n), rng.normal(0, 0.2, n)
    snr = rng.uniform(5, 200, n)
    # reconstructions keep the shapes of bright galaxies and halve those of faint ones
    keep = np.where(snr > np.median(snr), 1.0, 0.5)
    target = {"e1": e1, "e2": e2}
    recon = {"e1": e1 * keep, "e2": e2 * keep}
    recon["e1"][0] = np.nan  # a failed measurement is left out, not counted
    out = shape_transfer(target, recon, snr, bins=2)
    assert out["all"]["n"] == n - 1
    assert 0.5 < out["all"]["response"] < 1.0
    faint, bright = out["by_snr"]
    assert faint["response"] == pytest.approx(0.5) and bright["response"] == pytest.approx(1.0)
    assert faint["n"] + bright["n"] == n - 1
    assert faint["snr_max"] == bright["snr_min"] and faint["snr_min"] == snr.min() and bright["snr_max"] == snr.max()
    assert bright["median_abs_e_reconstruction"] == pytest.approx(bright["median_abs_e_target"])
    assert faint["median_abs_e_reconstruction"] < 0.6 * faint["median_abs_e_target"]
    assert shape_transfer(target, target)["by_snr"] == []
    with pytest.raises(UsageError, match="snr"):
        shape_transfer(target, target, snr[:10])
    with pytest.raises(UsageError, match="length"):
        shape_transfer(target, {"e1": e1[:10], "e2": e2[:10]})
