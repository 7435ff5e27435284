"""A colleague's checkpoint never runs code: every loading path refuses a malicious pickle with one
line; truncated files give one line; checkpoints cross between the current and the IPU stacks."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cosmolit.checkpoint import read_checkpoint
from cosmolit.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = "model: {filters: [4, 8]}\n"
CLI = "import sys; from cosmolit.cli import main; sys.argv[0] = 'cosmolit'; main()"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_small_h5):
    root = tmp_path_factory.mktemp("safety")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY)
    res = CliRunner().invoke(app, ["fit", "--model", "cnn", "--data", str(synthetic_small_h5), "--out",
                                   str(root / "run"), "--config", str(cfg), "-e", "1", "-b", "8", "-a", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    return root / "run", cfg


def _evil_checkpoint(good: Path, dest: Path, marker: Path) -> Path:
    ckpt = read_checkpoint(good)
    ckpt["hyper_parameters"]["provenance"] = {"x": _Evil(marker)}
    torch.save(ckpt, dest)
    return dest


def _commands(ckpt, data, tmp, cfg):
    return {
        "evaluate": ["evaluate", "--ckpt", ckpt, "--data", data, "--out", tmp / "ev", "--no-hsm", "-q", "-a", "cpu"],
        "predict": ["predict", "--ckpt", ckpt, "--data", data, "--out", tmp / "p.h5", "-q", "-a", "cpu"],
        "generate": ["generate", "--ckpt", ckpt, "--n", "2", "--out", tmp / "g.h5", "-q", "-a", "cpu"],
        # the data is the checkpoint's training file: allowed here, so that only the checkpoint can be refused
        "calibrate": ["calibrate", "--ckpt", ckpt, "--data", data, "--out", tmp / "c.ckpt", "-q", "-a", "cpu",
                      "--allow-training-data"],
        "info": ["info", ckpt],
    }


def _check_refused(res, outputs=()):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [l for l in res.output.splitlines() if l.startswith("cosmolit: error:")]
    assert len(lines) == 1, res.output
    for out in outputs:
        assert not Path(out).exists()
    return lines[0]


@pytest.mark.parametrize("command", ["evaluate", "predict", "generate", "calibrate", "info", "resume"])
def test_malicious_checkpoint_is_refused(trained, synthetic_small_h5, tmp_path, command):
    run, cfg = trained
    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint(run / "model.ckpt", tmp_path / "evil.ckpt", marker)
    if command == "resume":
        out = tmp_path / "resume"
        shutil.copytree(run, out)
        shutil.copy(evil, out / "checkpoints" / "last.ckpt")
        args = ["fit", "--model", "cnn", "--data", synthetic_small_h5, "--out", out, "--config", cfg, "-e", "2",
                "-b", "8", "-a", "cpu", "-q", "--resume"]
    else:
        args = _commands(evil, synthetic_small_h5, tmp_path, cfg)[command]
    res = CliRunner().invoke(app, [str(a) for a in args])
    line = _check_refused(res, [tmp_path / "ev", tmp_path / "p.h5", tmp_path / "g.h5", tmp_path / "c.ckpt"])
    assert "refused" in line and "system" in line  # names the offending global
    assert not marker.exists()


def test_library_loaders_refuse_malicious_checkpoint(trained, tmp_path):
    from cosmolit.checkpoint import load_model
    from cosmolit.errors import UsageError

    marker = tmp_path / "PWNED"
    evil = _evil_checkpoint(trained[0] / "model.ckpt", tmp_path / "evil.ckpt", marker)
    with pytest.raises(UsageError, match="refused"):
        load_model(evil)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 10, 0.5])
def test_truncated_checkpoint_one_line(trained, synthetic_small_h5, tmp_path, cut):
    data = (trained[0] / "model.ckpt").read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(data[:n])
    for args in _commands(bad, synthetic_small_h5, tmp_path, trained[1]).values():
        line = _check_refused(CliRunner().invoke(app, [str(a) for a in args]))
        assert "bad.ckpt" in line


def test_checkpoints_are_plain_data(trained):
    """Every checkpoint cosmolit writes loads with weights_only=True (no Path, no numpy object)."""
    for path in trained[0].rglob("*.ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["cosmolit"]["model"] == "cnn"
        assert isinstance(ckpt["cosmolit"]["torch_rng"], torch.Tensor)


def _other_python():
    import sys

    here = Path(sys.executable).resolve()
    for name in (".venv", ".venv-ipu"):
        py = REPO / name / "bin" / "python"
        if py.exists() and py.resolve() != here and Path(sys.prefix).resolve() != (REPO / name).resolve():
            return py
    return None


def test_checkpoint_crosses_stacks(trained, synthetic_small_h5, tmp_path):
    """A checkpoint written by the other stack (torch 2.0.1 / PL 2.0.9 vs current) loads here, and ours there."""
    other = _other_python()
    if other is None:
        pytest.skip("the other interpreter (.venv or .venv-ipu) is not present")
    theirs = tmp_path / "theirs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([str(other), "-c", CLI, "fit", "--model", "cnn", "--data", str(synthetic_small_h5),
                          "--out", str(theirs), "--config", str(trained[1]), "-e", "1", "-b", "8", "-a", "cpu", "-q"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "p.h5"
    res2 = CliRunner().invoke(app, ["predict", "--ckpt", str(theirs / "model.ckpt"), "--data",
                                    str(synthetic_small_h5), "--out", str(out), "-q", "-a", "cpu"])
    assert res2.exit_code == 0, res2.output
    res3 = subprocess.run([str(other), "-c", CLI, "predict", "--ckpt", str(trained[0] / "model.ckpt"),
                           "--data", str(synthetic_small_h5), "--out", str(tmp_path / "q.h5"), "-q", "-a", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert res3.returncode == 0, res3.stderr[-2000:]
    assert (tmp_path / "q.h5").is_file()
