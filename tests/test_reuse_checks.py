"""Reusing a checkpoint on other data: pixel scale, PSF and depth against the training's, a response
that is implausibly small, the seed of the BNN's draws in evaluate, the training and calibration
files refused by evaluate and calibrate, and the HSM baseline's PSF rebuilt from a file's config."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cosmolit.cli import app
from cosmolit.errors import UsageError

SMALL = dict(bands="gri", stamp=32, filters=(4, 8))
PROV = {"path": "/nowhere/train.h5", "pixel_scale": 0.2, "psf_fwhm": [0.86, 0.81, 0.79],
        "sky_level": [100.0, 200.0, 400.0]}


def run(*args, code=0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    return res.output


def _info(pixel_scale=0.2, psf=(0.86, 0.81, 0.79), attrs=None):
    from cosmolit.dataset import DatasetInfo

    return DatasetInfo(path="other.h5", n=10, bands="gri", height=32, width=32, pixel_scale=pixel_scale,
                       psf_fwhm=list(psf), seed=1, config="", truth_names=[], has_clean=False, format_version=1,
                       cosmolit_version="", attrs=dict(attrs or {}))


def test_check_compatible_refuses_another_pixel_scale_and_warns_about_psf_and_depth():
    from cosmolit.models.cnn import ShapeCNN

    model = ShapeCNN(**SMALL, provenance=PROV)
    same = {"sky_level": [100.0, 200.0, 400.0]}
    assert model.check_compatible(_info(attrs=same)) == []
    with pytest.raises(UsageError, match=r"pixel scale of 0\.3 arcsec .* trained on 0\.2 arcsec"):
        model.check_compatible(_info(pixel_scale=0.3, attrs=same))
    said = []
    lines = model.check_compatible(_info(psf=(0.86, 0.81, 0.95), attrs={"sky_level": [100.0, 200.0, 40.0]}),
                                   echo=said.append)
    assert said == lines and len(lines) == 1
    assert "PSF FWHM i 0.95 (trained 0.79)" in lines[0] and "depth) i 40 (trained 400)" in lines[0]
    assert " g 0" not in lines[0] and " r 0" not in lines[0]  # the bands within the tolerance are not named


def test_check_compatible_accepts_files_without_the_attributes():
    from cosmolit.models.cnn import ShapeCNN

    foreign = _info(pixel_scale=float("nan"), psf=[float("nan")] * 3)
    lines = ShapeCNN(**SMALL, provenance=PROV).check_compatible(foreign)
    assert len(lines) == 1 and "no pixel_scale, psf_fwhm, sky_level attribute" in lines[0]
    # an old checkpoint without pixel scale, PSF or sky level in its provenance checks nothing more
    assert ShapeCNN(**SMALL, provenance={"path": "x.h5"}).check_compatible(_info(pixel_scale=0.3)) == []
    assert ShapeCNN(**SMALL).check_compatible(foreign) == []


def test_an_implausible_response_is_warned_about_and_a_tiny_one_left_out():
    import torch

    from cosmolit.models.targets import TargetTransform

    rng = np.random.default_rng(0)
    truth = rng.normal(0, 0.3, (200, 2))
    tt = TargetTransform(["e1", "e2"], calibrate=["e1", "e2"])
    said = []
    found = tt.fit_response(truth * np.array([0.06, 0.9]), truth, echo=said.append)
    assert set(found) == {"e1", "e2"} and found["e1"]["slope"] == pytest.approx(0.06)
    assert len(said) == 1 and "e1: response 0.060" in said[0] and "by 16.7" in said[0]
    assert tt.response[0, 0].item() == pytest.approx(0.06)  # applied all the same
    said.clear()
    tt.reset_calibration()
    assert tt.fit_response(truth * 0.01, truth, echo=said.append) == {}
    assert len(said) == 2 and all("left uncalibrated" in s for s in said)
    assert torch.equal(tt.response, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from cosmolit.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("reuse")
    train = write_synthetic_dataset(root / "train.h5", n=48, bands="gri", size=32, seed=5)
    test = write_synthetic_dataset(root / "test.h5", n=24, bands="gri", size=32, seed=6)
    cal = write_synthetic_dataset(root / "cal.h5", n=24, bands="gri", size=32, seed=7)
    cfg = root / "bnn.yaml"
    cfg.write_text("model: {filters: [4, 8], samples: 4}\n")
    run("fit", "--model", "bnn", "--data", train, "--out", root / "bnn", "--config", cfg, "--epochs", "1",
        "--batch-size", "8", "--accelerator", "cpu", "-q")
    return {"root": root, "train": train, "test": test, "cal": cal, "ckpt": root / "bnn" / "model.ckpt"}


def _evaluate(files, data, out, *extra, code=0):
    return run("evaluate", "--ckpt", files["ckpt"], "--data", data, "--out", files["root"] / out, "--no-hsm", "-q",
               "-a", "cpu", *extra, code=code)


def _metrics(files, out):
    return json.loads((files["root"] / out / "metrics.json").read_text())


def test_evaluate_seed_reaches_the_bnn_draws(files):
    from cosmolit.checkpoint import load_model
    from cosmolit.infer import predict_shapes

    for out, seed in (("s1", 1), ("s1b", 1), ("s2", 2)):
        _evaluate(files, files["test"], out, "--seed", seed)
    a, b, c = (_metrics(files, out) for out in ("s1", "s1b", "s2"))
    a.pop("dataset"), b.pop("dataset"), c.pop("dataset")
    assert a == b and a["bnn_seed"] == 1
    assert c["bnn_seed"] == 2 and c["e1"]["rmse"] != a["e1"]["rmse"]
    net, kind, _ = load_model(files["ckpt"])
    one, two = (predict_shapes(net, kind, files["test"], batch_size=8, progress=False, seed=s)["mean"] for s in (1, 2))
    assert not np.allclose(one, two)
    # the same draws for every batch: a stamp's prediction does not depend on the batch size
    np.testing.assert_allclose(one, predict_shapes(net, kind, files["test"], batch_size=24, progress=False,
                                                   seed=1)["mean"], rtol=1e-5, atol=1e-6)


def test_evaluate_refuses_the_training_file_and_its_copies(files):
    out = _evaluate(files, files["train"], "t", code=2)
    assert "is the training file of this checkpoint" in out and "--allow-training-data" in out
    assert not (files["root"] / "t").exists()
    copy = files["root"] / "elsewhere" / "copy.h5"
    copy.parent.mkdir()
    shutil.copy(files["train"], copy)
    assert "training file" in _evaluate(files, copy, "t", code=2)
    said = _evaluate(files, copy, "t", "--allow-training-data")
    assert "warning: evaluating on the checkpoint's training file" in said
    m = _metrics(files, "t")
    assert m["data_overlap"] == ["training"]
    assert "the file the model was trained on" in (files["root"] / "t" / "report.md").read_text()
    _evaluate(files, files["test"], "clean")
    assert _metrics(files, "clean")["data_overlap"] == []


def test_calibrate_refuses_the_training_file_and_evaluate_the_calibration_file(files):
    root = files["root"]
    out = run("calibrate", "--ckpt", files["ckpt"], "--data", files["train"], "--out", root / "r.ckpt", "-q",
              "-a", "cpu", code=2)
    assert "is the training file" in out and not (root / "r.ckpt").exists()
    cal = root / "moving" / "cal.h5"
    cal.parent.mkdir()
    shutil.copy(files["cal"], cal)
    run("calibrate", "--ckpt", files["ckpt"], "--data", cal, "--out", root / "r.ckpt", "-q", "-a", "cpu")
    moved = root / "moved.h5"
    shutil.move(cal, moved)  # the recorded fingerprint still recognises it
    files_r = {**files, "ckpt": root / "r.ckpt"}
    assert "is the calibration file" in _evaluate(files_r, moved, "c", code=2)
    _evaluate(files_r, moved, "c", "--allow-training-data")
    assert _metrics(files, "c")["data_overlap"] == ["calibration"]
    _evaluate(files_r, files["test"], "c2")


def test_overlap_by_fingerprint_path_and_content(files, tmp_path):
    from cosmolit.checkpoint import data_overlap
    from cosmolit.dataset import dataset_fingerprint

    train, test = files["train"], files["test"]
    fp = dataset_fingerprint(train)
    assert fp != dataset_fingerprint(test)
    copy = tmp_path / "copy.h5"
    shutil.copy(train, copy)
    assert dataset_fingerprint(copy) == fp
    assert data_overlap({"hyper_parameters": {"provenance": {"path": "/gone.h5", "fingerprint": fp}}}, copy) == ["training"]
    # an old record (no fingerprint): by path, or by the content of the recorded file while it exists
    old = {"hyper_parameters": {"provenance": {"path": str(train)}}}
    assert data_overlap(old, copy) == ["training"] and data_overlap(old, test) == []
    assert data_overlap({"hyper_parameters": {"provenance": {"path": "/gone.h5"}}}, copy) == []
    with h5py.File(copy, "r+") as f:  # another content under the same path
        f["images"][0] += 1.0
    assert data_overlap({"hyper_parameters": {"provenance": {"path": str(copy), "fingerprint": fp}}}, copy) == []


def _simulate(path, airy: bool):
    from cosmolit.sim.config import PSFConfig, SimulationConfig
    from cosmolit.sim.simulate import simulate_to_file

    cfg = SimulationConfig(bands="ri", stamp_size=32, psf=PSFConfig(airy=airy))
    simulate_to_file(cfg, path, n=2, seed=0, progress=False)
    return cfg


def test_hsm_psf_is_rebuilt_from_the_files_config(tmp_path):
    pytest.importorskip("galsim")
    from cosmolit.dataset import inspect_dataset
    from cosmolit.measure.hsm import psf_for_dataset
    from cosmolit.sim.survey import band_surveys, make_psf
    from cosmolit.synthetic import write_synthetic_dataset

    cfg = _simulate(tmp_path / "airy.h5", airy=True)
    info = inspect_dataset(tmp_path / "airy.h5")
    psf, words = psf_for_dataset(info, "i")
    assert "Airy" in words and "rebuilt from the file's config" in words

    def drawn(p):
        return p.drawImage(nx=32, ny=32, scale=0.2).array

    np.testing.assert_allclose(drawn(psf), drawn(make_psf(cfg, band_surveys(cfg, "i")[0])), atol=1e-7)
    _simulate(tmp_path / "plain.h5", airy=False)
    kolmogorov, words = psf_for_dataset(inspect_dataset(tmp_path / "plain.h5"), "i")
    assert words.endswith("alone, rebuilt from the file's config")
    assert np.abs(drawn(kolmogorov) - drawn(psf)).max() > 0.01 * drawn(psf).max()  # the Airy term widens it
    # run_hsm measures with the PSF it is given: another PSF model, other corrected shapes
    from cosmolit.measure.hsm import run_hsm

    with h5py.File(tmp_path / "airy.h5", "r") as f:
        clean = f["clean"][()]
    fwhm = info.psf_fwhm[1]
    given, assumed = (run_hsm(clean, "ri", "i", fwhm, 0.2, methods=("REGAUSS",), psf=p, progress=False)["REGAUSS"]
                      for p in (psf, None))
    assert given["ok"].all() and assumed["ok"].all()
    assert not np.allclose(given["e1"], assumed["e1"], rtol=0, atol=1e-4)
    foreign = inspect_dataset(write_synthetic_dataset(tmp_path / "syn.h5", n=4, bands="gri", size=32))
    _, words = psf_for_dataset(foreign, "i")
    assert words.startswith("Kolmogorov FWHM 0.790 arcsec, assumed")
    with h5py.File(tmp_path / "syn.h5", "r+") as f:
        del f.attrs["psf_fwhm"]
    with pytest.raises(UsageError, match="no positive psf_fwhm for band i"):
        psf_for_dataset(inspect_dataset(tmp_path / "syn.h5"), "i")


def test_report_flags_seen_data_warnings_and_an_implausible_response(tmp_path):
    from cosmolit.measure.report import evaluate_shapes

    rng = np.random.default_rng(1)
    y = rng.normal(0, 0.3, (40, 2))
    m = evaluate_shapes(tmp_path / "ev", y, y + 0.01, None, ["e1", "e2"], {}, None, _info(), "bnn", hsm=False,
                        progress=False, response={"e1": {"slope": 0.06, "intercept": 0.0}, "e2": {"slope": 0.9,
                                                                                                   "intercept": 0.0}},
                        data_overlap=["training"], warnings=["warning: PSF"], bnn_seed=3)
    assert (m["data_overlap"], m["dataset_warnings"], m["bnn_seed"]) == (["training"], ["warning: PSF"], 3)
    text = (tmp_path / "ev" / "report.md").read_text()
    assert "This dataset is the file the model was trained on" in text and "- warning: PSF" in text
    assert text.count("Implausible response") == 1 and "e1 predictions by 16.7" in text
