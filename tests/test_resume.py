"""Runs that survive interruption: SIGTERM / Ctrl-C save last.ckpt, --resume continues bit-identically
on CPU, checkpoint and dataset writes are atomic, a killed simulate leaves nothing under the final name."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cosmolit.cli import app
from cosmolit.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = "model: {filters: [4, 8]}\ndata: {val_fraction: 0.25}\ntrainer: {log_every_n_steps: 1}\n"


def _fit_args(data, out, config, extra=()):
    return ["fit", "--model", "cnn", "--data", str(data), "--out", str(out), "--config", str(config),
            "--epochs", "2", "--batch-size", "4", "--accelerator", "cpu", "--seed", "7", "-q", *extra]


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG)
    return path


def _weights(path):
    return read_checkpoint(path)["state_dict"]


def _assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# the third case: static-graph mode (eager on a CPU), 3 batches per Lightning step, cut mid-epoch
@pytest.mark.parametrize("signum, code, step, extra", [
    (signal.SIGTERM, 143, 5, ()), (signal.SIGINT, 130, 12, ()),
    (signal.SIGTERM, 143, 4, ("--static-graph", "--device-iterations", "3")),
])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, config, synthetic_small_h5, monkeypatch,
                                                      interrupt_at, signum, code, step, extra):
    runner = CliRunner()
    full = tmp_path / "full"
    res = runner.invoke(app, _fit_args(synthetic_small_h5, full, config, extra))
    assert res.exit_code == 0, res.output

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        interrupt_at(m, step, signum)
        res = runner.invoke(app, _fit_args(synthetic_small_h5, cut, config, extra))
    assert res.exit_code == code, res.output
    assert "--resume" in res.output and "Traceback" not in res.output
    last = read_checkpoint(cut / "checkpoints" / "last.ckpt")
    assert last["global_step"] == step  # at most the current step is lost: none here
    assert not (cut / "model.ckpt").exists()

    res = runner.invoke(app, _fit_args(synthetic_small_h5, cut, config, [*extra, "--resume"]))
    assert res.exit_code == 0, res.output
    _assert_same(_weights(full / "checkpoints" / "last.ckpt"), _weights(cut / "checkpoints" / "last.ckpt"))
    import pytorch_lightning as pl

    new_pl = tuple(int(x) for x in pl.__version__.split(".")[:2]) >= (2, 1)
    if new_pl:
        # PL 2.0.9 skips the validation of an epoch resumed mid-way (its batch counter restarts
        # one batch early), so best.ckpt / model.ckpt can differ there; the weights (last.ckpt) do not.
        _assert_same(_weights(full / "model.ckpt"), _weights(cut / "model.ckpt"))
    assert read_checkpoint(cut / "model.ckpt")["global_step"] == read_checkpoint(full / "model.ckpt")["global_step"]
    # one metrics.csv with the rows of both runs (the CSV logger alone would keep only the resumed part)
    logged = {name: _logged(run / "logs" / "metrics.csv") for name, run in (("full", full), ("cut", cut))}
    full_steps, cut_steps = logged["full"]["train"], logged["cut"]["train"]
    # every step of the uninterrupted run, in order, except at most the one the signal cut short
    assert cut_steps == [s for s in full_steps if s in cut_steps]
    may_miss = {str(step - 1)}
    if not new_pl:
        may_miss.add(full_steps[-1])  # PL 2.0.9's resumed epoch logs its last step under the step before
    assert set(full_steps) - set(cut_steps) <= may_miss and "0" in cut_steps
    if new_pl:  # PL 2.0.9: see above
        assert logged["cut"]["val"] == logged["full"]["val"] == ["0", "1"]


def test_last_checkpoint_is_the_last_epoch_when_validation_stops_improving(tmp_path, config, synthetic_small_h5,
                                                                           monkeypatch):
    """last.ckpt is written every epoch, not only with a new best (pytorch-lightning 2.6's save_last
    no longer does), so extending a run with --resume continues from its last epoch."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    runner = CliRunner()
    # validation improves in the first epoch only
    monkeypatch.setattr(ModelCheckpoint, "check_monitor_top_k",
                        lambda self, trainer, current=None: self.best_model_score is None)
    two = tmp_path / "two"
    res = runner.invoke(app, _fit_args(synthetic_small_h5, two, config))
    assert res.exit_code == 0, res.output
    best, last = (read_checkpoint(two / "checkpoints" / f"{n}.ckpt") for n in ("best", "last"))
    assert (best["epoch"], last["epoch"]) == (0, 1) and last["global_step"] == 2 * best["global_step"]
    res = runner.invoke(app, _fit_args(synthetic_small_h5, two, config, ["--resume", "--epochs", "3"]))
    assert res.exit_code == 0, res.output
    three = tmp_path / "three"
    res = runner.invoke(app, _fit_args(synthetic_small_h5, three, config, ["--epochs", "3"]))
    assert res.exit_code == 0, res.output
    assert read_checkpoint(two / "checkpoints" / "last.ckpt")["global_step"] == 3 * best["global_step"]
    _assert_same(_weights(three / "checkpoints" / "last.ckpt"), _weights(two / "checkpoints" / "last.ckpt"))


def _logged(path):
    """{'train': steps with a train_loss, 'val': epochs with a val_loss} of a metrics.csv."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {"train": [r["step"] for r in rows if r.get("train_loss")],
            "val": [r["epoch"] for r in rows if r.get("val_loss")]}


def test_same_seed_same_weights(tmp_path, config, synthetic_small_h5):
    runner = CliRunner()
    for name in ("a", "b"):
        res = runner.invoke(app, _fit_args(synthetic_small_h5, tmp_path / name, config))
        assert res.exit_code == 0, res.output
    _assert_same(_weights(tmp_path / "a" / "model.ckpt"), _weights(tmp_path / "b" / "model.ckpt"))
    res = runner.invoke(app, _fit_args(synthetic_small_h5, tmp_path / "c", config) + ["--seed", "8"])
    assert res.exit_code == 0, res.output
    a, c = _weights(tmp_path / "a" / "model.ckpt"), _weights(tmp_path / "c" / "model.ckpt")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_simulate_killed_leaves_nothing_and_rerun_gives_the_same_bytes(tmp_path):
    """SIGKILL a running `cosmolit simulate`: nothing under the final name; a rerun equals a clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    killed, clean = tmp_path / "killed.h5", tmp_path / "clean.h5"
    args = ["--n", "2000", "--seed", "11", "--stamp-size", "32", "--bands", "gri", "--workers", "1", "-q"]
    cmd = [sys.executable, "-m", "cosmolit", "simulate", *args]
    proc = subprocess.Popen([*cmd, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.endswith(".partial.h5") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)  # let it write some blocks
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not killed.exists()  # a temporary file may stay behind; never a file under the final name
    subprocess.run([*cmd, "--out", str(killed)], check=True)
    subprocess.run([*cmd, "--out", str(clean)], check=True)
    assert killed.read_bytes() == clean.read_bytes()


def test_resume_on_new_stamps_keeps_the_checkpoints_scales(tmp_path, config, synthetic_small_h5, recwarn):
    """--resume with another --data continues training on those stamps with the normalisation and
    target statistics the checkpoint's weights were trained with; another band set is refused."""
    from cosmolit.synthetic import write_synthetic_dataset

    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, _fit_args(synthetic_small_h5, out, config, ["--epochs", "1"]))
    assert res.exit_code == 0, res.output
    first_ckpt = read_checkpoint(out / "model.ckpt")
    first = first_ckpt["hyper_parameters"]

    other = write_synthetic_dataset(tmp_path / "other.h5", n=48, bands="gri", size=32, seed=11)
    alone = tmp_path / "alone"  # what that file alone would give
    res = runner.invoke(app, _fit_args(other, alone, config, ["--epochs", "1"]))
    assert res.exit_code == 0, res.output
    fresh = read_checkpoint(alone / "model.ckpt")["hyper_parameters"]
    assert fresh["normalisation"] != first["normalisation"] and fresh["target_stats"] != first["target_stats"]

    # a best score the new stamps' validation cannot beat: it was measured on other stamps
    last = out / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint")]
    state = ckpt["callbacks"][key]
    state["best_model_score"] = state["kth_value"] = torch.tensor(-1e9)
    state["best_k_models"] = {path: torch.tensor(-1e9) for path in state["best_k_models"]}
    torch.save(ckpt, last)
    res = runner.invoke(app, _fit_args(other, out, config, ["--resume"]))
    assert res.exit_code == 0, res.output
    assert "keeping the checkpoint's input normalisation" in res.output
    # Lightning's notes on the existing folders (handled by cosmolit) are left out of a resume
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]
    # the new epoch is the best on the new validation split, replacing best.ckpt in place
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    _assert_same(_weights(out / "checkpoints" / "best.ckpt"), _weights(last))
    resumed = read_checkpoint(out / "model.ckpt")
    assert resumed["global_step"] == 2 * first_ckpt["global_step"] > 0  # one more epoch
    hp = resumed["hyper_parameters"]
    assert hp["normalisation"] == first["normalisation"] and hp["target_stats"] == first["target_stats"]
    assert hp["provenance"]["path"] == str(other.resolve())

    gr = write_synthetic_dataset(tmp_path / "gr.h5", n=48, bands="gr", size=32, seed=11)
    before = (out / "checkpoints" / "last.ckpt").read_bytes()
    res = runner.invoke(app, _fit_args(gr, out, config, ["--resume", "--epochs", "3"]))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "bands 'gri'" in res.output and "'gr'" in res.output
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == before
