"""Uncertainty calibration of a shape network: cosmolit's one factor per target against two-parameter forms.

Families, each fitted on the calibration set, then judged on the test set:
- factor: sigma' = s sigma, what `cosmolit fit` and `cosmolit calibrate` do (the coverage of the
  levels 5 %, ..., 95 %, weighted by 1 / (q (1 - q)), matched on all galaxies together);
- factor + floor: sigma' = sqrt((s sigma)^2 + f^2), widening the small sigmas most;
- power law: sigma' = s m (sigma / m)^p, m the calibration set's median sigma (p > 1 widens the
  large sigmas most).
The two-parameter forms are matched within each quarter of the galaxies sorted by sigma (the
same weighted coverage misfit, summed over the quarters with the galaxies as weights): matching
the pooled coverage alone cannot tell them from a factor.

It predicts the raw (uncalibrated) moments of a CNN or BNN checkpoint once on each set (cached as
.npz in --work; BNN: --cal-samples / --test-samples weight draws), removes the response fitted on
the calibration set as `cosmolit calibrate` does, and prints per target and family the fitted
parameters, the test set's 68 % and 95 % coverage, and the 95 % coverage of the test galaxies with
the smaller and with the larger half of the sigmas.

    python benchmarks/calibration_study.py --ckpt bnn_iso/model.ckpt --cal iso_cal2k.h5 \\
        --test iso_test500.h5 --cal-samples 16 --test-samples 32 [--work DIR] [--out study.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import NormalDist

import numpy as np

FLOORS = np.linspace(0.0, 1.5, 31)  # floor candidates, in units of the median sigma
POWERS = np.round(np.arange(0.5, 3.01, 0.05), 2)


def raw_moments(net, kind: str, path: str, samples: int, seed: int, cache: Path) -> dict:
    import torch

    from cosmolit.dataset import iter_images, read_targets

    if cache.exists():
        return dict(np.load(cache))
    out: dict[str, list] = {}
    with torch.no_grad():
        for start, block in iter_images(path, 64):
            kwargs = {"samples": samples, "seed": seed + start} if kind == "bnn" else {}
            est = net.estimate(torch.from_numpy(block), calibrated=False, **kwargs)
            for key, value in est.items():
                out.setdefault(key, []).append(value.double().numpy())
            print(f"  {path}: {start + len(block)} stamps", flush=True)
    res = {key: np.concatenate(v) for key, v in out.items()}
    res["y"] = read_targets(path, net.target_transform.targets).astype(np.float64)  # (n, T), finite or refused
    np.savez(cache, **res)
    return res


def binned_fit(error: np.ndarray, sigma: np.ndarray, widen, params, bins: int = 4) -> tuple[float, float]:
    """(s, param) minimising the galaxy-weighted coverage misfit within `bins` groups by sigma, where
    sigma' = s * widen(sigma, param); each param is scored for every s of the grid by binary search."""
    from cosmolit.models.targets import COVERAGE_LEVELS, COVERAGE_WEIGHTS, SIGMA_SCALE_GRID

    z = np.array([NormalDist().inv_cdf(0.5 + q / 2) for q in COVERAGE_LEVELS])  # (Q,)
    groups = np.array_split(np.argsort(sigma, kind="stable"), bins)
    best = (np.inf, 1.0, params[0])
    for param in params:
        wide = widen(sigma, param)  # (n,)
        loss = 0.0
        for idx in groups:
            pull = np.sort(np.abs(error[idx]) / wide[idx])
            cover = np.searchsorted(pull, SIGMA_SCALE_GRID[:, None] * z[None, :]) / len(pull)  # (G, Q)
            loss = loss + len(idx) * (((cover - COVERAGE_LEVELS) ** 2) * COVERAGE_WEIGHTS).sum(1)
        i = int(np.argmin(loss))
        if loss[i] < best[0]:
            best = (float(loss[i]), float(SIGMA_SCALE_GRID[i]), float(param))
    return best[1], best[2]


def main() -> None:
    import torch

    from cosmolit.checkpoint import load_model
    from cosmolit.measure.calibration import coverage

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--cal", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--cal-samples", type=int, default=16)
    ap.add_argument("--test-samples", type=int, default=32)
    ap.add_argument("--work", default=".")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    net, kind, _ = load_model(args.ckpt)
    net.eval()
    tt = net.target_transform
    work = Path(args.work)

    def cache(path, samples):  # one file per checkpoint, dataset and number of draws
        ckpt = Path(args.ckpt)
        return work / f"moments_{ckpt.parent.parent.name}_{ckpt.stem}_{Path(path).stem}_{samples}.npz"

    cal = raw_moments(net, kind, args.cal, args.cal_samples, 0, cache(args.cal, args.cal_samples))
    test = raw_moments(net, kind, args.test, args.test_samples, 1, cache(args.test, args.test_samples))
    tt.reset_calibration()
    tt.fit_response(cal["mean"], cal["y"])
    sig = {name: np.sqrt(np.diagonal(d["cov"], axis1=1, axis2=2)) for name, d in (("cal", cal), ("test", test))}
    cal_mean, cal_sigma = tt.apply_response(cal["mean"], sig["cal"])
    test_mean, test_sigma = tt.apply_response(test["mean"], sig["test"])
    factors = tt.fit_sigma_scale(cal_mean, cal_sigma, cal["y"])  # cosmolit's own calibration
    rows: dict = {}
    for k, name in enumerate(tt.targets):
        err, sc, st = cal_mean[:, k] - cal["y"][:, k], cal_sigma[:, k], test_sigma[:, k]
        med = float(np.median(sc))
        s_f, f = binned_fit(err, sc, lambda x, g: np.sqrt(x ** 2 + (g * med) ** 2), FLOORS)
        s_p, p = binned_fit(err, sc, lambda x, q: med * (x / med) ** q, POWERS)
        families = {
            "factor": ({"s": factors[name]}, factors[name] * st),
            "factor + floor": ({"s": s_f, "f": s_f * f * med}, s_f * np.sqrt(st ** 2 + (f * med) ** 2)),
            "power law": ({"s": s_p, "p": p}, s_p * med * (st / med) ** p),
        }
        y, mu = test["y"][:, k], test_mean[:, k]
        small = st < np.median(st)  # the test galaxies' better half
        for family, (params, sigma) in families.items():
            row = dict(params, coverage_68=coverage(y, mu, sigma, 0.6827), coverage_95=coverage(y, mu, sigma, 0.9545),
                       coverage_95_small_sigma=coverage(y[small], mu[small], sigma[small], 0.9545),
                       coverage_95_large_sigma=coverage(y[~small], mu[~small], sigma[~small], 0.9545),
                       n_cal=len(cal_mean), n_test=len(test_mean))
            rows.setdefault(family, {})[name] = row
            text = "  ".join(f"{key} {value:.4g}" for key, value in params.items())
            print(f"{family:>14} {name:>9}: {text:<24} coverage 68 % {row['coverage_68']:.3f}  95 % "
                  f"{row['coverage_95']:.3f} (small / large sigma {row['coverage_95_small_sigma']:.3f} / "
                  f"{row['coverage_95_large_sigma']:.3f})")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
