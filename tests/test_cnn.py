"""ShapeCNN: shapes, training signal, Lightning fit, checkpoint round trip on both stacks."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cosmolit.errors import UsageError

SMALL = dict(bands="gri", stamp=32, filters=(4, 8, 8, 8))  # fast test network


def _batch(path, n=8):
    from cosmolit.data import GalaxyDataModule

    dm = GalaxyDataModule(path, batch_size=n, val_fraction=0.25, seed=0, in_memory=True)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    return dm, x, y


def test_defaults_match_the_study_parameter_count():
    from cosmolit.models.cnn import ShapeCNN

    model = ShapeCNN()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_517_205


def test_forward_and_predict_shapes(synthetic_small_h5):
    from cosmolit.models.cnn import ShapeCNN

    dm, x, y = _batch(synthetic_small_h5)
    model = ShapeCNN(normalisation=dm.normalisation, **SMALL).eval()
    mean, scale_tril = model(x)
    assert mean.shape == (8, 3) and scale_tril.shape == (8, 3, 3)
    assert torch.all(torch.diagonal(scale_tril, dim1=-2, dim2=-1) > 0)
    out = model.predict_step((x, y), 0)
    assert out["mean"].shape == (8, 3) and out["cov"].shape == (8, 3, 3)
    assert torch.allclose(out["cov"], out["cov"].transpose(-1, -2))
    assert torch.all(torch.linalg.eigvalsh(out["cov"].double()) > 0)
    # the network sees asinh(x / scale): scaling the images and the scale together changes nothing
    scaled = ShapeCNN(normalisation=[2 * s for s in dm.normalisation], **SMALL).eval()
    scaled.load_state_dict(model.state_dict())
    assert torch.allclose(scaled(2 * x)[0], mean, atol=1e-5)
    assert torch.allclose(model.denormalise(model.normalise(x)), x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("loss", ["decoupled", "nll", "mse"])
def test_loss_decreases_on_a_fixed_batch(synthetic_small_h5, loss):
    from cosmolit.models.cnn import ShapeCNN

    torch.manual_seed(0)
    dm, x, y = _batch(synthetic_small_h5)
    model = ShapeCNN(normalisation=dm.normalisation, target_stats=dm.target_stats, loss=loss, lr=3e-3, **SMALL)
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        value = model.compute_loss(x, y)
        value.backward()
        opt.step()
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.1 * abs(losses[0])
    # the loss is what its name says, on the model's own outputs, in standardised units
    model.eval()
    with torch.no_grad():
        mean, scale_tril = model(x)  # physical units
        value = model.compute_loss(x, y)
    scale = torch.tensor([s for _, s in dm.target_stats])
    squared = 0.5 * (((mean - y) / scale) ** 2).sum(-1)
    # NLL of standardised targets = physical NLL - sum log scale
    nll = -torch.distributions.MultivariateNormal(mean, scale_tril=scale_tril).log_prob(y) - scale.log().sum()
    ref = {"mse": squared, "nll": nll, "decoupled": squared + nll}[loss].mean()
    assert torch.allclose(value, ref, rtol=1e-4, atol=1e-4)


def test_decoupled_loss_keeps_the_likelihood_out_of_the_trunk_and_the_means(synthetic_small_h5):
    """The covariance part of the decoupled loss moves only the covariance rows of the head."""
    from cosmolit.models.cnn import ShapeCNN

    torch.manual_seed(0)
    dm, x, y = _batch(synthetic_small_h5)
    grads = {}
    for loss in ("decoupled", "mse"):
        torch.manual_seed(1)
        model = ShapeCNN(normalisation=dm.normalisation, target_stats=dm.target_stats, loss=loss, **SMALL)
        model.compute_loss(x, y).backward()
        grads[loss] = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    t = 3  # targets: rows 0..2 of the head are the means, the rest the Cholesky factor
    for name, g in grads["decoupled"].items():
        if name.startswith("head.linear"):
            assert torch.allclose(g[:t], grads["mse"][name][:t], atol=1e-6)
            assert g[t:].abs().sum() > 0  # the covariance rows do learn
        else:
            assert torch.allclose(g, grads["mse"][name], atol=1e-6), name


def test_targets_are_standardised_and_the_response_calibrated(synthetic_small_h5, tmp_path):
    import numpy as np

    from cosmolit.models.cnn import ShapeCNN
    from cosmolit.models.targets import TargetTransform

    dm, x, y = _batch(synthetic_small_h5)
    truth = np.stack([dm._train.targets[:, k] for k in range(3)], axis=1).astype(np.float64)
    assert np.allclose([m for m, _ in dm.target_stats], truth.mean(0), atol=1e-6)
    assert np.allclose([s for _, s in dm.target_stats], truth.std(0), atol=1e-6)
    # fit_response recovers a known line and removes it; targets not listed stay untouched
    tt = TargetTransform(["e1", "e2", "redshift"], calibrate=["e1", "e2"])
    rng = np.random.default_rng(0)
    true = rng.normal(0, 0.3, (4000, 3))
    pred = true * [0.8, 0.02, 0.5] + [0.01, 0.0, 0.1] + rng.normal(0, 0.01, (4000, 3))
    notes = []
    got = tt.fit_response(pred, true, echo=notes.append)
    assert set(got) == {"e1"} and got["e1"]["slope"] == pytest.approx(0.8, abs=0.003)
    assert got["e1"]["intercept"] == pytest.approx(0.01, abs=0.001)
    assert len(notes) == 1 and "e2" in notes[0] and "not learned" in notes[0]  # slope 0.02: left alone
    mean = torch.tensor([[0.81, 0.3, 1.0]])
    tril = torch.eye(3).unsqueeze(0) * 0.1
    m_cal, l_cal = tt.to_physical(mean, tril)
    assert torch.allclose(m_cal, torch.tensor([[(0.81 - got["e1"]["intercept"]) / got["e1"]["slope"], 0.3, 1.0]]))
    assert torch.allclose(l_cal[0].diagonal(), torch.tensor([0.1 / got["e1"]["slope"], 0.1, 0.1]))
    assert torch.equal(tt.to_physical(mean, tril, calibrated=False)[0], mean)
    # the response is saved with the weights and restored by load_from_checkpoint
    model = ShapeCNN(normalisation=dm.normalisation, target_stats=dm.target_stats, **SMALL).eval()
    model.target_transform.response[0] = torch.tensor([0.5, 0.1])
    assert model.target_transform.responses() == {"e1": {"slope": 0.5, "intercept": pytest.approx(0.1)}}
    with torch.no_grad():
        raw, cal = model(x, calibrated=False)[0], model(x)[0]
    assert torch.allclose(cal[:, 0], (raw[:, 0] - 0.1) / 0.5, atol=1e-5) and torch.equal(cal[:, 1:], raw[:, 1:])
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(str(tmp_path / "m.ckpt"))
    back = ShapeCNN.load_from_checkpoint(str(tmp_path / "m.ckpt"), map_location="cpu").eval()
    with torch.no_grad():
        assert torch.equal(back(x)[0], cal)


def test_hparam_checks_and_config():
    from pathlib import Path

    from cosmolit.config import from_dict, read_yaml
    from cosmolit.models.cnn import ShapeCNN, ShapeCNNConfig

    cfg = from_dict(ShapeCNNConfig, read_yaml(Path(__file__).resolve().parents[1] / "configs" / "cnn.yaml")["model"])
    assert cfg.targets == ("e1", "e2", "redshift") and cfg.filters == (32, 64, 128, 256) and cfg.loss == "decoupled"
    assert cfg.calibrate == ("e1", "e2")
    assert ShapeCNNConfig(targets=("redshift",)).calibrate == ()
    for bad in ({"loss": "l1"}, {"prelu": "shared"}, {"lr": 0}, {"targets": []}, {"dropout": 0.1},
                {"calibrate": ["g1"]}):
        with pytest.raises(UsageError):
            from_dict(ShapeCNNConfig, bad)
    for bad in (dict(loss="l1"), dict(normalisation=[1.0, 2.0]), dict(normalisation=[1.0, 0.0, 1.0]),
                dict(stamp=30), dict(target_stats=[[0, 1]]), dict(target_stats=[[0, 1], [0, 0], [1, 1]]),
                dict(calibrate=["redshift", "g1"])):
        with pytest.raises(UsageError):
            ShapeCNN(**{**SMALL, **bad})


def test_check_compatible(synthetic_small_h5):
    from cosmolit.dataset import inspect_dataset
    from cosmolit.models.cnn import ShapeCNN

    info = inspect_dataset(synthetic_small_h5)
    ShapeCNN(**SMALL).check_compatible(info)
    with pytest.raises(UsageError, match="bands 'gri'.*'griz'"):
        ShapeCNN(**{**SMALL, "bands": "griz"}).check_compatible(info)
    with pytest.raises(UsageError, match="32x32.*64x64"):
        ShapeCNN(**{**SMALL, "stamp": 64}).check_compatible(info)


def test_fit_logs_epoch_means_and_checkpoint_reloads_in_a_subprocess(synthetic_small_h5, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from cosmolit.data import GalaxyDataModule
    from cosmolit.models.cnn import ShapeCNN

    pl.seed_everything(0)
    dm = GalaxyDataModule(synthetic_small_h5, batch_size=8, val_fraction=0.25, seed=0)
    dm.setup("fit")
    model = ShapeCNN(normalisation=dm.normalisation, provenance=dm.provenance, **SMALL)
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss", mode="min", filename="best")
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=True,
                         default_root_dir=str(tmp_path), callbacks=[ckpt_cb], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"train_loss", "train_loss_epoch", "val_loss"} <= set(metrics)
    assert torch.isfinite(metrics["val_loss"])
    # val_loss is the mean of the validation batch losses
    model.eval()
    with torch.no_grad():
        losses = [model.compute_loss(x, y) for x, y in dm.val_dataloader()]
    assert float(metrics["val_loss"]) == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
    # val_mse, the metric the decoupled loss picks checkpoints by, is the standardised squared error
    assert model.monitor == "val_mse" and ShapeCNN(loss="nll", **SMALL).monitor == "val_loss"
    with torch.no_grad():
        sq = [((model(x, calibrated=False)[0] - y) / model.target_transform.scale).pow(2).mean()
              for x, y in dm.val_dataloader()]
    assert float(metrics["val_mse"]) == pytest.approx(float(torch.stack(sq).mean()), rel=1e-4)
    path = ckpt_cb.best_model_path
    raw = torch.load(path, map_location="cpu", weights_only=True)
    hp = raw["hyper_parameters"]
    assert hp["bands"] == "gri" and hp["normalisation"] == dm.normalisation and hp["provenance"]["n"] == 48

    model.load_state_dict(raw["state_dict"])
    x, _ = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        expected = model.eval()(x)
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import json, torch
        from cosmolit.models.cnn import ShapeCNN
        model = ShapeCNN.load_from_checkpoint({path!r}, map_location="cpu").eval()
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        with torch.no_grad():
            mean, scale_tril = model(x)
        print(json.dumps({{"mean": mean.tolist(), "tril": scale_tril.tolist(), "norm": model.hparams.normalisation}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert torch.equal(torch.tensor(out["mean"]), expected[0])
    assert torch.equal(torch.tensor(out["tril"]), expected[1])
    assert out["norm"] == dm.normalisation


def test_per_step_values_are_logged_at_the_logger_steps_and_the_last_batch(synthetic_small_h5, tmp_path):
    """train_loss / train_mse are logged at the steps the logger writes (every log_every_n_steps)
    and at an epoch's last batch, with that step's own values; not at the other steps."""
    import csv

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from cosmolit.data import GalaxyDataModule
    from cosmolit.models.cnn import ShapeCNN

    class Losses(pl.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.values.append((float(outputs["loss"]), float(outputs["mse"])))

    pl.seed_everything(0)
    dm = GalaxyDataModule(synthetic_small_h5, batch_size=5, val_fraction=0.25, seed=0)
    model = ShapeCNN(**SMALL)
    calls = []
    log = model.log
    model.log = lambda name, *a, **k: (calls.append(name), log(name, *a, **k))
    losses = Losses()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(str(tmp_path), name="run"),
                         log_every_n_steps=3, callbacks=[losses], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    per_epoch = trainer.num_training_batches
    assert per_epoch % 3 != 0  # so that the last batch is not also a logger step
    steps = 2 * per_epoch
    expected = sorted({s for s in range(steps) if (s + 1) % 3 == 0} | {per_epoch - 1, steps - 1})
    assert calls.count("train_loss") == calls.count("train_mse") == len(expected) < steps
    with open(trainer.logger.log_dir + "/metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss")]
    written = [int(r["step"]) for r in rows]
    assert written == [s for s in range(steps) if (s + 1) % 3 == 0]
    for r in rows:
        loss, mse = losses.values[int(r["step"])]
        assert float(r["train_loss"]) == pytest.approx(loss, rel=1e-6)
        assert float(r["train_mse"]) == pytest.approx(mse, rel=1e-6)
    assert float(trainer.progress_bar_metrics["train_loss"]) == pytest.approx(losses.values[-1][0], rel=1e-6)
    # the epoch mean still covers every step
    mean = np.mean([v[0] for v in losses.values[per_epoch:]])
    assert float(trainer.callback_metrics["train_loss_epoch"]) == pytest.approx(mean, rel=1e-5)


def test_ipu_rules_hold_in_the_steps(synthetic_small_h5, monkeypatch):
    """On an IPU the step returns just the loss, marked; it logs nothing itself; no host reads."""
    import cosmolit.backends as backends
    import cosmolit.models.base as base
    from cosmolit.models.cnn import ShapeCNN

    dm, x, y = _batch(synthetic_small_h5)
    model = ShapeCNN(normalisation=dm.normalisation, **SMALL)
    marked = []
    monkeypatch.setattr(backends, "_loss_hook", marked.append)
    monkeypatch.setattr(base, "on_ipu", lambda module: True)
    monkeypatch.setattr(model, "log", lambda *a, **k: pytest.fail("self.log called inside a step on IPU"))
    out = model.training_step((x, y), 0)
    assert isinstance(out, torch.Tensor) and out.dim() == 0 and marked and marked[0] is out
    model.on_train_batch_end({"loss": out}, (x, y), 0)
    assert len(model._step_values["train"]["loss"]) == 1


def test_calibrate_fits_response_then_sigma_scale_over_the_loader():
    """calibrate fits prediction on truth over every batch, then the factor on sigma that makes the
    response-calibrated intervals cover as they claim, and stores both in the transform."""
    from torch.utils.data import DataLoader, TensorDataset

    from cosmolit.models.targets import TargetTransform, calibrate

    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4000, 2, generator=gen) * 0.3
    noise = torch.randn(4000, 2, generator=gen) * 0.1  # true scatter of the (calibrated) estimate

    class Fake(torch.nn.Module):
        # e1: unbiased, claims sigma 0.2 (twice too wide); e2: mean 0.7 (y + noise) + 0.02 claiming
        # 0.7 x 0.05 (after removing the response: 0.05, half the true 0.1)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.target_transform = TargetTransform(["e1", "e2"], calibrate=["e2"])

        def estimate(self, x, calibrated=True):
            assert not calibrated and not self.training
            t, n = x[:, :2], x[:, 2:]
            mean = torch.stack([t[:, 0] + n[:, 0], 0.7 * (t[:, 1] + n[:, 1]) + 0.02], -1) + self.w
            cov = torch.diag_embed(torch.tensor([0.2, 0.7 * 0.05]).expand(len(x), 2) ** 2)
            return {"mean": mean, "cov": cov}

    model = Fake().train()
    got = calibrate(model, DataLoader(TensorDataset(torch.cat([y, noise], 1), y), batch_size=64), progress=False)
    assert model.training  # mode restored
    assert set(got["response"]) == {"e2"}
    assert got["response"]["e2"]["slope"] == pytest.approx(0.7, abs=0.03)
    assert got["response"]["e2"]["intercept"] == pytest.approx(0.02, abs=0.005)
    assert got["sigma_scale"]["e1"] == pytest.approx(0.5, rel=0.05)
    assert got["sigma_scale"]["e2"] == pytest.approx(2.0, rel=0.05)
    tt = model.target_transform
    assert tt.sigma_scales() == pytest.approx(got["sigma_scale"])
    # applied: scale_tril rows times factor / slope; moments alike (D C D), the same either way
    d = tt.sigma_scale / tt.response[:, 0]
    mean0, L0 = torch.tensor([[0.3, -0.2]]), torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    mean, L = tt.to_physical(mean0, L0)
    assert torch.allclose(torch.diagonal(L[0]), torch.diagonal(L0[0]) * d)
    m2, c2 = tt.calibrate_moments(*tt.to_physical(mean0, L0, calibrated=False)[:1], L0 @ L0.transpose(-1, -2))
    assert torch.allclose(m2, mean) and torch.allclose(c2, L @ L.transpose(-1, -2))
    assert torch.allclose(mean[0, 1], (mean0[0, 1] - tt.response[1, 1]) / tt.response[1, 0])


def test_sigma_scale_restores_nominal_coverage_and_loads_from_older_state():
    """After fit_sigma_scale, the coverage of fresh Gaussian data at 68 % and 95 % is nominal;
    a state dict written before sigma_scale existed still loads (factors of one)."""
    from cosmolit.measure.calibration import coverage
    from cosmolit.models.targets import TargetTransform

    rng = np.random.default_rng(1)
    truth, claimed = rng.normal(size=(5000, 1)), np.full((5000, 1), 0.4)
    mean = truth + rng.normal(size=(5000, 1)) * 0.6  # the network says 0.4, the scatter is 0.6
    tt = TargetTransform(["redshift"])
    assert coverage(truth[:, 0], mean[:, 0], claimed[:, 0], 0.6827) < 0.55
    (factor,) = tt.fit_sigma_scale(mean, claimed, truth).values()
    assert factor == pytest.approx(1.5, rel=0.04)
    fresh = rng.normal(size=(5000,))
    fresh_mean = fresh + rng.normal(size=5000) * 0.6
    sigma = np.full(5000, 0.4 * factor)
    assert coverage(fresh, fresh_mean, sigma, 0.6827) == pytest.approx(0.6827, abs=0.025)
    assert coverage(fresh, fresh_mean, sigma, 0.9545) == pytest.approx(0.9545, abs=0.015)
    old = {k: v for k, v in tt.state_dict().items() if k != "sigma_scale"}
    again = TargetTransform(["redshift"])
    again.load_state_dict(old)  # strict: the missing buffer is filled in
    assert again.sigma_scales() == {}


def test_symmetrised_estimate_is_exactly_equivariant(synthetic_small_h5):
    """With symmetrise, predicting a flipped or rotated stamp gives the stamp's own estimate with
    e1, e2 turned (signs from the spin-2 rule) and redshift unchanged; without, it does not."""
    from cosmolit.models.cnn import ShapeCNN
    from cosmolit.models.targets import transform_images

    _, x, _ = _batch(synthetic_small_h5)
    torch.manual_seed(0)
    sym = ShapeCNN(symmetrise=True, target_stats=[[0.01, 0.3], [-0.02, 0.3], [0.8, 0.4]], **SMALL).eval()
    plain = ShapeCNN(target_stats=[[0.01, 0.3], [-0.02, 0.3], [0.8, 0.4]], **SMALL).eval()
    plain.load_state_dict(sym.state_dict())
    tt = sym.target_transform
    with torch.no_grad():
        ref = sym.estimate(x, calibrated=False)
        for g in (1, 2, 3, 4, 5, 7):
            s = tt.symmetry_signs(g)
            got = sym.estimate(transform_images(x, g).contiguous(), calibrated=False)
            assert torch.allclose(got["mean"] * s, ref["mean"], atol=1e-5), g
            assert torch.allclose(got["cov"] * s.unsqueeze(-1) * s, ref["cov"], atol=1e-6), g
        assert tt.symmetry_signs(4).tolist() == [-1, 1, 1] and tt.symmetry_signs(1).tolist() == [1, -1, 1]
        assert tt.symmetry_signs(3).tolist() == [1, 1, 1]  # a half turn leaves spin-2 quantities alone
        # the plain network is not equivariant, so the check above can fail
        a, b = plain.estimate(x, calibrated=False), plain.estimate(transform_images(x, 4).contiguous(), calibrated=False)
        assert not torch.allclose(b["mean"] * tt.symmetry_signs(4), a["mean"], atol=1e-5)
        # the symmetrised estimate is the mean of the eight turned-back plain estimates
        means = [plain.estimate(transform_images(x, g), calibrated=False)["mean"] * tt.symmetry_signs(g) for g in range(8)]
        assert torch.allclose(torch.stack(means).mean(0), ref["mean"], atol=1e-6)
    # a target without a known symmetry cannot be symmetrised
    with pytest.raises(UsageError, match="symmetrise: the targets \\['nb0_dx'\\]"):
        ShapeCNN(symmetrise=True, targets=("e1", "nb0_dx"), **SMALL)


def test_estimate_in_cpu_chunks_equals_one_pass(synthetic_small_h5):
    """Without autograd on CPU in eval mode (BatchNorm on running statistics), estimate runs in chunks
    of CPU_CHUNK stamps (cache); the result is the
    one-pass result, stamp for stamp, and gradients still flow through a single pass."""
    from cosmolit.models import cnn

    _, x, _ = _batch(synthetic_small_h5)
    x = torch.cat([x] * (cnn.CPU_CHUNK // len(x) + 2))[: cnn.CPU_CHUNK * 2 + 3]  # 2 chunks and a remainder
    torch.manual_seed(0)
    model = cnn.ShapeCNN(symmetrise=True, target_stats=[[0.01, 0.3], [-0.02, 0.3], [0.8, 0.4]], **SMALL).eval()
    with torch.no_grad():
        chunked = model.estimate(x)
        whole = [model.estimate(x[i:i + 1]) for i in range(len(x))]
    for key in ("mean", "cov"):
        assert chunked[key].shape[0] == len(x)
        assert torch.allclose(chunked[key], torch.cat([w[key] for w in whole]), atol=1e-6), key
    assert model.estimate(x)["mean"].requires_grad  # with autograd: one pass, differentiable


def test_symmetrised_response_of_spin2_targets_goes_through_the_origin():
    from cosmolit.models.targets import TargetTransform

    rng = np.random.default_rng(4)
    truth = np.stack([rng.normal(0, 0.3, 500), rng.uniform(0.2, 2.0, 500)], 1)
    pred = 0.7 * truth + np.array([0.02, 0.1]) + rng.normal(0, 0.05, (500, 2))
    sym = TargetTransform(["e1", "redshift"], calibrate=["e1", "redshift"], symmetrise=True)
    got = sym.fit_response(pred, truth)
    assert got["e1"]["intercept"] == 0.0
    assert got["e1"]["slope"] == pytest.approx(float(truth[:, 0] @ pred[:, 0] / (truth[:, 0] @ truth[:, 0])))
    assert got["redshift"]["intercept"] == pytest.approx(0.1, abs=0.02)  # not spin-2: a free line
    free = TargetTransform(["e1", "redshift"], calibrate=["e1"]).fit_response(pred, truth)
    assert free["e1"]["intercept"] == pytest.approx(0.02, abs=0.01)
