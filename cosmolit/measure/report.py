"""`cosmolit evaluate`: metrics.json, report.md and PNG plots for shape models and for the VAE.

evaluate_shapes    CNN / BNN: RMSE, shear bias m, c (with errors), in bins of magnitude, size and
                   blendedness, side by side with GalSim HSM REGAUSS and KSB on the same stamps,
                   plus calibration of the predicted covariance.
evaluate_generation VAE: generated against simulated distributions (KS), reconstructions, grids.

metrics.json is strict JSON (NaN and infinities written as null), written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cosmolit.dataset import atomic_path
from cosmolit.errors import UsageError
from cosmolit.measure.bias import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL, bin_edges, binned_bias,
                                   redshift_metrics, rmse_interval, shear_bias)

ELLIPTICITY = ("e1", "e2")
# truth columns used as binning variables: (metrics key, candidate columns, axis label)
BIN_VARIABLES = (
    ("magnitude", ("mag_i", "mag_r", "mag_z", "mag_g", "mag_y", "mag_u"), "AB magnitude"),
    ("size", ("hlr",), "half-light radius [arcsec]"),
    ("blendedness", ("blendedness",), "blendedness (0 = isolated)"),
)


# ---------------------------------------------------------------------------- JSON
def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN and +-inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path, obj) -> Path:
    """Write `obj` as indented strict JSON via a temporary file renamed into place."""
    path = Path(path)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(text + "\n")
    return path


def _write_text(path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path, path.suffix) as tmp:
        tmp.write_text(text)
    return path


def _out_dir(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _fmt(v, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return format(float(v), spec)


def _ci(v, interval, spec: str = ".4f") -> str:
    """`value [lo, hi]`, or the value alone when there is no interval."""
    if not interval or len(interval) != 2:
        return _fmt(v, spec)
    return f"{_fmt(v, spec)} [{_fmt(interval[0], spec)}, {_fmt(interval[1], spec)}]"


# ---------------------------------------------------------------------------- shapes
def _band_for_hsm(bands: str) -> str:
    """HSM band: i when present (deepest LSST band for shapes, cosmolit's reference band), else r, else the middle one."""
    for b in ("i", "r"):
        if b in bands:
            return b
    return bands[len(bands) // 2]


def _collect_band(images, bands: str, band: str, n: int) -> np.ndarray:
    """(N, 1, H, W) of one band from an array, or from a callable / iterable of arrays or (start, array) chunks."""
    b = bands.index(band)
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[0] != n or images.shape[1] != len(bands):
            raise UsageError(f"images must be ({n}, {len(bands)}, H, W), got {images.shape}")
        return images[:, b:b + 1]
    source: Iterable = images() if callable(images) else images
    chunks = []
    for item in source:
        block = item[1] if isinstance(item, tuple) else item
        block = np.asarray(block)
        if block.ndim != 4 or block.shape[1] != len(bands):
            raise UsageError(f"image chunks must be (n, {len(bands)}, H, W), got {block.shape}")
        chunks.append(np.array(block[:, b:b + 1], dtype=np.float32))
    if not chunks:
        raise UsageError("no images were given for the HSM baseline")
    out = np.concatenate(chunks)
    if out.shape[0] != n:
        raise UsageError(f"the image source gave {out.shape[0]} stamps for {n} predictions")
    return out


def _is_blend(truth: dict, n: int):
    if "is_blend" in truth:
        return np.asarray(truth["is_blend"]).astype(bool).reshape(n)
    if "n_neighbors" in truth:
        return (np.asarray(truth["n_neighbors"]) > 0).reshape(n)
    return None


def _target_metrics(name: str, pred, true) -> dict:
    if name in ELLIPTICITY or name in ("g1", "g2"):
        return _with_interval(shear_bias(pred, true), pred, true)
    res = redshift_metrics(pred, true)
    if name != "redshift":
        res = {k: res[k] for k in ("rmse", "bias", "n")}
    return _with_interval(res, pred, true)


def _with_interval(res: dict, pred, true) -> dict:
    """res with `rmse_ci95`, the bootstrap interval of its RMSE."""
    res["rmse_ci95"] = rmse_interval(pred, true)
    return res


def _rmse_references(pred: np.ndarray, true: np.ndarray, response: dict | None) -> dict:
    """What an ellipticity RMSE is to be read against: `rmse_zero`, the RMSE of answering e = 0 for
    every galaxy (the RMS of the true e), and, when the model removes a response (1 + m, c) from its
    predictions, `rmse_uncalibrated`, the RMSE of the network's own estimate before that removal
    ((1 + m) pred + c). The network is trained for the smallest squared error, which shrinks its
    estimate towards zero where the data say little; removing the response undoes the shrinkage
    (m near 0), on noisy stamps such as blends at the price of a larger RMSE. Each with its
    bootstrap interval (`rmse_zero_ci95`, `rmse_uncalibrated_ci95`)."""
    ok = np.isfinite(pred) & np.isfinite(true)  # the galaxies the RMSE counts
    pred, true = pred[ok], true[ok]
    out = {"rmse_zero": float(np.sqrt(np.mean(true ** 2))) if true.size else float("nan"),
           "rmse_zero_ci95": rmse_interval(np.zeros_like(true), true)}
    if response and true.size:
        raw = pred * float(response["slope"]) + float(response["intercept"])
        out["rmse_uncalibrated"] = float(np.sqrt(np.mean((raw - true) ** 2)))
        out["rmse_uncalibrated_ci95"] = rmse_interval(raw, true)
    return out


def _rmse_mean(true: np.ndarray) -> dict:
    """The trivial baseline of a target other than e: `rmse_mean`, the RMSE of answering the mean of
    the true values on these very stamps for every galaxy (their standard deviation, the best any
    constant answer can do), with its bootstrap interval `rmse_mean_ci95`."""
    t = true[np.isfinite(true)]
    if t.size == 0:
        return {"rmse_mean": float("nan"), "rmse_mean_ci95": [float("nan")] * 2}
    return {"rmse_mean": float(t.std()), "rmse_mean_ci95": rmse_interval(np.full_like(t, t.mean()), t)}


def evaluate_shapes(out_dir, y_true, mean, cov, target_names: Sequence[str], truth: dict,
                    images, dataset_info, model_kind: str, epistemic_cov=None, hsm: bool = True,
                    progress: bool = True, hsm_band: str | None = None, response: dict | None = None,
                    sigma_scale: dict | None = None, calibration_source: dict | None = None,
                    data_overlap: Sequence[str] = (), warnings: Sequence[str] = (), bnn_seed: int | None = None) -> dict:
    """Evaluate shape / redshift predictions; write metrics.json, report.md and PNGs into out_dir.

    y_true, mean: (N, T); cov: (N, T, T) predicted covariance (total for the BNN) or None;
    target_names: T names (e.g. e1, e2, redshift; e are distortions); truth: all truth columns (N,);
    images: (N, B, H, W) electrons, or a callable / iterable giving (n, B, H, W) chunks (or
    (start, chunk) pairs), or None when hsm is False; dataset_info: cosmolit.dataset.DatasetInfo;
    model_kind: "cnn" | "bnn"; epistemic_cov: (N, T, T) or None; hsm_band: band HSM measures
    (default i, else r); response: {target: {slope, intercept}} the model removed from its
    predictions (cosmolit.models.targets) and sigma_scale: {target: factor} its uncertainty
    calibration, both recorded as is, with calibration_source ({path, seed, n} of the dataset
    `cosmolit calibrate` measured them on; None: the validation split); data_overlap: the roles
    ('training', 'calibration') the dataset played for the checkpoint (cosmolit.checkpoint.data_overlap),
    recorded under `data_overlap` and said at the top of report.md; warnings: lines about the dataset
    (CosmolitModule.check_compatible), recorded as `dataset_warnings`; bnn_seed: the seed of the BNN's
    weight draws. Returns the metrics dict (as written, NaN -> None).
    """
    from cosmolit.measure import plots
    from cosmolit.measure.calibration import calibration_metrics

    out = _out_dir(out_dir)
    y = np.asarray(y_true, dtype=np.float64)
    mu = np.asarray(mean, dtype=np.float64)
    names = list(target_names)
    if y.ndim != 2 or mu.shape != y.shape or y.shape[1] != len(names):
        raise UsageError(f"y_true and mean must both be (N, {len(names)}) for targets {names}, got {y.shape} and {mu.shape}")
    n = y.shape[0]
    if n == 0:
        raise UsageError("nothing to evaluate: 0 galaxies")
    truth = {k: np.asarray(v) for k, v in (truth or {}).items() if np.ndim(v) == 1 and len(v) == n}
    if cov is not None:
        cov = np.asarray(cov, dtype=np.float64)
        if cov.shape != (n, len(names), len(names)):
            raise UsageError(f"cov must be ({n}, {len(names)}, {len(names)}), got {cov.shape}")
    bands = dataset_info.bands if dataset_info is not None else ""

    metrics: dict[str, Any] = {
        "model_kind": model_kind,
        "n": n,
        "dataset": getattr(dataset_info, "path", None),
        "seed": getattr(dataset_info, "seed", None),
        "bands": bands,
        "targets": names,
        "ellipticity_convention": "distortion |e| = (a^2 - b^2)/(a^2 + b^2); e_obs = (1 + m) e_true + c",
        "response_calibration": dict(response or {}),
        "uncertainty_calibration": dict(sigma_scale or {}),
        "calibration_source": ({k: calibration_source.get(k) for k in ("path", "seed", "n")}
                               if calibration_source else "validation split"),
        "data_overlap": list(data_overlap),
        "dataset_warnings": list(warnings),
        "confidence_intervals": {"level": CI_LEVEL, "rmse_and_coverage": "percentile bootstrap over stamps",
                                 "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                                 "auroc": "Hanley-McNeil (1982) standard error, value -+ 1.96 se"},
    }
    if bnn_seed is not None:
        metrics["bnn_seed"] = int(bnn_seed)
    for j, name in enumerate(names):
        metrics[name] = _target_metrics(name, mu[:, j], y[:, j])
        if name in ELLIPTICITY:
            metrics[name].update(_rmse_references(mu[:, j], y[:, j], (response or {}).get(name)))
        else:
            metrics[name].update(_rmse_mean(y[:, j]))

    # ---- calibration of the predicted covariance
    cal = None
    if cov is not None:
        eps_sigma = None
        if epistemic_cov is not None:
            ecov = np.asarray(epistemic_cov, dtype=np.float64)
            if ecov.shape != cov.shape:
                raise UsageError(f"epistemic_cov must be {cov.shape}, got {ecov.shape}")
            cols = [j for j, nm in enumerate(names) if nm in ELLIPTICITY] or list(range(len(names)))
            # one epistemic sigma per galaxy: RMS of the ellipticity components' marginal sigmas
            eps_sigma = np.sqrt(np.clip(np.diagonal(ecov, axis1=1, axis2=2)[:, cols], 0, None).mean(1))  # (N,)
        cal = calibration_metrics(y, mu, cov, names, epistemic_sigma=eps_sigma, is_blend=_is_blend(truth, n))
        metrics["uncertainty"] = "total (aleatoric + epistemic)" if model_kind == "bnn" else "aleatoric"
        for key in ("coverage_68", "coverage_95", "nll", "spearman_sigma_error", "coverage_68_ci95", "coverage_95_ci95"):
            metrics[key] = cal[key]
        for key in ("auroc_epistemic_blend", "auroc_epistemic_blend_se", "auroc_epistemic_blend_ci95"):
            if key in cal:
                metrics[key] = cal[key]
        for name in names:
            metrics[name].update(cal["per_target"][name])
        metrics["calibration"] = {"curve": cal["calibration_curve"], "n_nll_failed": cal["n_nll_failed"],
                                  "sparsification": cal["sparsification"]}

    # ---- GalSim HSM baseline on the same stamps
    hsm_res: dict[str, dict] = {}
    ell = [nm for nm in ELLIPTICITY if nm in names]
    if hsm and ell:
        if images is None:
            raise UsageError("the HSM baseline needs the images; pass them or turn HSM off (--no-hsm)")
        if dataset_info is None:
            raise UsageError("the HSM baseline needs the dataset description (bands, pixel scale, PSF FWHM)")
        from cosmolit.measure.hsm import failure_summary, psf_for_dataset, run_hsm

        band = hsm_band or _band_for_hsm(bands)
        if band not in bands:
            raise UsageError(f"HSM band {band!r} is not one of the dataset's bands {bands!r}")
        fwhm = float(dataset_info.psf_fwhm[bands.index(band)])
        psf, psf_words = psf_for_dataset(dataset_info, band)
        one = _collect_band(images, bands, band, n)  # (N, 1, H, W)
        hsm_res = run_hsm(one, band, band, fwhm, dataset_info.pixel_scale, progress=progress, psf=psf)
        for method, res in hsm_res.items():
            ok = res["ok"]
            entry: dict[str, Any] = {}
            for name in ell:
                j = names.index(name)
                entry[name] = _with_interval(shear_bias(res[name][ok], y[ok, j]), res[name][ok], y[ok, j])
            entry.update(failure_summary(res))
            # REGAUSS's corrected distortion is unbounded on noisy stamps; count |e| > 1 (kept, not hidden)
            entry["n_abs_e_gt_1"] = int(np.sum(np.hypot(res["e1"][ok], res["e2"][ok]) > 1.0))
            entry["network"] = {name: _target_metrics(name, mu[ok, names.index(name)], y[ok, names.index(name)])
                                for name in ell}
            entry.update({"band": band, "psf": psf_words,
                          "pixel_scale": dataset_info.pixel_scale,
                          "sky_var": "per stamp, (1.4826 MAD)^2 of the 4-pixel border",
                          "output": "corrected_g converted to e = 2g/(1+|g|^2)" if method == "KSB"
                          else "corrected_e (distortion)"})
            metrics[f"hsm_{method.lower()}"] = entry
    elif hsm:
        metrics["hsm_skipped"] = "no e1/e2 target"

    # ---- bias in bins of magnitude, size, blendedness
    binned: dict[str, Any] = {}
    figures: list[tuple[str, str]] = []
    if ell:
        for key, columns, label in BIN_VARIABLES:
            col = next((c for c in columns if c in truth), None)
            if col is None:
                continue
            x = truth[col].astype(np.float64)
            edges = bin_edges(x)
            if edges is None:
                continue
            curves: dict[str, dict] = {"network": {}}
            entry = {"column": col, "network": {}}
            for name in ell:
                j = names.index(name)
                entry["network"][name] = curves["network"][name] = binned_bias(mu[:, j], y[:, j], x, edges)
            for method, res in hsm_res.items():
                ok = res["ok"]
                curves[f"HSM {method}"], entry[f"hsm_{method.lower()}"] = {}, {}
                for name in ell:
                    j = names.index(name)
                    b = binned_bias(res[name][ok], y[ok, j], x[ok], edges)
                    curves[f"HSM {method}"][name] = entry[f"hsm_{method.lower()}"][name] = b
            binned[key] = entry
            fname = f"bias_vs_{key}.png"
            plots.binned_bias_plot(curves, f"{label} ({col})", out / fname)
            figures.append((fname, f"shear bias m, c in bins of {col}"))
    metrics["binned"] = binned

    # ---- plots
    plots.pred_vs_true(y, mu, names, out / "pred_vs_true.png", hsm=hsm_res or None)
    figures.insert(0, ("pred_vs_true.png", "estimated against true values"))
    if cal is not None:
        plots.pull_histogram(cal["pulls"], out / "pulls.png")
        plots.calibration_curve(cal["calibration_curve"]["levels"], cal["calibration_curve"]["observed"],
                                out / "calibration.png")
        plots.sparsification_plot(cal["sparsification"], out / "sparsification.png")
        figures += [("pulls.png", "pull distributions against N(0, 1)"),
                    ("calibration.png", "expected against observed coverage"),
                    ("sparsification.png", "sparsification curves")]
    metrics["figures"] = [f for f, _ in figures]

    clean = to_jsonable(metrics)
    write_json(out / "metrics.json", clean)
    _write_text(out / "report.md", _shapes_report(clean, figures))
    return clean


OVERLAP_WORDS = {"training": "the file the model was trained on (its validation split included)",
                 "calibration": "the file the model's response and uncertainties were calibrated on"}


def _caveats(m: dict) -> list[str]:
    """report.md lines for a dataset the model has seen (--allow-training-data) and for check_compatible's warnings."""
    lines = [f"**This dataset is {OVERLAP_WORDS[role]} (--allow-training-data): these metrics are not those of "
             "new galaxies.**" for role in m.get("data_overlap") or ()]
    lines += [f"- {w}" for w in m.get("dataset_warnings") or ()]
    return lines + [""] if lines else []


def _shapes_report(m: dict, figures) -> str:
    names = m["targets"]
    lines = [f"# Evaluation of a {m['model_kind'].upper()} model", "",
             f"Dataset `{m['dataset']}` (seed {m['seed']}, bands {m['bands']}), {m['n']} galaxies.", "",
             "Ellipticities are distortions, |e| = (a^2 - b^2)/(a^2 + b^2); bias convention "
             "e_obs = (1 + m) e_true + c (least squares, standard errors).", ""]
    lines += _caveats(m)
    lines += ["## Network", ""]
    ell = [nm for nm in names if nm in ELLIPTICITY]
    if ell:
        raw = all("rmse_uncalibrated" in m[nm] for nm in ell)
        lines += ["| target | RMSE |" + (" RMSE before the response removal |" if raw else "")
                  + " RMSE of e = 0 | m | c | n |", "|---|---|---|---|---|---|" + ("---|" if raw else "")]
        for nm in ell:
            t = m[nm]
            lines.append(f"| {nm} | {_ci(t['rmse'], t.get('rmse_ci95'))} |"
                         + (f" {_ci(t['rmse_uncalibrated'], t.get('rmse_uncalibrated_ci95'))} |" if raw else "")
                         + f" {_ci(t.get('rmse_zero'), t.get('rmse_zero_ci95'))} | {_fmt(t['m'])} ± {_fmt(t['m_err'])} | "
                         f"{_fmt(t['c'], '.5f')} ± {_fmt(t['c_err'], '.5f')} | {t['n']} |")
        lines += ["", "[lo, hi]: 95% intervals (percentile bootstrap over the stamps; m and c: ± one standard error). "
                  "RMSE of e = 0: what answering e = 0 for every galaxy would score."
                  + (" Before the response removal: the network's own estimate, which its squared-error "
                     "training shrinks towards 0 where the stamp says little (its m is the response below "
                     "minus 1); removing the response brings m near 0, and where the noise is large it raises the RMSE."
                     if raw else ""), ""]
    source = m.get("calibration_source")
    source = (f"{source.get('path')} (seed {source.get('seed')}, {source.get('n')} stamps)"
              if isinstance(source, dict) else "its validation split")
    from cosmolit.models.targets import PLAUSIBLE_RESPONSE

    for nm, r in (m.get("response_calibration") or {}).items():
        odd = not PLAUSIBLE_RESPONSE[0] <= r["slope"] <= PLAUSIBLE_RESPONSE[1]
        lines.append(f"- {nm}: the model removes the response 1 + m = {_fmt(r['slope'], '.4f')}, "
                     f"c = {_fmt(r['intercept'], '.5f')} that it measured on {source}."
                     + (f" **Implausible response: it multiplies the {nm} predictions by {1 / r['slope']:.3g}.**"
                        if odd else ""))
    if m.get("uncertainty_calibration"):
        lines.append(f"- uncertainty calibration (factor on each predicted sigma, fitted on {source}): "
                     + ", ".join(f"{nm} {_fmt(v, '.3f')}" for nm, v in m["uncertainty_calibration"].items()) + ".")
    if m.get("response_calibration") or m.get("uncertainty_calibration"):
        lines.append("")
    for nm in names:
        if nm in ELLIPTICITY:
            continue
        t = m[nm]
        extra = (f", |dz|/(1+z) mean {_fmt(t['abs_dz_norm_mean'])}, sigma_NMAD {_fmt(t['sigma_nmad'])}, "
                 f"outliers (>0.15) {_fmt(t['outlier_frac'], '.3f')}") if "sigma_nmad" in t else ""
        lines.append(f"- {nm}: RMSE {_ci(t['rmse'], t.get('rmse_ci95'))} (answering the mean of the true values: "
                     f"{_ci(t.get('rmse_mean'), t.get('rmse_mean_ci95'))}), bias {_fmt(t['bias'])}{extra}")
    lines.append("")
    if "coverage_68" in m:
        lines += [f"## Uncertainties ({m.get('uncertainty', '')})", "",
                  "| target | coverage 68% | coverage 95% | pull mean | pull std | Spearman(sigma, abs err) |",
                  "|---|---|---|---|---|---|"]
        for nm in names:
            t = m[nm]
            lines.append(f"| {nm} | {_ci(t.get('coverage_68'), t.get('coverage_68_ci95'), '.3f')} | "
                         f"{_ci(t.get('coverage_95'), t.get('coverage_95_ci95'), '.3f')} | "
                         f"{_fmt(t.get('pull_mean'), '.3f')} | {_fmt(t.get('pull_std'), '.3f')} | "
                         f"{_fmt(t.get('spearman_sigma_error'), '.3f')} |")
        lines += [f"| mean | {_ci(m['coverage_68'], m.get('coverage_68_ci95'), '.3f')} | "
                  f"{_ci(m['coverage_95'], m.get('coverage_95_ci95'), '.3f')} | | | "
                  f"{_fmt(m.get('spearman_sigma_error'), '.3f')} |"]
        lines += ["", "Coverage: [lo, hi] is the 95% percentile-bootstrap interval over the stamps.",
                  f"Gaussian NLL with the full covariance (mean per galaxy): {_fmt(m['nll'])}."]
        if "auroc_epistemic_blend" in m:
            lines.append(f"AUROC of the epistemic sigma for telling blends from isolated galaxies: "
                         f"{_ci(m['auroc_epistemic_blend'], m.get('auroc_epistemic_blend_ci95'), '.3f')} "
                         f"(standard error {_fmt(m.get('auroc_epistemic_blend_se'), '.3f')}, Hanley-McNeil; "
                         "interval ± 1.96 se).")
        lines.append("")
    hsm_keys = [k for k in ("hsm_regauss", "hsm_ksb") if k in m]
    if hsm_keys:
        h0 = m[hsm_keys[0]]
        lines += ["## GalSim HSM baseline (same stamps)", "",
                  f"Band {h0['band']}, PSF model {h0['psf']} at {h0['pixel_scale']} arcsec/pixel, sky variance "
                  f"{h0['sky_var']}. KSB's reduced shear g is converted to distortion e = 2g/(1+|g|^2). "
                  "Failures are counted; the statistics use the galaxies where HSM succeeded, and the network is "
                  "shown on that same subset. Measurements with |e| > 1 are kept (counted in metrics.json as "
                  "n_abs_e_gt_1).", "",
                  "| method | failures | target | HSM RMSE | HSM m | HSM c | network RMSE (same galaxies) | network m |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in hsm_keys:
            h = m[k]
            for nm in ell:
                a, b = h[nm], h["network"][nm]
                lines.append(f"| {k[4:].upper()} | {h['n_failed']}/{h['n']} ({_fmt(h['failure_rate'], '.1%')}) | {nm} | "
                             f"{_ci(a['rmse'], a.get('rmse_ci95'))} | {_fmt(a['m'])} ± {_fmt(a['m_err'])} | "
                             f"{_fmt(a['c'], '.5f')} ± {_fmt(a['c_err'], '.5f')} | {_ci(b['rmse'], b.get('rmse_ci95'))} | "
                             f"{_fmt(b['m'])} ± {_fmt(b['m_err'])} |")
        lines.append("")
    elif "hsm_skipped" in m:
        lines += [f"HSM baseline skipped: {m['hsm_skipped']}.", ""]
    lines += ["## Figures", ""]
    for fname, caption in figures:
        lines += [f"![{caption}]({fname})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- generation
UNITS = {"size": "pixels, adaptive-moment sigma", "abs_e": "distortion", "e1": "distortion", "e2": "distortion"}


def evaluate_generation(out_dir, real_images, generated, bands: str, pixel_scale: float,
                        reconstructions=None, progress: bool = True, band: str | None = None,
                        reference: str = "images", snr=None, redrawn: int = 0, data_overlap: Sequence[str] = (),
                        warnings: Sequence[str] = ()) -> dict:
    """Compare generated (M, B, H, W) with simulated (N, B, H, W) galaxies [electrons].

    `redrawn`: how many generated galaxies were drawn again for implausible pixels
    (cosmolit.infer.generate_images), recorded as `n_redrawn`. `data_overlap` and `warnings`: as
    for evaluate_shapes.

    `reference` names what real_images are, recorded as `reference_images`: "clean" (the
    noiseless stamps, what a denoising VAE generates) or "images" (the noisy ones).

    Statistics per stamp: adaptive-moment size (moments_sigma, pixels) and observed shape
    (distortion) in `band` (default i, else r), summed flux per band, colours of adjacent bands.
    Writes metrics.json (ks, ks_pvalue, medians, failures), report.md, generated_grid.png,
    simulated_grid.png, distributions.png and, with reconstructions = (inputs, targets, recon),
    reconstructions.png. Returns the metrics dict.

    With reconstructions, their sizes and shapes are measured against their targets' too
    (`reconstruction.ks`, `reconstruction.shape_transfer`, shape_transfer.png): whether a gap
    between generated and simulated shapes is already in the autoencoder or comes from the latent
    flow. `snr` (n,), the targets' S/N, splits the shape response into S/N quantile bins.
    """
    from cosmolit.measure import plots
    from cosmolit.measure.morphology import image_statistics, ks_statistics, shape_transfer

    out = _out_dir(out_dir)
    real = np.asarray(real_images, dtype=np.float32)
    gen = np.asarray(generated, dtype=np.float32)
    for what, arr in (("real_images", real), ("generated", gen)):
        if arr.ndim != 4 or arr.shape[1] != len(bands) or arr.shape[0] == 0:
            raise UsageError(f"{what} must be (N, {len(bands)}, H, W) with N > 0 for bands {bands!r}, got {arr.shape}")
    rs = image_statistics(real, bands, pixel_scale, band=band, progress=progress, label="(simulated)")
    gs = image_statistics(gen, bands, pixel_scale, band=band, progress=progress, label="(generated)")
    ks = ks_statistics(rs["stats"], gs["stats"])

    def _median(a):
        a = np.asarray(a, float)
        a = a[np.isfinite(a)]
        return float(np.median(a)) if a.size else float("nan")

    metrics: dict[str, Any] = {
        "model_kind": "vae",
        "n_real": int(real.shape[0]),
        "n_generated": int(gen.shape[0]),
        "n_redrawn": int(redrawn),
        "reference_images": reference,
        "data_overlap": list(data_overlap),
        "dataset_warnings": list(warnings),
        "bands": bands,
        "pixel_scale": float(pixel_scale),
        "shape_band": rs["band"],
        "ks": ks["ks"],
        "ks_pvalue": ks["ks_pvalue"],
        "medians": {k: {"simulated": _median(rs["stats"][k]), "generated": _median(gs["stats"][k])}
                    for k in rs["stats"]},
        "adaptive_moments_failures": {"real": rs["n_failed_moments"], "generated": gs["n_failed_moments"]},
        "adaptive_moments_failure_rate": {"real": rs["n_failed_moments"] / real.shape[0],
                                          "generated": gs["n_failed_moments"] / gen.shape[0]},
    }
    figures = []
    plots.stamp_grid(gen[:64], bands, out / "generated_grid.png", title="generated galaxies (i, r, g)")
    plots.stamp_grid(real[:64], bands, out / "simulated_grid.png", title="simulated galaxies (i, r, g)")
    figures += [("generated_grid.png", "generated galaxies"), ("simulated_grid.png", "simulated galaxies")]
    plots.distributions(rs["stats"], gs["stats"], ks["ks"], out / "distributions.png", units=UNITS)
    figures.append(("distributions.png", "simulated against generated distributions"))
    if reconstructions is not None:
        inputs, targets, recon = (np.asarray(a, dtype=np.float32) for a in reconstructions)
        if not (inputs.shape == targets.shape == recon.shape) or inputs.ndim != 4:
            raise UsageError(f"reconstructions must be three arrays of one shape (n, B, H, W), got "
                             f"{inputs.shape}, {targets.shape}, {recon.shape}")
        diff = (recon - targets).astype(np.float64)  # (n, B, H, W)
        tflux, rflux = targets.sum(axis=(-2, -1)), recon.sum(axis=(-2, -1))  # (n, B)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(tflux > 0, (rflux - tflux) / tflux, np.nan)
        # `evaluate` reconstructs the very stamps it compares with: measure them once
        same = targets.shape == real.shape and np.array_equal(targets, real)
        ts = rs if same else image_statistics(targets, bands, pixel_scale, band=rs["band"], progress=progress,
                                              label="(targets)")
        rcs = image_statistics(recon, bands, pixel_scale, band=rs["band"], progress=progress,
                               label="(reconstructions)")
        transfer = shape_transfer(ts["stats"], rcs["stats"], snr)
        rks = ks_statistics({k: ts["stats"][k] for k in ("size", "abs_e")},
                            {k: rcs["stats"][k] for k in ("size", "abs_e")})
        metrics["reconstruction"] = {
            "n": int(inputs.shape[0]),
            "rmse_per_band": {b: float(np.sqrt(np.mean(diff[:, k] ** 2))) for k, b in enumerate(bands)},
            "median_relative_flux_error": {b: _median(rel[:, k]) for k, b in enumerate(bands)},
            "ks": rks["ks"],
            "ks_pvalue": rks["ks_pvalue"],
            "median_size": {"target": _median(ts["stats"]["size"]), "reconstruction": _median(rcs["stats"]["size"])},
            "shape_transfer": transfer,
        }
        plots.reconstruction_grid(inputs, targets, recon, bands, out / "reconstructions.png")
        figures.append(("reconstructions.png", "input / clean target / reconstruction / residual"))
        plots.shape_transfer(ts["stats"]["abs_e"], rcs["stats"]["abs_e"], transfer, out / "shape_transfer.png")
        figures.append(("shape_transfer.png", "reconstructed against true shapes, and the shape response by S/N"))
    metrics["figures"] = [f for f, _ in figures]
    clean = to_jsonable(metrics)
    write_json(out / "metrics.json", clean)
    _write_text(out / "report.md", _generation_report(clean, figures))
    return clean


REFERENCE_WORDS = {"clean": "their noiseless stamps", "images": "their noisy stamps"}


def _generation_report(m: dict, figures) -> str:
    lines = ["# Evaluation of a VAE generator", "",
             f"{m['n_generated']} generated against {m['n_real']} simulated galaxies "
             f"({REFERENCE_WORDS.get(m.get('reference_images'), 'stamps')}; bands {m['bands']}, "
             f"{m['pixel_scale']} arcsec/pixel). Size and shape from galsim.hsm.FindAdaptiveMom in the "
             f"{m['shape_band']} band (moments_sigma in pixels, observed_shape as distortion, not PSF-corrected); "
             "flux summed over the stamp [electrons]; colours -2.5 log10(F_b1/F_b2) of adjacent bands.", ""]
    lines += _caveats(m)
    lines += ["| statistic | KS | p-value | median simulated | median generated |", "|---|---|---|---|---|"]
    for k, v in m["ks"].items():
        med = m["medians"].get(k, {})
        lines.append(f"| {k} | {_fmt(v, '.3f')} | {_fmt(m['ks_pvalue'].get(k), '.3g')} | "
                     f"{_fmt(med.get('simulated'), '.4g')} | {_fmt(med.get('generated'), '.4g')} |")
    f = m["adaptive_moments_failures"]
    lines += ["", f"FindAdaptiveMom failures: {f['real']} of {m['n_real']} simulated, "
              f"{f['generated']} of {m['n_generated']} generated (left out of size and shape statistics).", ""]
    if m.get("n_redrawn"):
        from cosmolit.infer import REDRAWN_WHY

        lines += [f"{m['n_redrawn']} generated galaxies were drawn again: {REDRAWN_WHY}.", ""]
    if "reconstruction" in m:
        r = m["reconstruction"]
        lines += [f"Reconstructions of {r['n']} stamps: RMSE per band [electrons] "
                  + ", ".join(f"{b} {_fmt(v, '.1f')}" for b, v in r["rmse_per_band"].items())
                  + "; median relative flux error "
                  + ", ".join(f"{b} {_fmt(v, '+.3f')}" for b, v in r["median_relative_flux_error"].items()) + ".", ""]
        if "shape_transfer" in r:
            st = r["shape_transfer"]
            pv = r.get("ks_pvalue") or {}
            lines += [f"Reconstructions against their targets: KS size {_fmt(r['ks'].get('size'), '.3f')} "
                      f"(p-value {_fmt(pv.get('size'), '.3g')}), KS abs(e) {_fmt(r['ks'].get('abs_e'), '.3f')} "
                      f"(p-value {_fmt(pv.get('abs_e'), '.3g')}). Shape response (sum e_rec.e_true / "
                      "sum e_true.e_true; 1 when the reconstructions keep the shapes, below 1 when they are rounder):",
                      "", "| targets | n | median abs(e) target | median abs(e) reconstruction | shape response |",
                      "|---|---|---|---|---|"]
            for name, row in [("all", st["all"])] + [
                    (f"S/N {_fmt(b['snr_min'], '.3g')} to {_fmt(b['snr_max'], '.3g')}", b) for b in st["by_snr"]]:
                lines.append(f"| {name} | {row['n']} | {_fmt(row['median_abs_e_target'], '.3f')} | "
                             f"{_fmt(row['median_abs_e_reconstruction'], '.3f')} | {_fmt(row['response'], '.3f')} |")
            lines.append("")
    lines += ["## Figures", ""]
    for fname, caption in figures:
        lines += [f"![{caption}]({fname})", ""]
    return "\n".join(lines)
