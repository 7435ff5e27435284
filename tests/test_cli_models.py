"""End to end through the CLI on tiny data: fit / evaluate / predict / generate / info, and the
five-line "load and predict" example in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cosmolit.cli import app
from cosmolit.dataset import inspect_dataset

TINY = {
    "cnn": "model: {filters: [4, 8]}\n",
    "bnn": "model: {filters: [4, 8], samples: 4}\n",
    "vae": "model: {filters: [4, 8], latent_dim: 4, flow_layers: 2, flow_hidden: [16], flow_epochs: 2}\n",
}


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    return res.output


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, synthetic_small_h5):
    """kind -> run folder, each trained 1 epoch on the 48-stamp gri 32x32 set."""
    root = tmp_path_factory.mktemp("fits")
    runs = {}
    for kind, text in TINY.items():
        cfg = root / f"{kind}.yaml"
        cfg.write_text(text)
        out = root / kind
        output = run("fit", "--model", kind, "--data", synthetic_small_h5, "--out", out, "--config", cfg,
                     "--epochs", "1", "--batch-size", "8", "--accelerator", "cpu", "-q")
        assert "model checkpoint" in output
        runs[kind] = out
    return runs


@pytest.mark.parametrize("kind", ["cnn", "bnn", "vae"])
def test_fit_writes_checkpoints_and_logs(fitted, kind):
    out = fitted[kind]
    for name in ("model.ckpt", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "logs/metrics.csv"):
        assert (out / name).is_file(), name
    assert "val_loss" in (out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert not list(out.rglob("*.partial*"))  # no temporary file left behind


def test_evaluate_cnn_metrics_keys(fitted, synthetic_small_h5, tmp_path):
    run("evaluate", "--ckpt", fitted["cnn"] / "model.ckpt", "--data", synthetic_small_h5, "--out", tmp_path / "ev",
        "--no-hsm", "-q", "--accelerator", "cpu", "--allow-training-data")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 48 and m["seed"] == 5
    for t in ("e1", "e2"):
        assert {"rmse", "m", "m_err", "c", "c_err"} <= set(m[t]), t
        assert np.isfinite(m[t]["rmse"])
    assert np.isfinite(m["redshift"]["rmse"])
    assert (tmp_path / "ev" / "report.md").is_file()
    # the response fit measured on the validation split travels in model.ckpt and into metrics.json
    import torch

    response = torch.load(fitted["cnn"] / "model.ckpt", weights_only=True)["state_dict"]["target_transform.response"]
    expected = {t: {"slope": pytest.approx(float(response[k, 0])), "intercept": pytest.approx(float(response[k, 1]))}
                for k, t in enumerate(("e1", "e2")) if response[k].tolist() != [1.0, 0.0]}
    assert m["response_calibration"] == expected
    scale = torch.load(fitted["cnn"] / "model.ckpt", weights_only=True)["state_dict"]["target_transform.sigma_scale"]
    assert m["uncertainty_calibration"] == {t: pytest.approx(float(scale[k])) for k, t in enumerate(m["targets"])
                                            if float(scale[k]) != 1.0}
    assert len(m["uncertainty_calibration"]) == 3  # fitted for every target
    # best.ckpt was chosen by the standardised squared error of the means (decoupled loss)
    callbacks = torch.load(fitted["cnn"] / "model.ckpt", weights_only=True)["callbacks"]
    assert any("'monitor': 'val_mse'" in key for key in callbacks), list(callbacks)
    assert response[2].tolist() == [1.0, 0.0]  # redshift is not calibrated by default


def test_evaluate_with_hsm(fitted, tmp_path):
    pytest.importorskip("galsim")
    from cosmolit.sim import load_simulation_config, simulate_to_file

    # the simulator's bright, resolved, noiseless gri 32x32 galaxies: HSM, given the file's band, PSF and
    # pixel scale by `evaluate`, measures every one and recovers the truth distortions
    cfg = load_simulation_config(None, {"stamp_size": 32, "bands": "gri", "noise.mode": "none",
                                        "population.mag_i_max": 22.0, "population.hlr_min": 0.4,
                                        "population.hlr_max": 0.7})
    few = simulate_to_file(cfg, tmp_path / "few.h5", n=6, seed=11, progress=False)
    run("evaluate", "--ckpt", fitted["cnn"] / "model.ckpt", "--data", few, "--out", tmp_path / "ev", "-q",
        "--accelerator", "cpu")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key, tol in (("hsm_regauss", 0.01), ("hsm_ksb", 0.03)):
        h = m[key]
        assert h["n"] == 6 and h["n_failed"] == 0 and h["failure_rate"] == 0.0, h
        assert h["band"] == "i" and h["psf"].startswith("Kolmogorov FWHM 0.790 arcsec")
        assert h["e1"]["n"] == 6 and h["e1"]["rmse"] < tol and h["e2"]["rmse"] < tol, (key, h)
    # --limit: the first stamps only, for the network and for HSM alike
    run("evaluate", "--ckpt", fitted["cnn"] / "model.ckpt", "--data", few, "--out", tmp_path / "ev4", "-q",
        "--accelerator", "cpu", "--limit", "4")
    m4 = json.loads((tmp_path / "ev4" / "metrics.json").read_text())
    assert m4["n"] == 4 and m4["hsm_regauss"]["n"] == 4


@pytest.mark.parametrize("kind, extra", [("cnn", []), ("bnn", ["--samples", "4"])])
def test_predict_writes_dataset_format(fitted, synthetic_small_h5, tmp_path, kind, extra):
    out = tmp_path / "pred.h5"
    run("predict", "--ckpt", fitted[kind] / "model.ckpt", "--data", synthetic_small_h5, "--out", out, "-q",
        "--accelerator", "cpu", *extra)
    info = inspect_dataset(out)  # readable as a dataset by every other command
    assert info.n == 48 and info.bands == "gri"
    with h5py.File(out, "r") as f:
        assert f["predictions/mean"].shape == (48, 3)
        cov = f["predictions/cov"][()]
        assert cov.shape == (48, 3, 3)
        assert np.all(np.linalg.eigvalsh(cov.astype(np.float64)) > -1e-6)
        if kind == "bnn":
            assert f["predictions/epistemic_cov"].shape == (48, 3, 3)


def test_generate_and_same_seed_same_bytes(fitted, tmp_path, synthetic_small_h5):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run("generate", "--ckpt", fitted["vae"] / "model.ckpt", "--n", "8", "--out", a, "--png", tmp_path / "g.png",
        "-q", "--accelerator", "cpu", "--seed", "3")
    run("generate", "--ckpt", fitted["vae"] / "model.ckpt", "--n", "8", "--out", b, "-q", "--accelerator", "cpu",
        "--seed", "3")
    info = inspect_dataset(a)
    assert (info.n, info.bands, info.height) == (8, "gri", 32)
    source = inspect_dataset(synthetic_small_h5)  # the VAE's training file: survey facts carry over
    assert info.pixel_scale == source.pixel_scale and info.psf_fwhm == source.psf_fwhm
    assert (tmp_path / "g.png").stat().st_size > 0
    assert a.read_bytes() == b.read_bytes()


def test_info_on_checkpoint_and_dataset(fitted, synthetic_small_h5):
    text = run("info", fitted["cnn"] / "model.ckpt")
    for word in ("model           cnn", "seed", "torch", "pytorch-lightning", "config:", "filters"):
        assert word in text, word
    text = run("info", synthetic_small_h5)
    assert "gri" in text and "seed            5" in text and "cosmolit" in text


def test_load_and_predict_example_in_fresh_process(fitted, synthetic_small_h5):
    code = f"""
from cosmolit.models import ShapeCNN
from cosmolit.infer import load_images
import torch
model = ShapeCNN.load_from_checkpoint({str(fitted['cnn'] / 'model.ckpt')!r}, map_location="cpu").eval()
mean, scale_tril = model(torch.from_numpy(load_images({str(synthetic_small_h5)!r}, limit=4)))
print(list(model.hparams.targets), tuple(mean.shape))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "['e1', 'e2', 'redshift'] (4, 3)" in res.stdout


def test_evaluate_vae_compares_with_the_clean_stamps(fitted, synthetic_small_h5, tmp_path):
    """The denoising VAE generates noiseless galaxies: the simulated side of the comparison is `clean`."""
    pytest.importorskip("galsim")
    out = tmp_path / "eval_vae"
    run("evaluate", "--ckpt", fitted["vae"] / "model.ckpt", "--data", synthetic_small_h5, "--n-generate", "16",
        "--out", out, "-q", "--accelerator", "cpu", "--allow-training-data")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference_images"] == "clean" and metrics["n_real"] == 16
    with h5py.File(synthetic_small_h5, "r") as f:
        clean_flux = f["clean"][:16].astype(np.float64).sum(axis=(-2, -1))  # (16, B)
        noisy_flux = f["images"][:16].astype(np.float64).sum(axis=(-2, -1))
    for k, band in enumerate("gri"):
        simulated = metrics["medians"][f"flux_{band}"]["simulated"]
        assert simulated == pytest.approx(np.median(clean_flux[:, k]), rel=1e-4)
        assert simulated != pytest.approx(np.median(noisy_flux[:, k]), rel=1e-4)
    assert {"size", "abs_e"} <= set(metrics["ks"])
    assert "noiseless" in (out / "report.md").read_text()
    # the same 16 stamps reconstructed, their shapes measured against the clean targets, by S/N
    rec = metrics["reconstruction"]
    assert rec["n"] == 16 and set(rec["ks"]) == {"size", "abs_e"}
    bins = rec["shape_transfer"]["by_snr"]
    assert len(bins) == 4 and sum(b["n"] for b in bins) == rec["shape_transfer"]["all"]["n"]  # an untrained VAE: maybe 0
    assert (out / "shape_transfer.png").stat().st_size > 0


def _raw_predictions(ckpt, data):
    """Uncalibrated e1, e2 means of a CNN checkpoint on a file, and the truth."""
    import torch

    from cosmolit.checkpoint import load_model
    from cosmolit.dataset import iter_images, read_truth

    net, _, _ = load_model(ckpt)
    with torch.no_grad():
        pred = np.concatenate([net.estimate(torch.from_numpy(b), calibrated=False)["mean"].numpy()
                               for _, b in iter_images(data, 16)])
    truth = read_truth(data, ["e1", "e2"])
    return pred[:, :2].astype(np.float64), np.stack([truth["e1"], truth["e2"]], 1).astype(np.float64)


def test_calibrate_refits_the_response_on_another_dataset(fitted, tmp_path, monkeypatch):
    import torch

    from cosmolit.models import targets as targets_module
    from cosmolit.synthetic import write_synthetic_dataset

    # one epoch on 48 stamps learns no e1, e2 (slopes ~0.005): let any slope through so that the
    # response path is what this test checks, not the "left uncalibrated" one
    monkeypatch.setattr(targets_module, "MIN_RESPONSE", 0.0)

    cal = write_synthetic_dataset(tmp_path / "cal.h5", n=40, bands="gri", size=32, seed=12)
    src = fitted["cnn"] / "model.ckpt"
    out = tmp_path / "recal.ckpt"
    output = run("calibrate", "--ckpt", src, "--data", cal, "--out", out, "-q", "--accelerator", "cpu")
    assert "40 stamps, seed 12" in output
    old, new = (torch.load(p, weights_only=True) for p in (src, out))
    # the weights are untouched; only the calibration buffers changed
    changed = {k for k in old["state_dict"] if not torch.equal(old["state_dict"][k], new["state_dict"][k])}
    assert changed <= {"target_transform.response", "target_transform.sigma_scale"} and changed
    # the response is the slope through the origin of the raw predictions on the calibration set
    pred, truth = _raw_predictions(src, cal)
    response = new["state_dict"]["target_transform.response"]
    slopes = [float(truth[:, k] @ pred[:, k] / (truth[:, k] @ truth[:, k])) for k in range(2)]
    assert max(slopes) > 0  # at least one component takes the response path
    for k, slope in enumerate(slopes):
        expected = [slope, 0.0] if slope > 0 else [1.0, 0.0]  # a negative slope is left uncalibrated
        assert response[k].tolist() == pytest.approx(expected, rel=1e-4)
    record = new["cosmolit"]["calibration"]
    assert (record["seed"], record["n"], Path(record["path"])) == (12, 40, cal.resolve())
    assert run("info", out).count("calibrated on") == 1
    # evaluate names the calibration set
    run("evaluate", "--ckpt", out, "--data", cal, "--out", tmp_path / "ev", "--no-hsm", "-q", "--accelerator", "cpu",
        "--allow-training-data")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["calibration_source"] == {"path": str(cal.resolve()), "seed": 12, "n": 40}
    assert "seed 12, 40 stamps" in (tmp_path / "ev" / "report.md").read_text()


def test_calibrate_bnn_and_bad_input(fitted, synthetic_small_h5, tmp_path):
    out = tmp_path / "bnn.ckpt"
    run("calibrate", "--ckpt", fitted["bnn"] / "model.ckpt", "--data", synthetic_small_h5, "--out", out, "-q",
        "--accelerator", "cpu", "--allow-training-data")
    assert out.is_file()
    before = out.read_bytes()
    for args, words in [
        (["--ckpt", fitted["bnn"] / "model.ckpt", "--out", out], "already exists"),
        (["--ckpt", fitted["vae"] / "model.ckpt", "--out", tmp_path / "v.ckpt"], "only cnn and bnn"),
        (["--ckpt", fitted["cnn"] / "model.ckpt", "--out", tmp_path / "c.ckpt", "--batch-size", "0"], "positive"),
    ]:
        res = CliRunner().invoke(app, ["calibrate", "--data", str(synthetic_small_h5), "-q",
                                       *[str(a) for a in args]])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
    nan = tmp_path / "nan.h5"  # a copy of the training file (recognised as such: allowed here)
    nan.write_bytes(Path(synthetic_small_h5).read_bytes())
    with h5py.File(nan, "r+") as f:
        f["truth/e2"][3] = np.nan
    res = CliRunner().invoke(app, ["calibrate", "--data", str(nan), "--ckpt", str(fitted["cnn"] / "model.ckpt"),
                                   "--out", str(tmp_path / "n.ckpt"), "-q", "--allow-training-data"])
    assert res.exit_code == 2 and "truth/e2 is NaN/Inf" in res.output and not (tmp_path / "n.ckpt").exists()
    assert out.read_bytes() == before  # nothing overwritten
    assert not (tmp_path / "v.ckpt").exists() and not (tmp_path / "c.ckpt").exists()


def test_vae_trained_on_clean_inputs(synthetic_small_h5, tmp_path):
    import torch

    cfg = tmp_path / "vae.yaml"
    cfg.write_text(TINY["vae"].rstrip("}\n") + ", inputs: clean}\n")
    run("fit", "--model", "vae", "--data", synthetic_small_h5, "--out", tmp_path / "v", "--config", cfg,
        "--epochs", "1", "--batch-size", "8", "--accelerator", "cpu", "-q")
    ckpt = torch.load(tmp_path / "v" / "model.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["inputs"] == "clean"
    run("evaluate", "--ckpt", tmp_path / "v" / "model.ckpt", "--data", synthetic_small_h5, "--out", tmp_path / "ev",
        "--n-generate", "16", "-q", "--accelerator", "cpu", "--allow-training-data")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["reference_images"] == "clean"
    cfg.write_text(TINY["vae"].rstrip("}\n") + ", inputs: noiseless}\n")
    res = CliRunner().invoke(app, ["fit", "--model", "vae", "--data", str(synthetic_small_h5), "--out",
                                   str(tmp_path / "bad"), "--config", str(cfg), "-q"])
    assert res.exit_code == 2 and "model.inputs: 'noiseless' is not allowed" in res.output, res.output
    assert not (tmp_path / "bad").exists()


def test_fit_leaves_out_lightnings_pytree_deprecation_and_nothing_else():
    import warnings

    from cosmolit.train import library_noise_filtered

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with library_noise_filtered():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
                          FutureWarning)
            warnings.warn("The dataloader does not have many workers", UserWarning)
    assert [str(w.message) for w in seen] == ["The dataloader does not have many workers"]
