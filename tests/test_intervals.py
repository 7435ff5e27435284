"""95% intervals of cosmolit evaluate's metrics: bootstrap for RMSE and coverage, Hanley-McNeil for AUROC."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from cosmolit.measure.bias import rmse_interval
from cosmolit.measure.calibration import auroc, auroc_se, calibration_metrics
from cosmolit.measure.report import evaluate_shapes

NAMES = ["e1", "e2", "redshift"]


def _predictions(n, seed=0):
    rng = np.random.default_rng(seed)
    y = np.column_stack([rng.normal(0, 0.3, n), rng.normal(0, 0.3, n), rng.uniform(0.1, 2.0, n)])
    sig = np.array([0.1, 0.12, 0.05]) * rng.uniform(0.5, 1.5, (n, 1))
    mu = y + sig * rng.standard_normal((n, 3))
    cov = np.einsum("ni,ij->nij", sig**2, np.eye(3))
    blend = rng.uniform(size=n) < 0.3
    eps = np.where(blend, 1.0, 0.0) + rng.normal(0, 0.8, n)
    return y, mu, cov, eps, blend


def _width(ci):
    return ci[1] - ci[0]


def test_intervals_bracket_the_estimate_and_shrink_as_one_over_sqrt_n():
    small, big = (calibration_metrics(y, mu, cov, NAMES, eps, blend)
                  for y, mu, cov, eps, blend in (_predictions(1000, 1), _predictions(4000, 2)))
    for res in (small, big):
        for key in ("coverage_68", "coverage_95"):
            lo, hi = res[f"{key}_ci95"]
            assert lo < res[key] < hi
            for nm in NAMES:
                t = res["per_target"][nm]
                assert t[f"{key}_ci95"][0] < t[key] < t[f"{key}_ci95"][1]
        lo, hi = res["auroc_epistemic_blend_ci95"]
        assert lo < res["auroc_epistemic_blend"] < hi
    # 4x the galaxies: about half the width
    for key in ("coverage_68_ci95", "coverage_95_ci95", "auroc_epistemic_blend_ci95"):
        assert 0.35 < _width(big[key]) / _width(small[key]) < 0.65, key
    (y1, mu1), (y4, mu4) = _predictions(1000, 1)[:2], _predictions(4000, 2)[:2]
    ci1, ci4 = rmse_interval(mu1[:, 0], y1[:, 0]), rmse_interval(mu4[:, 0], y4[:, 0])
    assert ci1[0] < np.sqrt(np.mean((mu1[:, 0] - y1[:, 0]) ** 2)) < ci1[1]
    assert 0.35 < _width(ci4) / _width(ci1) < 0.65


def test_rmse_interval_covers_the_true_rmse_at_about_95_percent():
    rng = np.random.default_rng(3)
    hits = sum(lo <= 0.2 <= hi for lo, hi in (rmse_interval(rng.normal(0, 0.2, 300), np.zeros(300)) for _ in range(200)))
    assert 0.88 <= hits / 200 <= 0.99


def test_auroc_se_matches_a_bootstrap():
    rng = np.random.default_rng(7)
    n_pos, n_neg = 300, 700
    scores = np.concatenate([rng.normal(1.0, 1, n_pos), rng.normal(0, 1, n_neg)])
    labels = np.arange(n_pos + n_neg) < n_pos
    a = auroc(scores, labels)
    boot = []
    for _ in range(600):  # resample within each class, as the formula holds n_pos and n_neg fixed
        i = np.concatenate([rng.integers(0, n_pos, n_pos), n_pos + rng.integers(0, n_neg, n_neg)])
        boot.append(auroc(scores[i], labels[i]))
    assert auroc_se(a, n_pos, n_neg) == pytest.approx(np.std(boot), rel=0.15)
    assert auroc_se(0.5, 50, 50) == pytest.approx(np.sqrt(1 / 12 * (1 / 50 + 1 / 50 + 1 / 2500)), rel=1e-9)


def test_evaluate_writes_the_intervals_reproducibly(tmp_path):
    y, mu, cov, eps, blend = _predictions(500)
    info = SimpleNamespace(path="synthetic.h5", seed=1, bands="i")
    ecov = np.einsum("n,ij->nij", eps**2, np.eye(3))

    def run(out):
        evaluate_shapes(out, y, mu, cov, NAMES, {"is_blend": blend}, None, info, "bnn", epistemic_cov=ecov,
                        hsm=False, progress=False, response={"e1": {"slope": 0.9, "intercept": 0.0}})
        return (out / "metrics.json").read_bytes(), (out / "report.md").read_text()

    first, report = run(tmp_path / "a")
    assert run(tmp_path / "b")[0] == first  # same bytes
    m = json.loads(first)
    for nm in NAMES:
        assert m[nm]["rmse_ci95"][0] < m[nm]["rmse"] < m[nm]["rmse_ci95"][1]
        assert m[nm]["coverage_68_ci95"][0] < m[nm]["coverage_68"] < m[nm]["coverage_68_ci95"][1]
    for nm in ("e1", "e2"):
        assert m[nm]["rmse_zero_ci95"][0] < m[nm]["rmse_zero"] < m[nm]["rmse_zero_ci95"][1]
    assert m["e1"]["rmse_uncalibrated_ci95"][0] < m["e1"]["rmse_uncalibrated"] < m["e1"]["rmse_uncalibrated_ci95"][1]
    assert m["redshift"]["rmse_mean"] == pytest.approx(np.std(y[:, 2]))
    assert m["redshift"]["rmse_mean_ci95"][0] < m["redshift"]["rmse_mean"] < m["redshift"]["rmse_mean_ci95"][1]
    assert m["auroc_epistemic_blend_se"] > 0 and len(m["auroc_epistemic_blend_ci95"]) == 2
    for key in ("coverage_68", "coverage_95", "nll", "auroc_epistemic_blend"):  # the keys there were before
        assert key in m
    lo, hi = m["e1"]["rmse_ci95"]
    assert f"{m['e1']['rmse']:.4f} [{lo:.4f}, {hi:.4f}]" in report
    lo, hi = m["coverage_68_ci95"]
    assert f"{m['coverage_68']:.3f} [{lo:.3f}, {hi:.3f}]" in report
    assert "standard error" in report
