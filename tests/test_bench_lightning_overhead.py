"""`cosmolit bench overhead --parts lightning`: whole epochs of Lightning's fit against a bare loop."""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn


def _toy(kind="cnn", loss=None, epoch_end_sleep=0.0):
    """A tiny LightningModule with the interface cosmolit.bench expects (compute_loss, configure_optimizers)."""
    import pytorch_lightning as pl

    class Toy(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"targets": ["e1", "e2", "redshift"]})
            self.net = nn.Sequential(nn.Conv2d(6, 2, 4, stride=8), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))

        def compute_loss(self, x, y):  # x (B, 6, 64, 64), y (B, 3)
            return ((self.net(x / 100.0) - y) ** 2).mean()

        def training_step(self, batch, batch_idx):
            return self.compute_loss(*batch)

        def on_train_epoch_end(self):  # the module's own epoch-end work, after the callbacks'
            time.sleep(epoch_end_sleep)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return Toy()


def test_lightning_part_times_whole_epochs_of_both_sides(tmp_path):
    from cosmolit.bench.overhead import OverheadConfig, run_overhead_bench
    from cosmolit.bench.results import load_results, write_results

    cfg = OverheadConfig(batch_size=4, epoch_images=10, rounds=3, parts=["lightning"], threads=1)
    payload = run_overhead_bench(cfg, echo=lambda m: None, factories={"cnn": _toy})
    rows = {r["name"]: r for r in payload["results"]}
    assert sorted(rows) == sorted(f"{kind}_b{b}" for b in (2, 4) for kind in
                                  ("lightning_epoch_over_bare_cnn", "cnn_lightning_epoch", "cnn_bare_epoch"))
    for b in (2, 4):
        ratio = rows[f"lightning_epoch_over_bare_cnn_b{b}"]
        steps = 2 * (10 // b)  # a warm-up epoch and the timed one, incomplete last batch dropped
        assert ratio["a_steps"] == ratio["b_steps"] == [steps] * 3
        assert ratio["epoch_images"] == (10 // b) * b and ratio["unit"] == "x" and ratio["batch_size"] == b
        assert ratio["a"]["n"] == ratio["b"]["n"] == 3  # one timed epoch per round and side
        rounds = ratio["round_ratios"]
        assert len(rounds) == 3 and ratio["value"] == pytest.approx(statistics.median(rounds))
        assert ratio["range"] == [min(rounds), max(rounds)]
        assert ratio["range"][0] <= ratio["value"] <= ratio["range"][1]
        assert "goal" not in ratio  # the goal is stated at batch 32
        assert rows[f"cnn_lightning_epoch_b{b}"]["value"] == ratio["a"]["median"] > 0
        assert rows[f"cnn_bare_epoch_b{b}"]["value"] == ratio["b"]["median"] > 0
    load_results(write_results(tmp_path / "o.json", payload))


def test_lightning_epoch_includes_the_module_epoch_end():
    """The Lightning side's epoch closes at the next epoch's start (or the end of training), so the
    module's own on_train_epoch_end, which runs after the callbacks' hooks, is inside it."""
    import pytorch_lightning as pl

    from cosmolit.bench.callbacks import TimingCallback

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(8, 6, 64, 64),
                                                                        torch.rand(8, 3)), batch_size=4)
    timer = TimingCallback(warmup_epochs=1)
    trainer = pl.Trainer(max_epochs=3, callbacks=[timer], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_toy(epoch_end_sleep=0.2), loader)
    s = timer.summary()
    assert s["epochs"] == 3 and s["epoch"]["n"] == 2 and s["calls"] == 6
    assert s["epoch"]["min"] >= 0.2


def test_cli_lightning_part_real_cnn_and_bad_epoch_images(tmp_path):
    from typer.testing import CliRunner

    from cosmolit.bench.results import load_results
    from cosmolit.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "overhead", "--parts", "lightning", "--batch-size", "4",
                              "--epoch-images", "3", "--out", str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and "epoch_images 3" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad.json").exists()
    out = tmp_path / "o.json"
    res = runner.invoke(app, ["bench", "overhead", "--parts", "lightning", "--batch-size", "4", "--epoch-images",
                              "4", "--rounds", "1", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in load_results(out)["results"]}
    for b in (2, 4):
        row = rows[f"lightning_epoch_over_bare_cnn_b{b}"]
        assert row["a_steps"] == row["b_steps"] == [2 * (4 // b)] and row["value"] > 0
