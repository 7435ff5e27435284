"""The `lr_schedule` hyper-parameter: constant (the study's) or a per-epoch cosine decay."""

from __future__ import annotations

import csv
import math

import pytest
from typer.testing import CliRunner

from cosmolit.checkpoint import read_checkpoint
from cosmolit.cli import app
from cosmolit.models.base import LR_FLOOR, cosine_factor


def test_cosine_factor_shape():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(9, 10) == pytest.approx(LR_FLOOR)
    assert cosine_factor(25, 10) == pytest.approx(LR_FLOOR)  # after the end: stays at the floor
    mid = cosine_factor(1, 3)
    assert mid == pytest.approx(LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi / 2)))
    values = [cosine_factor(e, 10) for e in range(10)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly falling
    assert cosine_factor(0, 1) == 1.0


def _fit(tmp_path, data, schedule, epochs, extra=()):
    config = tmp_path / f"{schedule}.yaml"
    config.write_text(f"model: {{filters: [4, 8], lr: 0.002, lr_schedule: {schedule}}}\ndata: {{val_fraction: 0.25}}\n")
    out = tmp_path / f"run-{schedule}"
    res = CliRunner().invoke(app, ["fit", "--model", "cnn", "--data", str(data), "--out", str(out), "--config",
                                   str(config), "--epochs", str(epochs), "--batch-size", "8", "--accelerator",
                                   "cpu", "-q", *extra])
    assert res.exit_code == 0, res.output
    return out


def _lr(ckpt) -> float:
    return read_checkpoint(ckpt)["optimizer_states"][0]["param_groups"][0]["lr"]


def test_cosine_schedule_decays_per_epoch(tmp_path, synthetic_small_h5):
    out = _fit(tmp_path, synthetic_small_h5, "cosine", 3)
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    lr = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]  # one row per epoch, at its first step
    assert lr == pytest.approx([0.002, 0.002 * (1 + LR_FLOOR) / 2, 0.002 * LR_FLOOR])
    # the scheduler's state is in the checkpoint, so --resume continues the schedule
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 3
    assert _lr(out / "checkpoints" / "last.ckpt") == pytest.approx(0.002 * LR_FLOOR)


def test_constant_schedule_keeps_lr(tmp_path, synthetic_small_h5):
    out = _fit(tmp_path, synthetic_small_h5, "constant", 2)
    assert _lr(out / "checkpoints" / "last.ckpt") == pytest.approx(0.002)
    assert not read_checkpoint(out / "checkpoints" / "last.ckpt").get("lr_schedulers")


def test_unknown_schedule_is_one_line(tmp_path, synthetic_small_h5):
    config = tmp_path / "bad.yaml"
    config.write_text("model: {lr_schedule: step}\n")
    res = CliRunner().invoke(app, ["fit", "--model", "vae", "--data", str(synthetic_small_h5), "--out",
                                   str(tmp_path / "o"), "--config", str(config), "--accelerator", "cpu", "-q"])
    assert res.exit_code == 2
    assert "lr_schedule 'step' is not allowed; choose one of constant, cosine" in res.output
    assert not (tmp_path / "o").exists()
