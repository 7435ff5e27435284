import json

from typer.testing import CliRunner

from cosmolit.cli import app


def test_quickstart_runs_end_to_end_on_tiny_sizes(tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--n-train", "80", "--n-test", "16",
                                      "--epochs", "1", "--workers", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 16 and {"e1", "e2", "hsm_regauss", "hsm_ksb"} <= set(metrics)
    assert (out / "eval" / "report.md").exists() and (out / "cnn" / "model.ckpt").exists()
    # a second run refuses to overwrite without --force, and says so in one line
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--n-train", "80"])
    assert again.exit_code == 2 and "--force" in again.output


def test_quickstart_refuses_bad_loss(tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "q"), "--loss", "l1"])
    assert result.exit_code == 2 and "choose one of decoupled, nll, mse" in result.output
    assert not (tmp_path / "q").exists()
