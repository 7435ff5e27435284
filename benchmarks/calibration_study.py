"""Uncertainty calibration of a shape network: one factor per target against a factor plus a floor.

Predicts the raw (uncalibrated) moments of a CNN or BNN checkpoint once on a calibration set and
a test set (cached as .npz in --work), then, for each calibration family, fits it on the
calibration set exactly as `cosmolit calibrate` does (response through the origin for e1, e2,
then the weighted coverage fit) and reports the test set's 68 % and 95 % coverage per target.

    python benchmarks/calibration_study.py --ckpt bnn_iso/model.ckpt --cal iso_cal2k.h5 \\
        --test iso_test500.h5 --cal-samples 16 --test-samples 32 [--work DIR] [--out study.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def raw_moments(net, kind: str, path: str, samples: int, seed: int, cache: Path) -> dict:
    import torch

    from cosmolit.dataset import iter_images, read_truth

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
    truth = read_truth(path)
    res["y"] = np.stack([truth[t] for t in net.target_transform.targets], 1).astype(np.float64)
    np.savez(cache, **res)
    return res


def main() -> None:
    import torch

    from cosmolit.checkpoint import load_model
    from cosmolit.measure.calibration import coverage
    from cosmolit.models.targets import fit_sigma_calibration

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
    cal = raw_moments(net, kind, args.cal, args.cal_samples, 0, work / f"moments_{Path(args.cal).stem}.npz")
    test = raw_moments(net, kind, args.test, args.test_samples, 1, work / f"moments_{Path(args.test).stem}.npz")
    tt.reset_calibration()
    tt.fit_response(cal["mean"], cal["y"])
    rows = {}
    sig = {name: np.sqrt(np.diagonal(d["cov"], axis1=1, axis2=2)) for name, d in (("cal", cal), ("test", test))}
    cal_mean, cal_sigma = tt.apply_response(cal["mean"], sig["cal"])
    test_mean, test_sigma = tt.apply_response(test["mean"], sig["test"])
    for family, floor in (("factor", False), ("factor + floor", True)):
        for k, name in enumerate(tt.targets):
            s, f = fit_sigma_calibration(cal_mean[:, k] - cal["y"][:, k], cal_sigma[:, k], floor=floor)
            sigma = np.sqrt((s * test_sigma[:, k]) ** 2 + f ** 2)
            row = {"s": s, "f": f, "coverage_68": coverage(test["y"][:, k], test_mean[:, k], sigma, 0.6827),
                   "coverage_95": coverage(test["y"][:, k], test_mean[:, k], sigma, 0.9545),
                   "n_cal": len(cal_mean), "n_test": len(test_mean)}
            rows.setdefault(family, {})[name] = row
            print(f"{family:>15} {name:>9}: s {s:.3f}  f {f:.4f}  coverage 68 % {row['coverage_68']:.3f}  "
                  f"95 % {row['coverage_95']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
