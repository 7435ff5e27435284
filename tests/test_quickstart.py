import json
import math

import torch
import yaml
from typer.testing import CliRunner

from cosmolit.cli import app
from cosmolit.dataset import inspect_dataset


def test_quickstart_runs_end_to_end_on_tiny_sizes(tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--n-train", "80", "--n-test", "16",
                                      "--epochs", "1", "--workers", "1"])
    assert result.exit_code == 0, result.output
    # [1/4], [2/4]: the simulator's default (6 bands, 64x64), training and test sets from different seeds
    train, test = inspect_dataset(out / "train.h5"), inspect_dataset(out / "test.h5")
    assert (train.n, train.seed, test.n, test.seed) == (80, 0, 16, 1)
    assert train.bands == test.bands == "ugrizy" and train.height == train.width == 64
    # [3/4]: the CNN trained for the one epoch asked, on the CPU: 64 training stamps (80 less the 20 %
    # validation split) in batches of 32 are 2 optimizer steps
    ckpt = torch.load(out / "cnn" / "model.ckpt", weights_only=True)
    assert ckpt["cosmolit"]["model"] == "cnn" and ckpt["epoch"] == 1 and ckpt["global_step"] == 2
    trained = yaml.safe_load(ckpt["cosmolit"]["config"])
    assert trained["trainer"]["epochs"] == 1 and trained["trainer"]["accelerator"] == "cpu"
    assert trained["model"]["loss"] == "decoupled" and trained["data"]["batch_size"] == 32
    # [4/4]: evaluated on every test stamp (not the training set), with HSM on the same stamps
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 16 and metrics["dataset"] == str(out / "test.h5") and metrics["seed"] == 1
    assert metrics["model_kind"] == "cnn" and metrics["data_overlap"] == []
    for t in ("e1", "e2"):
        assert metrics[t]["n"] == 16 and math.isfinite(metrics[t]["rmse"])
    for key in ("hsm_regauss", "hsm_ksb"):
        h = metrics[key]
        assert h["n"] == 16 and h["e1"]["n"] == h["network"]["e1"]["n"] == 16 - h["n_failed"]
    assert "REGAUSS" in (out / "eval" / "report.md").read_text()
    # a second run refuses to overwrite without --force, and says so in one line
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--n-train", "80"])
    assert again.exit_code == 2 and "--force" in again.output


def test_quickstart_refuses_bad_loss(tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "q"), "--loss", "l1"])
    assert result.exit_code == 2 and "choose one of decoupled, nll, mse" in result.output
    assert not (tmp_path / "q").exists()
