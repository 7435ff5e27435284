"""`cosmolit check-ipu`: the CPU-side IPU readiness check (operator list, host syncs, static shapes, one loss)."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from typer.testing import CliRunner

from cosmolit.backends import mark_loss
from cosmolit.backends.check import check_module, normalise_op, op_status, supported_ops
from cosmolit.cli import app


class Toy(pl.LightningModule):
    """A tiny conv net whose training_step can be made to break one PopTorch rule."""

    def __init__(self, mode: str = "ok"):
        super().__init__()
        self.mode = mode
        self.net = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.PReLU(), nn.Dropout(0.1),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):  # (B, 6, H, W) -> (B, 2)
        return self.net(torch.log1p(x.clamp_min(0)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        p = self(x)  # (B, 2)
        loss = ((p - y) ** 2).mean()
        if self.mode == "item":
            loss = loss * loss.item()
        elif self.mode == "cholesky":
            loss = loss + torch.linalg.cholesky(p.T @ p + 1e-2 * torch.ones(2).diag()).sum()
        elif self.mode == "mvn":
            dist = torch.distributions.MultivariateNormal(p, scale_tril=torch.ones(2).diag(), validate_args=False)
            loss = -dist.log_prob(y).mean()
        elif self.mode == "masked_select":
            loss = loss + torch.masked_select(p, p > 0).sum()
        elif self.mode == "nonzero":
            loss = loss + p[torch.nonzero(p > 0, as_tuple=True)].sum()
        elif self.mode == "branch":
            if bool((x.mean() > 50).all()):
                loss = loss * 2
        elif self.mode == "two_losses":
            mark_loss(self, loss)
        elif self.mode == "unmarked":
            return loss
        elif self.mode == "builtin":
            return nn.functional.mse_loss(p, y)
        return mark_loss(self, loss)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])

    def configure_optimizers(self):
        if self.mode == "two_optimizers":
            return [torch.optim.Adam(self.net[0].parameters()), torch.optim.SGD(self.net[-1].parameters(), lr=0.1)]
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _batches():
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(4, 6, 16, 16, generator=g) * 100, torch.rand(4, 2, generator=g))
    b = (torch.rand(4, 6, 16, 16, generator=g) * 100, torch.rand(4, 2, generator=g))
    return a, b


def _check(mode):
    torch.manual_seed(0)
    return check_module(Toy(mode), *_batches(), name=mode)


def test_op_names_are_normalised():
    assert normalise_op("aten::add_.Tensor") == "add_"
    assert normalise_op(torch.ops.aten.convolution.default) == "convolution"
    assert op_status("add_") == "ok" and op_status("lift_fresh") == "ok" and op_status("_to_copy") == "ok"
    assert op_status("_native_batch_norm_legit") == "ok"
    assert op_status("linalg_cholesky_ex") == "unsupported" and op_status("lgamma") == "unsupported"
    assert op_status("_local_scalar_dense") == "host_sync" and op_status("nonzero") == "data_dependent"
    assert {"convolution", "mse_loss", "normal_"} <= supported_ops() and "cholesky" not in supported_ops()


@pytest.mark.parametrize("mode", ["ok", "builtin"])
def test_clean_toy_passes(mode):
    report = _check(mode)
    assert report.ok, report.format()
    assert "convolution" in report.ops and "training_step" in report.stages and "predict_step" in report.stages
    assert "OK:" in report.format()


@pytest.mark.parametrize("mode, kind, text", [
    ("item", "host_sync", "host synchronisation (.item(), bool(tensor), float(tensor))"),
    ("cholesky", "unsupported_op", "aten::linalg_cholesky_ex is not lowered"),
    ("mvn", "unsupported_op", "aten::linalg_solve_triangular is not lowered"),
    ("masked_select", "data_dependent", "aten::masked_select"),
    ("nonzero", "data_dependent", "aten::nonzero"),
    ("branch", "host_sync", "host synchronisation"),
    ("two_losses", "loss", "more than one loss"),
    ("unmarked", "loss", "neither marked with cosmolit.backends.mark_loss"),
    ("two_optimizers", "optimizer", "2 optimizers"),
])
def test_broken_toys_are_rejected_with_location(mode, kind, text):
    report = _check(mode)
    assert not report.ok
    hits = [f for f in report.findings if f.kind == kind and text in f.message]
    assert hits, report.format()
    if kind in ("host_sync", "unsupported_op", "data_dependent"):
        assert hits[0].where.endswith(".py:" + hits[0].where.rsplit(":", 1)[1])
        assert "test_check_ipu.py:" in hits[0].where  # the user's line, not torch's


def test_backward_ops_are_not_checked():
    # the backward of cholesky-free toy uses ops absent from the list (e.g. convolution_backward)
    report = _check("ok")
    assert not any("backward" in name for name in report.ops)


def test_cli_check_ipu_reports_and_writes_json(monkeypatch, tmp_path):
    import cosmolit.cli.ipu as check

    monkeypatch.setattr(check, "build_model", lambda kind, config=None, **kw: Toy("item"))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["check-ipu", "--model", "cnn", "--batch-size", "2", "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "host synchronisation" in result.output
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["batch_size"] == 2 and data["findings"][0]["kind"] == "host_sync"

    monkeypatch.setattr(check, "build_model", lambda kind, config=None, **kw: Toy("ok"))
    result = CliRunner().invoke(app, ["check-ipu", "--model", "cnn", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "OK:" in result.output


def test_cli_check_ipu_usage_errors(tmp_path):
    result = CliRunner().invoke(app, ["check-ipu", "--model", "resnet"])
    assert result.exit_code == 2 and "unknown model 'resnet'" in result.output
    result = CliRunner().invoke(app, ["check-ipu", "--model", "cnn", "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size" in result.output


@pytest.mark.parametrize("kind", ["cnn", "bnn", "vae"])
def test_real_models_are_ipu_ready(kind):
    from cosmolit.cli.ipu import check_model

    report = check_model(kind, batch_size=4)
    assert report.ok, report.format()
