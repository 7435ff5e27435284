"""Lightning 2.0.9's real IPUAccelerator / IPUStrategy / IPUPrecision driven end to end on the CPU.

poptorch here is the TEST DOUBLE in tests/fake_poptorch (put on sys.path for these tests only):
it checks the wiring and enforces PopTorch's rules; it does not show that anything runs on an IPU.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cosmolit.backends import IPUOptions, is_ipu_stack, mark_loss, on_ipu, trainer_kwargs

pytestmark = [
    pytest.mark.ipu_stack,
    pytest.mark.skipif(not is_ipu_stack(), reason="needs the pinned IPU stack (pytorch-lightning 2.0.x)"),
]

FAKE = Path(__file__).parent / "fake_poptorch"


def _drop_poptorch_modules():
    for name in list(sys.modules):
        if name == "poptorch" or name.startswith("poptorch."):
            del sys.modules[name]


@pytest.fixture
def fake_poptorch(monkeypatch):
    """Put the poptorch test double on sys.path and tell Lightning (imported earlier) that it is there."""
    _drop_poptorch_modules()
    monkeypatch.syspath_prepend(str(FAKE))
    importlib.invalidate_caches()
    poptorch = importlib.import_module("poptorch")
    assert poptorch.IS_TEST_DOUBLE
    import pytorch_lightning.accelerators.ipu as pl_acc
    import pytorch_lightning.strategies.ipu as pl_strategy
    import pytorch_lightning.trainer.setup as pl_setup

    for mod in (pl_acc, pl_strategy):
        monkeypatch.setattr(mod, "_POPTORCH_AVAILABLE", True)
        monkeypatch.setattr(mod, "_IPU_AVAILABLE", True)
        monkeypatch.setattr(mod, "poptorch", poptorch)
    monkeypatch.setattr(pl_setup, "_IPU_AVAILABLE", True)
    yield poptorch
    _drop_poptorch_modules()


def _toy_module(misbehave: str = ""):
    import pytorch_lightning as pl

    class Toy(pl.LightningModule):
        """conv + BatchNorm + PReLU -> 2 outputs; logs from epoch-end hooks on IPU."""

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.PReLU(),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
            self.train_losses = []
            self.val_losses = []
            self.micro_batch_sizes = []

        def forward(self, x):  # x: (B, 6, H, W) -> (B, 2)
            return self.net(torch.log1p(x.clamp_min(0.0)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.micro_batch_sizes.append(int(x.shape[0]))
            loss = ((self(x) - y) ** 2).mean()
            if misbehave == "item":
                loss = loss * float(loss)
            if misbehave == "log":
                self.log("train_loss", loss)
            if misbehave == "unmarked":
                return loss
            return mark_loss(self, loss)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.train_losses.append(outputs["loss"].detach().float().mean())

        def validation_step(self, batch, batch_idx):
            x, y = batch
            loss = ((self(x) - y) ** 2).mean()
            if not on_ipu(self):
                self.log("val_loss", loss)
            return loss

        def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
            self.val_losses.append(outputs.detach().float().mean())

        def on_validation_epoch_end(self):
            if self.val_losses:
                self.log("val_loss", torch.stack(self.val_losses).mean())
                self.val_losses.clear()

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return self(batch[0])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Toy()


def _loaders(n=32, batch=4, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 6, size, size, generator=g) * 100.0  # (N, 6, H, W)
    y = torch.rand(n, 2, generator=g) - 0.5  # (N, 2)
    ds = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                        generator=torch.Generator().manual_seed(1))
    val = torch.utils.data.DataLoader(ds, batch_size=batch)
    return train, val


def _trainer(ipu: IPUOptions | None = None, devices: int = 1, epochs: int = 1, echo=print):
    import pytorch_lightning as pl

    kwargs = trainer_kwargs("ipu", devices, "32-true", 7, ipu=ipu, echo=echo)
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


def test_fit_validate_predict_toy(fake_poptorch):
    from pytorch_lightning.strategies import IPUStrategy

    lines = []
    model = _toy_module()
    before = [p.detach().clone() for p in model.parameters()]
    train, val = _loaders()
    trainer = _trainer(echo=lines.append)
    assert isinstance(trainer.strategy, IPUStrategy)
    assert type(trainer.accelerator).__name__ == "IPUAccelerator"
    assert "ipu x1" in lines[0]
    trainer.fit(model, train, val)
    assert trainer.state.finished
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "weights did not change"
    assert len(model.train_losses) == 8  # 32 samples / batch 4, one optimizer step per host call
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    metrics = trainer.validate(model, val, verbose=False)
    assert metrics and "val_loss" in metrics[0]
    preds = trainer.predict(model, val)
    assert torch.cat(preds).shape == (32, 2)


def test_batch_arithmetic_device_iterations_replicas_accumulation(fake_poptorch):
    opts = IPUOptions(device_iterations=2, gradient_accumulation=2)
    model = _toy_module()
    train, val = _loaders(n=64, batch=4)
    trainer = _trainer(ipu=opts, devices=2)
    assert trainer.strategy.replication_factor == 2
    trainer.fit(model, train, val)
    # host batch = 4 x 2 (device iterations) x 2 (replicas) x 2 (accumulation) = 32: 2 host steps per epoch
    assert len(model.train_losses) == 2
    assert set(model.micro_batch_sizes) == {4}  # the network only ever sees the micro-batch
    assert len(model.micro_batch_sizes) == 2 * 2 * 2 * 2


def test_options_reach_poptorch(fake_poptorch):
    opts = IPUOptions(device_iterations=3, gradient_accumulation=2, seed=11, available_memory_proportion=0.4)
    trainer = _trainer(ipu=opts, devices=2)
    train_opts = trainer.strategy.training_opts.toDict()
    infer_opts = trainer.strategy.inference_opts.toDict()
    assert train_opts["device_iterations"] == 3 and train_opts["replication_factor"] == 2
    assert train_opts["gradient_accumulation"] == 2 and infer_opts["gradient_accumulation"] == 1
    assert train_opts["random_seed"] == 11 and train_opts["available_memory_proportion"] == {"IPU0": 0.4}


@pytest.mark.parametrize("misbehave, message", [
    ("item", "host synchronisation"),
    ("log", "self.log inside a compiled"),
    ("unmarked", "No loss found"),
])
def test_double_enforces_poptorch_rules(fake_poptorch, misbehave, message):
    model = _toy_module(misbehave)
    train, val = _loaders()
    with pytest.raises(fake_poptorch.Error, match=message):
        _trainer().fit(model, train, val)


def test_double_rejects_changing_shapes(fake_poptorch):
    model = _toy_module()
    wrapped = fake_poptorch.inferenceModel(model, fake_poptorch.Options())
    wrapped(torch.rand(4, 6, 16, 16))
    with pytest.raises(fake_poptorch.Error, match="static"):
        wrapped(torch.rand(3, 6, 16, 16))


def test_double_rejects_second_optimizer_and_unsupported(fake_poptorch):
    model = _toy_module()
    opt = torch.optim.Adam(model.parameters())
    wrapped = fake_poptorch.trainingModel(model, fake_poptorch.Options(), opt)
    with pytest.raises(fake_poptorch.Error, match="second optimizer"):
        wrapped.setOptimizer(torch.optim.SGD(model.net[0].parameters(), lr=0.1))
    with pytest.raises(fake_poptorch.Error, match="Unsupported optimizer"):
        fake_poptorch.trainingModel(model, fake_poptorch.Options(), torch.optim.LBFGS(model.parameters()))


def test_double_dataloader_arithmetic(fake_poptorch):
    opts = fake_poptorch.Options().deviceIterations(2).replicationFactor(3)
    opts.Training.gradientAccumulation(2)
    ds = torch.utils.data.TensorDataset(torch.arange(50.0))
    loader = fake_poptorch.DataLoader(opts, ds, batch_size=2)
    assert loader.combinedBatchSize == 24
    assert [len(b[0]) for b in loader] == [24, 24]  # drop_last=True by default: 2 left out
    with pytest.raises(fake_poptorch.Error, match="not divisible"):
        fake_poptorch.DataLoader(opts, ds, batch_size=2, drop_last=False)


REAL_MODELS = ["cnn", "bnn", "vae"]


@pytest.mark.parametrize("kind", REAL_MODELS)
def test_fit_real_models_through_cli(fake_poptorch, kind, synthetic_small_h5, tmp_path):
    from typer.testing import CliRunner

    from cosmolit.cli import app

    out = tmp_path / f"fit_{kind}"
    k = 2 if kind == "cnn" else 1  # trainer.device_iterations is PopTorch's device iterations on an IPU
    result = CliRunner().invoke(app, ["fit", "--model", kind, "--data", str(synthetic_small_h5), "--accelerator", "ipu",
                                      "--epochs", "1", "--batch-size", "4", "--device-iterations", str(k),
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "ipu x1" in result.output and f"device_iterations {k}," in result.output
    assert (out / "model.ckpt").exists()


def test_resumed_ipu_run_with_device_iterations_equals_uninterrupted(fake_poptorch, synthetic_small_h5, tmp_path,
                                                                      monkeypatch, interrupt_at):
    """One Lightning step on an IPU takes batch x device_iterations stamps: a resumed epoch skips that many
    per step already done."""
    import signal

    from typer.testing import CliRunner

    from cosmolit.checkpoint import read_checkpoint
    from cosmolit.cli import app

    config = tmp_path / "c.yaml"
    config.write_text("model: {filters: [4, 8]}\ndata: {val_fraction: 0.25}\ntrainer: {log_every_n_steps: 1}\n")

    def fit(out, *extra):
        return CliRunner().invoke(app, ["fit", "--model", "cnn", "--data", str(synthetic_small_h5), "--accelerator",
                                        "ipu", "--config", str(config), "--epochs", "2", "--batch-size", "4",
                                        "--device-iterations", "3", "--seed", "7", "--out", str(out), "-q", *extra])

    res = fit(tmp_path / "full")
    assert res.exit_code == 0, res.output
    with monkeypatch.context() as m:
        interrupt_at(m, 4, signal.SIGTERM)  # the first step of the second epoch (3 steps of 12 stamps each)
        res = fit(tmp_path / "cut")
    assert res.exit_code == 143, res.output
    res = fit(tmp_path / "cut", "--resume")
    assert res.exit_code == 0, res.output
    full = read_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt")["state_dict"]
    cut = read_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")["state_dict"]
    assert list(full) == list(cut)
    for key in full:
        assert torch.equal(full[key], cut[key]), key
