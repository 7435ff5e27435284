"""GalaxyVAE, its decoder and the two-stage (VAE, then latent flow) training."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cosmolit.config import from_dict
from cosmolit.errors import UsageError
from cosmolit.nn.decoder import Decoder

SMALL = dict(bands="gri", stamp=32, latent_dim=6, filters=(4, 8, 8, 16), flow_layers=2, flow_hidden=(16,),
             flow_epochs=2, flow_batch_size=8)


def _vae(**kw):
    from cosmolit.models.vae import GalaxyVAE

    torch.manual_seed(0)
    return GalaxyVAE(**{**SMALL, **kw})


def _stamps(path, n=16):
    import h5py

    with h5py.File(path, "r") as f:
        return torch.from_numpy(f["images"][:n]), torch.from_numpy(f["clean"][:n])


# ----------------------------------------------------------------------------- decoder
def test_decoder_parameter_count_matches_the_study():
    # TF decoder of the study: 3,319,942 trainable parameters (per-element PReLU slopes).
    dec = Decoder()
    assert sum(p.numel() for p in dec.parameters()) == 3_319_942
    from cosmolit.nn.trunk import ElementwisePReLU

    slopes = sum(p.numel() for m in dec.modules() if isinstance(m, ElementwisePReLU) for p in m.parameters())
    # per-element PReLU slopes: 256 + 4096 after the dense layers, 491,520 after the convolutions
    assert slopes == 4_352 + 491_520


def test_decoder_shapes_and_per_channel_variant():
    dec = Decoder(latent_dim=5, out_channels=3, stamp=32, filters=(16, 8, 8, 4), prelu="channel")
    out = dec(torch.randn(2, 5))
    assert out.shape == (2, 3, 32, 32)
    assert sum(p.numel() for p in dec.parameters()) < sum(
        p.numel() for p in Decoder(5, 3, 32, (16, 8, 8, 4), "element").parameters())
    assert all(m.dilation == (1, 1) for m in dec.modules() if isinstance(m, torch.nn.ConvTranspose2d))


@pytest.mark.parametrize("kw", [dict(stamp=40), dict(prelu="shared"), dict(filters=()), dict(latent_dim=0)])
def test_decoder_refuses_bad_settings(kw):
    with pytest.raises(UsageError):
        Decoder(**kw)


# ----------------------------------------------------------------------------- VAE
def test_shapes(synthetic_small_h5):
    vae = _vae().eval()
    x, _ = _stamps(synthetic_small_h5, 5)
    mu, sigma = vae.encode(x)
    assert mu.shape == sigma.shape == (5, 6)
    assert (sigma > 0).all()
    assert vae.decode(mu).shape == (5, 3, 32, 32)
    assert vae.reconstruct(x).shape == (5, 3, 32, 32)
    assert vae.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, 3, 32, 32)


def test_kl_matches_torch_distributions():
    from cosmolit.models.vae import gaussian_kl

    mu, s = torch.randn(4, 7), torch.rand(4, 7) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, s),
                                            torch.distributions.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(gaussian_kl(mu, s), ref, atol=1e-5)


def test_loss_decreases_on_a_fixed_batch(synthetic_small_h5):
    vae = _vae(lr=5e-3)
    x, clean = _stamps(synthetic_small_h5, 8)
    opt = vae.configure_optimizers()

    def loss():
        torch.manual_seed(1)
        return vae.loss_terms(x, clean)["loss"]

    with torch.no_grad():
        before = float(loss())
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = float(loss())
    assert after < before - 0.1 * abs(before)


def test_denoiser_target_is_the_clean_image(synthetic_small_h5):
    from cosmolit.models.vae import gaussian_nll

    vae = _vae().eval()
    x, clean = _stamps(synthetic_small_h5, 8)
    assert not torch.equal(x, clean)
    torch.manual_seed(3)
    denoise = vae.loss_terms(x, clean)
    torch.manual_seed(3)
    autoenc = vae.loss_terms(x, x)
    assert not torch.allclose(denoise["rec"], autoenc["rec"])
    assert torch.allclose(denoise["kl"], autoenc["kl"])  # same encoder input, same draw
    # the reconstruction term is the Gaussian NLL of the normalised clean target
    torch.manual_seed(3)
    mu, sigma = vae.encode(x)
    pred = vae.decoder(mu + sigma * torch.randn_like(mu))
    target = vae.normalise(clean)
    # recon_sigma "optimal" (default): each band's sigma is the RMS residual of the batch ...
    rms = (target - pred).pow(2).mean(dim=(0, 2, 3)).sqrt()  # (C,)
    ref = gaussian_nll(target, pred, rms.log()).mean()
    assert torch.allclose(denoise["rec"], ref, rtol=1e-5)
    # ... which is the maximum-likelihood sigma: any other sigma gives a larger NLL
    for factor in (0.8, 1.25):
        assert gaussian_nll(target, pred, (rms * factor).log()).mean() > ref
    # ... and held fixed in the gradient: d rec / d pred = (pred - target) / sigma^2 per pixel
    pred_leaf = pred.detach().requires_grad_(True)
    from cosmolit.models.vae import optimal_log_sigma

    gaussian_nll(target, pred_leaf, optimal_log_sigma(target, pred_leaf)).sum().backward()
    expected = (pred - target).detach() / rms.view(1, -1, 1, 1) ** 2
    assert torch.allclose(pred_leaf.grad, expected, rtol=1e-4, atol=1e-6)
    # recon_sigma "stamp": the maximum-likelihood sigma of each stamp and band, so that every
    # galaxy weighs alike whatever its brightness
    per_stamp = _vae(recon_sigma="stamp").eval()
    per_stamp.load_state_dict(vae.state_dict())
    torch.manual_seed(3)
    stamp_terms = per_stamp.loss_terms(x, clean)
    rms_nb = (target - pred).pow(2).mean(dim=(2, 3)).sqrt()  # (B, C)
    ref_nb = gaussian_nll(target, pred, rms_nb.log())  # (B,)
    assert torch.allclose(stamp_terms["rec"], ref_nb.mean(), rtol=1e-5)
    assert not torch.allclose(stamp_terms["rec"], denoise["rec"])
    hw = target.shape[-1] * target.shape[-2]
    assert torch.allclose(ref_nb, (hw * rms_nb.log() + hw * 0.5 * (1 + np.log(2 * np.pi))).sum(-1), rtol=1e-5)
    pred_leaf.grad = None
    gaussian_nll(target, pred_leaf, optimal_log_sigma(target, pred_leaf, per_stamp=True)).sum().backward()
    assert torch.allclose(pred_leaf.grad, (pred - target).detach() / rms_nb[:, :, None, None] ** 2, rtol=1e-4, atol=1e-6)
    # a learned or fixed sigma is a parameter or buffer instead
    assert isinstance(_vae(recon_sigma="learned").log_sigma, torch.nn.Parameter)
    assert float(_vae(recon_sigma=0.5).log_sigma[0]) == pytest.approx(np.log(0.5))
    # a batch without a target trains an autoencoder
    assert vae._split((x,))[1] is x and vae._split(x)[1] is x and vae._split((x, clean))[1] is clean


def test_datamodule_targets_select_denoiser_or_autoencoder(synthetic_small_h5, tmp_path):
    from cosmolit.data import GalaxyDataModule
    from cosmolit.synthetic import write_synthetic_dataset

    noisy_only = write_synthetic_dataset(tmp_path / "noclean.h5", n=16, bands="gri", size=32, seed=1, clean=False)
    for path, denoiser in ((synthetic_small_h5, True), (noisy_only, False)):
        dm = GalaxyDataModule(path, target_kind="clean", batch_size=4, val_fraction=0.25, seed=0)
        dm.setup("fit")
        assert dm.has_clean is denoiser
        x, target = next(iter(dm.train_dataloader()))
        assert torch.equal(x, target) is (not denoiser)


def test_sample_is_deterministic_for_a_seed(synthetic_small_h5):
    vae = _vae().eval()
    for from_flow in (False, True):
        a = vae.sample(3, generator=torch.Generator().manual_seed(5), from_flow=from_flow)
        b = vae.sample(3, generator=torch.Generator().manual_seed(5), from_flow=from_flow)
        c = vae.sample(3, generator=torch.Generator().manual_seed(6), from_flow=from_flow)
        assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(UsageError):
        vae.sample(0)


def test_config_schema_and_hparam_checks():
    from cosmolit.models.vae import GalaxyVAE, GalaxyVAEConfig

    cfg = from_dict(GalaxyVAEConfig, {"latent_dim": 16, "filters": [8, 16, 32, 64], "flow_hidden": [64, 64]})
    assert cfg.filters == (8, 16, 32, 64) and cfg.kl_weight == 0.01 and cfg.flow_layers == 8
    for bad in ({"kl_weight": -1}, {"prelu": "shared"}, {"flow_latents": "median"}, {"recon_sigma": 0},
                {"latent_size": 3}):
        with pytest.raises(UsageError):
            from_dict(GalaxyVAEConfig, bad)
    with pytest.raises(UsageError):
        GalaxyVAE(**{**SMALL, "latent_dim": 1})


def test_yaml_preset_loads(tmp_path):
    from pathlib import Path

    from cosmolit.config import read_yaml
    from cosmolit.models.vae import GalaxyVAEConfig

    raw = read_yaml(Path(__file__).resolve().parents[1] / "configs" / "vae.yaml")
    cfg = from_dict(GalaxyVAEConfig, raw["model"])
    assert cfg.latent_dim == 32 and cfg.flow_hidden == (256, 256) and cfg.filters == (32, 64, 128, 256)


def test_two_stage_fit_and_checkpoint_roundtrip(synthetic_small_h5, tmp_path):
    import pytorch_lightning as pl

    from cosmolit.data import GalaxyDataModule

    class Meta(pl.Callback):  # the model-kind record `cosmolit fit` adds, read by cosmolit.checkpoint.load_model
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["cosmolit"] = {"model": "vae", "class": "GalaxyVAE"}

    pl.seed_everything(0)
    dm = GalaxyDataModule(synthetic_small_h5, target_kind="clean", batch_size=8, val_fraction=0.25, seed=0)
    dm.setup("fit")
    vae = _vae(normalisation=list(dm.normalisation))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Meta()])
    trainer.fit(vae, datamodule=dm)
    assert not bool(vae.flow_fitted)
    hist = vae.fit_flow(dm, epochs=3, seed=0, progress=False)
    assert len(hist["nll"]) == 3 and bool(vae.flow_fitted)
    ckpt = tmp_path / "vae.ckpt"
    trainer.save_checkpoint(str(ckpt))
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["state_dict"]["flow_fitted"].item() is True
    assert any(k.startswith("flow.layers.1.") for k in raw["state_dict"])

    vae.eval()
    expected = vae.sample(4, generator=torch.Generator().manual_seed(11))
    prior = vae.sample(4, generator=torch.Generator().manual_seed(11), from_flow=False)
    assert not torch.allclose(expected, prior)
    code = textwrap.dedent(f"""
        import json, torch
        from cosmolit.models.vae import GalaxyVAE
        from cosmolit.checkpoint import load_model
        m = GalaxyVAE.load_from_checkpoint({str(ckpt)!r}, map_location="cpu").eval()
        a = m.sample(4, generator=torch.Generator().manual_seed(11))
        m2, kind, _ = load_model({str(ckpt)!r}, expected="vae")
        b = m2.sample(4, generator=torch.Generator().manual_seed(11))
        print(json.dumps({{"a": a.flatten().tolist(), "b": b.flatten().tolist(), "kind": kind}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kind"] == "vae"
    assert torch.equal(torch.tensor(out["a"]).view_as(expected), expected)
    assert torch.equal(torch.tensor(out["b"]).view_as(expected), expected)


def test_generation_draws_implausible_galaxies_again(monkeypatch):
    """A generated stamp with a non-finite or absurd pixel (the decoder's answer to a latent from the
    flow's far tail) is replaced by the next draw of the same generator; the rest stay as drawn, and
    the output is reproducible. A model that never recovers is an error, not an endless loop."""
    from cosmolit.errors import CosmolitError
    from cosmolit.infer import generate_images
    from cosmolit.models.vae import MAX_DECODED_ASINH

    vae = _vae().eval()
    x = vae.sample(3, generator=torch.Generator().manual_seed(1), from_flow=False)
    assert not vae.implausible(x).any()
    scale = vae.norm_scale[0, :, 0, 0]
    x[1, 0, 5, 5] = float("inf")
    x[2, 1, 0, 0] = float(scale[1]) * np.sinh(MAX_DECODED_ASINH + 1)
    assert vae.implausible(x).tolist() == [False, True, True]

    clean, _ = generate_images(vae, 6, seed=4, batch_size=6, prior=True, progress=False)
    original = type(vae).sample
    calls = []

    def spoiled(self, n, generator=None, from_flow=True):
        out = original(self, n, generator=generator, from_flow=from_flow)
        calls.append(n)
        if len(calls) == 1:
            out[[0, 3], 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(type(vae), "sample", spoiled)
    images, redrawn = generate_images(vae, 6, seed=4, batch_size=6, prior=True, progress=False)
    assert redrawn == 2 and calls == [6, 2] and np.isfinite(images).all()
    keep = [1, 2, 4, 5]
    assert np.array_equal(images[keep], clean[keep]) and not np.array_equal(images[[0, 3]], clean[[0, 3]])
    calls.clear()
    again, _ = generate_images(vae, 6, seed=4, batch_size=6, prior=True, progress=False)
    assert np.array_equal(again, images)

    monkeypatch.setattr(type(vae), "sample", lambda self, n, generator=None, from_flow=True:
                        torch.full((n, 3, 16, 16), float("nan")))
    with pytest.raises(CosmolitError, match="after 20 redraws"):
        generate_images(vae, 4, seed=0, prior=True, progress=False)
