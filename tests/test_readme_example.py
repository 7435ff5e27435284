"""The README's load-and-predict example gives `cosmolit predict`'s numbers, for every documented call."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cosmolit.cli import app
from tests.conftest import REPO

TINY = {"cnn": "model: {filters: [4, 8]}\n", "bnn": "model: {filters: [4, 8], samples: 4}\n"}


def _run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_small_h5):
    """kind -> (checkpoint, predictions file of `cosmolit predict` on the 48-stamp set)."""
    root = tmp_path_factory.mktemp("readme")
    out = {}
    for kind, text in TINY.items():
        cfg = root / f"{kind}.yaml"
        cfg.write_text(text)
        _run("fit", "--model", kind, "--data", synthetic_small_h5, "--out", root / kind, "--config", cfg,
             "--epochs", "1", "--batch-size", "8", "--accelerator", "cpu", "-q")
        ckpt = root / kind / "model.ckpt"
        preds = root / f"{kind}_pred.h5"
        _run("predict", "--ckpt", ckpt, "--data", synthetic_small_h5, "--out", preds, "--samples", "100", "-q")
        out[kind] = (ckpt, preds)
    return out


def _readme_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### Load and predict", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _predicted(path, n=16):
    with h5py.File(path, "r") as f:
        return f["predictions/mean"][:n], f["predictions/cov"][:n]


def test_the_readme_example_gives_cosmolit_predicts_numbers(trained, synthetic_small_h5):
    ckpt, preds = trained["cnn"]
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["symmetrise"] is True  # fit's default
    code = _readme_block().replace("runs/cnn/model.ckpt", str(ckpt)).replace("test.h5", str(synthetic_small_h5))
    code += ("\nimport json\nprint('JSON', json.dumps({'mean': pred['mean'].tolist(), 'cov': pred['cov'].tolist(), "
             "'forward': model(x)[0].tolist()}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.split("JSON ", 1)[1])
    mean, cov = _predicted(preds)
    np.testing.assert_allclose(np.array(got["mean"]), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(got["cov"]), cov, rtol=1e-4, atol=1e-8)
    # forward is one unsymmetrised pass: other numbers, as the README says
    assert np.abs(np.array(got["forward"]) - mean).max() > 1e-4


def test_load_from_checkpoint_in_training_mode_estimates_as_predict(trained, synthetic_small_h5):
    from cosmolit.infer import load_images
    from cosmolit.models import ShapeCNN

    ckpt, preds = trained["cnn"]
    model = ShapeCNN.load_from_checkpoint(str(ckpt), map_location="cpu")  # no .eval(): training mode
    assert model.training
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    with torch.no_grad():
        pred = model.estimate(torch.from_numpy(load_images(synthetic_small_h5, limit=16)))
    mean, cov = _predicted(preds)
    np.testing.assert_allclose(pred["mean"].numpy(), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pred["cov"].numpy(), cov, rtol=1e-4, atol=1e-8)
    assert model.training and torch.equal(bn.running_mean, before)  # mode kept, statistics untouched


def test_bnn_estimate_matches_predict_within_monte_carlo_error(trained, synthetic_small_h5):
    from cosmolit.checkpoint import load_model
    from cosmolit.infer import load_images

    ckpt, preds = trained["bnn"]
    model, kind, _ = load_model(ckpt)
    samples = 100
    pred = model.estimate(torch.from_numpy(load_images(synthetic_small_h5, limit=16)), samples=samples, seed=1)
    mean, cov = _predicted(preds)
    # two independent means of `samples` draws differ by sqrt(2 var / samples) per target, var the
    # draws' spread: the reported epistemic variance without the uncertainty calibration's sigma_scale
    spread = np.diagonal(pred["epistemic_cov"].numpy(), axis1=1, axis2=2) / model.target_transform.sigma_scale.numpy() ** 2
    sd = np.sqrt(2 * spread / samples)
    assert kind == "bnn" and (np.abs(pred["mean"].numpy() - mean) <= 5 * sd + 1e-6).all()
    np.testing.assert_allclose(pred["cov"].numpy(), cov, rtol=0.25, atol=1e-6)
    again = model.estimate(torch.from_numpy(load_images(synthetic_small_h5, limit=16)), samples=samples, seed=1)
    assert torch.equal(again["mean"], pred["mean"])  # seeded draws repeat
