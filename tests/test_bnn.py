"""The Pyro Bayesian shape network: ELBO, no host sync, predictions, checkpoints, Predictive."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cosmolit.dataset import iter_images, read_truth
from cosmolit.errors import UsageError

TARGETS = ("e1", "e2", "redshift")
SMALL = dict(bands="gri", stamp=32, filters=(4, 8, 8, 8), train_size=40)  # fast test network


@pytest.fixture(scope="module")
def batch(synthetic_small_h5):
    """A fixed batch of 8 stamps: x raw electrons (8, 3, 32, 32), y (8, 3)."""
    _, images = next(iter_images(synthetic_small_h5, 8))
    truth = read_truth(synthetic_small_h5, list(TARGETS))
    x = torch.from_numpy(np.ascontiguousarray(images[:8]))
    y = torch.from_numpy(np.stack([truth[k][:8] for k in TARGETS], 1).astype(np.float32))
    return x, y


def step_loss(out):
    """The loss of a training_step output (a tensor, or a dict with its parts off the IPU)."""
    return out["loss"] if isinstance(out, dict) else out


def small_model(**kw):
    from cosmolit.models.bnn import BayesianShapeCNN

    torch.manual_seed(0)
    return BayesianShapeCNN(**{**SMALL, **kw})


def test_parameter_count_matches_the_study():
    """2 x 1,189,024 weight entries (loc, rho) + 969 biases + 12 BatchNorm + 307,200 PReLU slopes."""
    from cosmolit.models.bnn import BayesianShapeCNN

    model = BayesianShapeCNN()  # 6 bands, 64x64, filters 32..256, element-wise PReLU
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 2_726_229
    n_weights = sum(loc.numel() for loc in model.posterior.loc)
    assert n_weights == 1_172_160 + 36_864  # conv kernels + dense head
    assert len(model.site_names) == 9


def test_forward_and_predict_shapes(batch):
    x, y = batch
    model = small_model()
    mean, scale_tril = model(x)
    assert mean.shape == (8, 3) and scale_tril.shape == (8, 3, 3)
    assert torch.all(torch.diagonal(scale_tril, dim1=-2, dim2=-1) > 0)
    out = model.predict_samples(x, samples=5, seed=0)
    assert set(out) == {"mean", "aleatoric_cov", "epistemic_cov", "total_cov"}
    for key in ("aleatoric_cov", "epistemic_cov", "total_cov"):
        assert out[key].shape == (8, 3, 3)
        assert torch.allclose(out[key], out[key].transpose(-1, -2), atol=1e-6)
    assert out["mean"].shape == (8, 3)
    assert torch.allclose(out["total_cov"], out["aleatoric_cov"] + out["epistemic_cov"])
    step = model.predict_step((x, y), 0)
    assert step["mean"].shape == (8, 3)
    assert model.training  # predict_samples leaves the module's mode alone


def test_vectorised_prediction_equals_separate_passes(batch):
    """predict_samples (vmap over draws, chunked) = one functional pass per draw, same draws."""
    from torch.func import functional_call

    x, _ = batch
    model = small_model().eval()
    samples = 6
    out = model.predict_samples(x, samples=samples, seed=11, vectorise=True, max_pairs=16)  # chunks of 2 draws
    loop = model.predict_samples(x, samples=samples, seed=11, vectorise=False)  # one pass per draw
    for key in out:
        assert torch.allclose(out[key], loop[key], rtol=1e-4, atol=1e-7), key
    gen = torch.Generator().manual_seed(11)
    means, covs = [], []
    for _ in range(samples // 2):
        draws = model.posterior.rsample(samples=2, generator=gen, detach=True)
        for s in range(2):
            weights = model.posterior.as_dict([w[s] for w in draws])
            mean, tril = functional_call(model.net, weights, (model.normalise(x),))
            means.append(mean)
            covs.append(tril @ tril.transpose(-1, -2))
    means = torch.stack(means)
    assert torch.allclose(out["mean"], means.mean(0), atol=1e-5)
    assert torch.allclose(out["aleatoric_cov"], torch.stack(covs).mean(0), rtol=1e-4, atol=1e-6)
    dev = means - means.mean(0)
    epi = torch.einsum("sbi,sbj->bij", dev, dev) / (samples - 1)
    # each draw's mean carries float32 rounding of its size (other summation orders on other CPUs:
    # grouped against plain convolutions); a covariance of deviations inherits about 2 |dev| of it
    rounding = 2 * dev.abs().max() * 16 * torch.finfo(torch.float32).eps * means.abs().max()
    assert torch.allclose(out["epistemic_cov"], epi, rtol=1e-3, atol=float(rounding))


def test_cpu_passes_in_chunks_equal_the_vectorised_draws(batch):
    """On CPU a draw's pass over 8 stamps x 8 symmetries (64 images) goes CPU_CHUNK images at a time;
    the moments equal those of the vectorised path (whole batch in one pass), same draws."""
    from cosmolit.models.targets import CPU_CHUNK

    x, _ = batch
    model = small_model(symmetrise=True).eval()
    assert 8 * len(x) > 2 * CPU_CHUNK
    chunked = model.predict_samples(x, samples=3, seed=5, vectorise=False)
    whole = model.predict_samples(x, samples=3, seed=5, vectorise=True)
    for key in chunked:
        assert torch.allclose(chunked[key], whole[key], rtol=1e-4, atol=1e-7), key


def test_same_seed_same_prediction_and_samples_must_be_positive(batch):
    x, _ = batch
    model = small_model()
    a = model.predict_samples(x, samples=4, seed=3)
    b = model.predict_samples(x, samples=4, seed=3)
    c = model.predict_samples(x, samples=4, seed=4)
    assert torch.equal(a["mean"], b["mean"])
    assert not torch.equal(a["mean"], c["mean"])
    with pytest.raises(UsageError, match="samples"):
        model.predict_samples(x, samples=0)


def test_loss_decreases_on_a_fixed_batch(batch):
    x, y = batch
    model = small_model(lr=3e-3)
    opt = model.configure_optimizers()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = step_loss(model.training_step((x, y), 0))
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])


class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Raise on aten::_local_scalar_dense: .item(), bool(tensor), float(tensor) (fatal under PopTorch)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("host synchronisation (aten::_local_scalar_dense) in the training step")
        return func(*args, **(kwargs or {}))


def test_training_step_has_no_host_sync(batch):
    x, y = batch
    model = small_model()
    with _NoHostSync():  # the check itself must be able to fail
        with pytest.raises(RuntimeError, match="host synchronisation"):
            float(x.sum())
    with _NoHostSync():
        loss = step_loss(model.training_step((x, y), 0))
        loss.backward()
    assert loss.dim() == 0 and loss.requires_grad
    assert all(r.grad is not None for r in model.posterior.rho)  # the KL and likelihood reach the guide


def test_elbo_terms_kl_scaling_and_closed_form(batch):
    """loss = mean NLL + KL / train_size; KL = trace KL(guide site || model site) = closed form."""
    import pyro
    from pyro import poutine
    from torch.distributions import kl_divergence

    x, y = batch
    a = small_model(train_size=40)
    b = small_model(train_size=4000)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(5)
    ta = a.elbo_terms(x, y)
    torch.manual_seed(5)
    tb = b.elbo_terms(x, y)
    assert torch.allclose(ta["nll"], tb["nll"]) and torch.allclose(ta["kl"], tb["kl"])
    assert torch.allclose(ta["loss"], ta["nll"] + ta["kl"] / 40)
    assert torch.allclose(ta["loss"] - tb["loss"], ta["kl"] * (1 / 40 - 1 / 4000), rtol=1e-4)
    # the KL equals Pyro's site-by-site KL between guide and prior, and the closed form
    with pyro.validation_enabled(False):
        g = poutine.trace(a.guide).get_trace(x, y)
        m = poutine.trace(poutine.replay(a.model, trace=g)).get_trace(x, y)
    kl_sites = sum(kl_divergence(g.nodes[n]["fn"], m.nodes[n]["fn"]) for n in a.site_names)
    assert torch.allclose(ta["kl"], kl_sites, rtol=1e-5)
    assert torch.allclose(ta["kl"], a.posterior.kl(1.0), rtol=1e-5)
    generic = sum(  # torch's own Normal/Normal KL, independent of cosmolit's lean formula
        kl_divergence(torch.distributions.Normal(loc, torch.nn.functional.softplus(rho)),
                      torch.distributions.Normal(0.0, 1.0)).sum()
        for loc, rho in zip(a.posterior.loc, a.posterior.rho))
    assert torch.allclose(ta["kl"], generic, rtol=1e-5)
    # a wider prior changes the KL as the closed form says
    c = small_model(prior_scale=2.0)
    c.load_state_dict(a.state_dict())
    torch.manual_seed(5)
    assert torch.allclose(c.elbo_terms(x, y)["kl"], a.posterior.kl(2.0), rtol=1e-5)


@pytest.mark.parametrize("loss", ["decoupled", "nll"])
def test_pyro_step_equals_plain_torch_reference(batch, loss):
    """The hand-written reparameterised BNN (benchmark reference) computes the same loss and gradients."""
    from cosmolit.nn.bayes import TorchBayesianShapeNet

    x, y = batch
    stats = [[0.1, 0.3], [-0.05, 0.2], [1.0, 0.5]]
    model = small_model(loss=loss, target_stats=stats)
    ref = TorchBayesianShapeNet(in_channels=3, stamp=32, filters=SMALL["filters"], train_size=40, loss=loss)
    ref.net.load_state_dict(model.net.state_dict())
    ref.weights.load_state_dict(model.posterior.state_dict())
    torch.manual_seed(9)
    loss_pyro = model.elbo_terms(x, y)["loss"]
    torch.manual_seed(9)
    y_std = (y - torch.tensor([m for m, _ in stats])) / torch.tensor([s for _, s in stats])
    loss_ref = ref.loss(model.normalise(x), y_std)
    assert torch.allclose(loss_pyro, loss_ref, rtol=1e-5)
    loss_pyro.backward()
    loss_ref.backward()
    assert torch.allclose(model.posterior.loc[0].grad, ref.weights.loc[0].grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(model.posterior.rho[-1].grad, ref.weights.rho[-1].grad, rtol=1e-4, atol=1e-9)


def test_epistemic_spread_grows_with_wider_guide(batch):
    x, _ = batch
    model = small_model().eval()
    narrow = model.predict_samples(x, samples=8, seed=1)["epistemic_cov"]
    with torch.no_grad():
        for rho in model.posterior.rho:
            rho.add_(6.0)  # softplus(-3) / softplus(-9): scales about 400x wider
    wide = model.predict_samples(x, samples=8, seed=1)["epistemic_cov"]
    tr = lambda c: torch.diagonal(c, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    assert torch.all(tr(wide) > 10 * tr(narrow))


def test_predictive_recipe(batch):
    from pyro.infer import Predictive

    x, _ = batch
    model = small_model().eval()
    pred = Predictive(model.model, guide=model.guide, num_samples=4)(x)
    assert pred["obs"].shape == (4, 8, 3)
    first = model.site_names[0]
    w = pred[first].reshape(4, *model.posterior.loc[0].shape)
    assert not torch.equal(w[0], w[1])  # fresh weights per sample, close to the posterior loc
    assert torch.allclose(w[0], model.posterior.loc[0], atol=1e-2)
    assert set(model.site_names) <= set(pred)


def test_guide_draws_are_pyro_normal_draws(batch):
    """The guide's one-call draw (DrawnNormal) gives the numbers Normal(loc, softplus(rho)).rsample
    gives for the same seed; a draw with a sample shape or from an expanded copy is a fresh one."""
    import pyro.distributions as dist
    from pyro import poutine

    x, _ = batch
    model = small_model(init_scale=-3.0).eval()
    torch.manual_seed(4)
    trace = poutine.trace(model.guide).get_trace(x)
    torch.manual_seed(4)
    for name, loc, rho in zip(model.site_names, model.posterior.loc, model.posterior.rho):
        expected = torch.distributions.Normal(loc, torch.nn.functional.softplus(rho)).rsample()
        assert torch.equal(trace.nodes[name]["value"], expected), name
    assert trace.nodes[model.site_names[0]]["value"].requires_grad  # reparameterised: gradients reach loc, rho
    site = trace.nodes[model.site_names[0]]["fn"].base_dist
    assert site.rsample((2,)).shape == (2, *site.loc.shape)  # with a sample shape: fresh draws
    wide = site.expand((3, *site.loc.shape))  # as a plate would expand it
    assert type(wide) is dist.Normal and not torch.equal(wide.rsample()[0], wide.rsample()[0])


def test_config_and_bad_hparams(tmp_path):
    from cosmolit.models.bnn import BayesianShapeCNN, BayesianShapeCNNConfig
    from cosmolit.train import load_fit_config

    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "configs" / "bnn.yaml"
    _, cfg = load_fit_config("bnn", preset, {})
    assert isinstance(cfg, BayesianShapeCNNConfig)
    assert cfg.targets == TARGETS and cfg.filters == (32, 64, 128, 256)
    assert (cfg.prior_scale, cfg.init_scale, cfg.lr, cfg.samples, cfg.prelu) == (1.0, -9.0, 1e-3, 100, "element")
    assert (cfg.loss, cfg.calibrate) == ("decoupled", ("e1", "e2"))
    with pytest.raises(ValueError, match="mse is for the cnn"):
        BayesianShapeCNNConfig(loss="mse")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  prior_scale: -1\n")
    with pytest.raises(UsageError, match="prior_scale"):
        load_fit_config("bnn", bad, {})
    bad.write_text("model:\n  prelu: tanh\n")
    with pytest.raises(UsageError, match="prelu"):
        load_fit_config("bnn", bad, {})
    with pytest.raises(UsageError, match="samples"):
        BayesianShapeCNN(samples=0)


def test_checkpoint_round_trip_in_subprocess(batch, tmp_path):
    """fit -> checkpoint -> load_from_checkpoint in a fresh process: same predictions for a seed; Predictive works."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    x, y = batch
    model = small_model()
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    ckpt = tmp_path / "bnn.ckpt"
    trainer.save_checkpoint(str(ckpt))
    model.eval()
    here = model.predict_samples(x, samples=5, seed=21)["mean"].numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import json, numpy as np, torch
        from pyro.infer import Predictive
        from cosmolit.models.bnn import BayesianShapeCNN
        bnn = BayesianShapeCNN.load_from_checkpoint({str(ckpt)!r}, map_location="cpu").eval()
        x = torch.from_numpy(np.load({str(tmp_path / "x.npy")!r}))
        mean = bnn.predict_samples(x, samples=5, seed=21)["mean"]
        pred = Predictive(bnn.model, guide=bnn.guide, num_samples=3)(x)
        print(json.dumps({{"mean": mean.tolist(), "obs": list(pred["obs"].shape),
                          "train_size": bnn.hparams.train_size}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(out["mean"]), here, rtol=1e-5, atol=1e-6)
    assert out["obs"] == [3, 8, 3] and out["train_size"] == 40


def test_symmetrised_draws_average_the_eight_views(batch):
    """With symmetrise, each draw predicts the stamp under the 8 grid symmetries and averages the
    turned-back answers; the epistemic spread is over draws of that average; vmap agrees."""
    from torch.func import functional_call

    from cosmolit.models.targets import transform_images
    from cosmolit.nn.gaussian import covariance

    x, _ = batch
    model = small_model(symmetrise=True).eval()
    tt = model.target_transform
    out = model.predict_samples(x, samples=3, seed=3, calibrated=False)
    gen = torch.Generator().manual_seed(3)
    means, covs = [], []
    for _ in range(3):
        draws = model.posterior.rsample(samples=1, generator=gen, detach=True)
        weights = model.posterior.as_dict([w[0] for w in draws])
        m_acc, c_acc = 0, 0
        for g in range(8):
            mean, tril = functional_call(model.net, weights, (transform_images(model.normalise(x), g),))
            mean, tril = tt.to_physical(mean, tril, calibrated=False)
            s = tt.symmetry_signs(g)
            m_acc = m_acc + mean * s / 8
            c_acc = c_acc + covariance(tril) * s.unsqueeze(-1) * s / 8
        means.append(m_acc)
        covs.append(c_acc)
    means = torch.stack(means)
    assert torch.allclose(out["mean"], means.mean(0), atol=1e-5)
    assert torch.allclose(out["aleatoric_cov"], torch.stack(covs).mean(0), rtol=1e-4, atol=1e-6)
    dev = means - means.mean(0)
    assert torch.allclose(out["epistemic_cov"], torch.einsum("sbi,sbj->bij", dev, dev) / 2, rtol=1e-3, atol=1e-8)
    vec = model.predict_samples(x, samples=3, seed=3, calibrated=False, vectorise=True, max_pairs=128)
    for key in out:
        assert torch.allclose(vec[key], out[key], rtol=1e-3, atol=1e-7), key
    # and every draw is then exactly equivariant: a transposed stamp gives e1 -> -e1
    flipped = model.predict_samples(transform_images(x, 4).contiguous(), samples=3, seed=3, calibrated=False)
    assert torch.allclose(flipped["mean"] * tt.symmetry_signs(4), out["mean"], atol=1e-5)
    s4 = tt.symmetry_signs(4)
    assert torch.allclose(flipped["epistemic_cov"] * s4.unsqueeze(-1) * s4, out["epistemic_cov"], atol=1e-8)


@pytest.mark.parametrize("loss", ["decoupled", "nll"])
def test_declared_model_is_the_trained_objective(batch, loss):
    """Pyro's own TraceMeanField_ELBO on model and guide = train_size x (elbo_terms loss + a constant),
    gradients included: the model declares the likelihood the weights are trained with."""
    import math

    from pyro.infer import TraceMeanField_ELBO

    x, y = batch
    stats = [[0.1, 0.3], [-0.05, 0.2], [1.0, 0.5]]
    model = small_model(loss=loss, target_stats=stats, train_size=40)
    torch.manual_seed(3)
    ours = model.elbo_terms(x, y)["loss"]
    ours.backward()
    grads = [p.grad.clone() for p in (model.posterior.loc[-1], model.posterior.rho[-1], model.posterior.loc[0])]
    model.zero_grad()
    torch.manual_seed(3)  # the same weight draw: the ELBO traces the guide first, as elbo_terms
    pyro_loss = TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(model.model, model.guide, x, y)
    const = sum(math.log(s) for _, s in stats) + (1.5 * math.log(2 * math.pi) if loss == "decoupled" else 0.0)
    assert torch.allclose(pyro_loss / 40, ours + const, rtol=1e-5)
    (pyro_loss / 40).backward()
    for g, p in zip(grads, (model.posterior.loc[-1], model.posterior.rho[-1], model.posterior.loc[0])):
        assert torch.allclose(p.grad, g, rtol=1e-3, atol=1e-4 * float(g.abs().max()))  # float32 round-off
    assert grads[0].abs().sum() > 0


def test_predictive_draw_has_the_moments_of_that_draw_in_predict(batch):
    """One guide draw replayed through the model (y=None): obs ~ N(mean, cov) with the draw's symmetrised,
    calibrated mean and aleatoric covariance, exactly what predict_samples gives for that same draw."""
    from pyro import poutine

    x, _ = batch
    model = small_model(symmetrise=True, init_scale=-4.0).eval()
    with torch.no_grad():
        model.target_transform.response.copy_(torch.tensor([[0.8, 0.01], [0.9, -0.02], [1.0, 0.0]]))
    for seed in (1, 2):
        torch.manual_seed(seed)  # the guide's draw = predict_samples' first draw for that seed
        trace = poutine.trace(model.guide).get_trace(x)
        mean, cov = poutine.replay(model.model, trace=trace)(x)
        ref = model.predict_samples(x, samples=1, seed=seed)
        assert torch.allclose(mean, ref["mean"], rtol=1e-5, atol=1e-6)
        assert torch.allclose(cov, ref["total_cov"], rtol=1e-4, atol=1e-8)
    other = model.predict_samples(x, samples=1, seed=3)["mean"]
    assert not torch.allclose(mean, other, atol=1e-4)  # the draws matter: the comparison can fail


def test_predictive_on_a_loaded_checkpoint_reproduces_predict(batch, tmp_path, synthetic_small_h5):
    """Predictive(model, guide) on a loaded, calibrated checkpoint: mean and covariance of obs over S
    draws = those `cosmolit predict` writes (infer.predict_shapes), within Monte Carlo error."""
    import pytorch_lightning as pl
    from pyro.infer import Predictive
    from torch.utils.data import DataLoader, TensorDataset

    from cosmolit.infer import predict_shapes
    from cosmolit.models.bnn import BayesianShapeCNN

    x, y = batch
    model = small_model()
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    with torch.no_grad():  # a wider guide (epistemic spread ~ aleatoric) and a calibration, as after fit
        for rho in model.posterior.rho:
            rho.add_(4.0)
        model.target_transform.response.copy_(torch.tensor([[0.8, 0.01], [0.9, -0.02], [1.0, 0.0]]))
        model.target_transform.sigma_scale.copy_(torch.tensor([1.6, 0.7, 1.0]))
    ckpt = tmp_path / "bnn.ckpt"
    trainer.save_checkpoint(str(ckpt))
    bnn = BayesianShapeCNN.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    S, S_pred = 300, 3000
    torch.manual_seed(0)
    with torch.no_grad():
        obs = Predictive(bnn.model, guide=bnn.guide, num_samples=S)(x)["obs"].double()  # (S, 8, T)
    pred = {k: torch.from_numpy(v).double()
            for k, v in predict_shapes(bnn, "bnn", synthetic_small_h5, samples=S_pred, limit=8, progress=False).items()}
    mean, dev = obs.mean(0), obs - obs.mean(0)
    cov = torch.einsum("sbi,sbj->bij", dev, dev) / (S - 1)
    epi = pred["epistemic_cov"]
    epi_var = torch.diagonal(epi, dim1=-2, dim2=-1)
    # standard errors: of obs' moments from its own draws, of predict's from its S_pred draws
    se_mean = torch.sqrt(obs.var(0) / S + epi_var / S_pred)
    prod = dev.unsqueeze(-1) * dev.unsqueeze(-2)  # (S, 8, T, T)
    se_cov = torch.sqrt(prod.var(0) / S + (epi_var.unsqueeze(-1) * epi_var.unsqueeze(-2) + epi ** 2) / S_pred)
    assert ((mean - pred["mean"]).abs() / se_mean).max() < 5
    assert ((cov - pred["cov"]).abs() / se_cov).max() < 5
    # the test can fail: leaving out the epistemic part, or its uncertainty calibration, is seen
    assert ((cov - pred["aleatoric_cov"]).abs() / se_cov).max() > 10
    assert torch.allclose(pred["cov"], pred["aleatoric_cov"] + epi)
    assert (epi[:, 0, 0] * (1 - 1 / 1.6 ** 2) / se_cov[:, 0, 0]).max() > 6
