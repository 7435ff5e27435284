"""GalaxyVAE: the study's variational autoencoder for galaxy stamps, plus its latent flow.

Architecture (Arcelin 2021, arXiv:2106.02465; Arcelin et al. 2021, arXiv:2005.12039):
encoder = shared trunk -> Linear(., 256) + PReLU -> mean Linear(256, L) and
std softplus(Linear(256, L)) + 1e-4; decoder = cosmolit.nn.decoder.Decoder; generation =
a masked autoregressive flow (cosmolit.models.flow.LatentFlow) fitted on encoded training
galaxies after the VAE, then decoded.

Likelihood. The network sees and produces images in the normalised space
y = asinh(x / scale_b) (CosmolitModule.normalise), which is unbounded and roughly Gaussian
in its noise. The study's sigmoid output + binary cross-entropy suits images scaled into
[0, 1]; here the decoder output is linear and the reconstruction term is a Gaussian
log-likelihood with one sigma per band, the "calibrated decoder" of the sigma-VAE (Rybkin et
al. 2021). `recon_sigma` chooses it:

    optimal  (default) sigma_b^2 = mean squared residual of band b over the batch, held fixed
             (`detach`) in the gradient: the maximum-likelihood sigma, known at every step.
    stamp    the same per stamp and band: sigma_nb^2 = mean squared residual of band b of stamp n.
             Each stamp then weighs alike (its loss is (H W / 2) log sigma_nb^2 + const), whereas
             with `optimal` the brightest galaxies of a batch set sigma_b and the residuals of the
             faint ones, the majority, barely count.
    learned  a free parameter per band. Measured on 8,000 LSST-like stamps (batch 100): Adam
             moves log sigma by about lr per step, so sigma falls from 1 towards the residual
             level over thousands of steps while the reconstruction weight 1/sigma^2 keeps
             growing; training diverged in the seventh epoch (val_loss 4e13).
    a number fixed sigma in asinh units.

    rec = sum over pixels [ (t - y_hat)^2 / (2 sigma_b^2) + log sigma_b + log(2 pi) / 2 ]
    kl  = sum over latents [ (mu^2 + s^2 - 1) / 2 - log s ]
    loss = mean over the batch of (rec + kl_weight * kl)      (kl_weight 0.01 as in the study)

The target t is the normalised clean (noiseless) stamp when the dataset has one (the VAE is
then a denoiser, as in the study), else the noisy input itself (an autoencoder); the data
module decides, the batch is (x_noisy, target).

Inputs (`inputs` hyper-parameter). `noisy` (default, the study) trains the denoiser above.
`clean` feeds the encoder the noiseless stamps too (batch (x_clean, x_clean)), an autoencoder of
noiseless galaxies, which is what a generator of galaxy images wants: a denoiser can only
reconstruct what the noise leaves of a faint galaxy, and the mean of the shapes compatible with a
noisy stamp is rounder than the galaxy. Measured on 1,000 isolated test stamps with the 30-epoch
denoiser of session 5: the median |e| of its reconstructions was 0.063 against 0.099 for the
noiseless stamps (KS 0.21), and of its flow samples 0.068 (KS 0.19), while their sizes matched
(KS 0.04 to 0.06). `clean` with `recon_sigma: stamp` (configs/vae_clean.yaml, 24 epochs at batch
32) keeps the shapes: reconstructions' shape response 0.99 to 1.03 at every S/N, generated abs(e)
KS 0.024 and size KS 0.052 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from cosmolit.backends import make_adam
from cosmolit.errors import UsageError
from cosmolit.models.base import CosmolitModule, check_network_hparams
from cosmolit.models.flow import LatentFlow
from cosmolit.nn.decoder import Decoder
from cosmolit.nn.trunk import Trunk, init_he_, make_prelu

STD_EPS = 1e-4  # added to the softplus std of q(z|x)
LOG_SIGMA_MIN = -7.0  # floor of the learned log sigma (asinh units)
# a generated stamp with a pixel beyond this in the normalised space asinh(x / scale_b) (x = 2.4e8 noise
# sigmas) is no galaxy: simulated LSST stamps stay below 8, and sinh overflows float32 at 89
MAX_DECODED_ASINH = 20.0
FLOW_LATENTS = ("sample", "mean")
RECON_SIGMAS = ("optimal", "stamp", "learned")  # or a positive number; None (older checkpoints) = learned
FITTED_SIGMAS = ("optimal", "stamp")  # computed from each batch's residual, not stored in the module
CPU_CHUNK = 32  # latents decoded at once by `generate` on CPU
VAE_INPUTS = ("noisy", "clean")  # what the encoder sees in training (see the module docstring)


@dataclass
class GalaxyVAEConfig:
    """The `model:` section of configs/vae.yaml."""

    latent_dim: int = 32
    filters: tuple[int, ...] = (32, 64, 128, 256)
    prelu: str = "element"
    kl_weight: float = 0.01
    # the measured settings (README, quality); the module's own defaults stay those of older checkpoints
    recon_sigma: Union[float, str, None] = "stamp"
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    flow_layers: int = 8
    flow_hidden: tuple[int, ...] = (256, 256)
    flow_epochs: int = 100
    flow_batch_size: int = 256
    flow_lr: float = 1e-3
    flow_latents: Literal["sample", "mean"] = "sample"
    inputs: Literal["noisy", "clean"] = "noisy"

    def __post_init__(self):
        _check_hparams(self.latent_dim, self.filters, self.prelu, self.kl_weight, self.recon_sigma, self.lr,
                       self.flow_layers, self.flow_hidden, self.flow_epochs, self.flow_batch_size, self.flow_lr,
                       self.flow_latents, self.lr_schedule, self.inputs)


def _check_hparams(latent_dim, filters, prelu, kl_weight, recon_sigma, lr, flow_layers, flow_hidden,
                   flow_epochs, flow_batch_size, flow_lr, flow_latents, lr_schedule="constant",
                   inputs="noisy") -> None:
    if latent_dim < 2:
        raise ValueError(f"latent_dim must be an integer >= 2, got {latent_dim}")
    check_network_hparams(filters, prelu, lr, lr_schedule=lr_schedule)
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    if isinstance(recon_sigma, str):
        if recon_sigma not in RECON_SIGMAS:
            raise ValueError(f"recon_sigma {recon_sigma!r} is not allowed; choose one of {', '.join(RECON_SIGMAS)} "
                             f"or a positive number")
    elif recon_sigma is not None and not (isinstance(recon_sigma, (int, float)) and recon_sigma > 0):
        raise ValueError(f"recon_sigma must be optimal, stamp, learned or a positive number, got {recon_sigma!r}")
    if not flow_lr > 0:
        raise ValueError(f"flow_lr must be > 0, got {flow_lr}")
    if flow_layers < 1 or not flow_hidden or min(flow_hidden) < 1:
        raise ValueError(f"flow_layers must be >= 1 and flow_hidden positive integers, got {flow_layers}, "
                         f"{list(flow_hidden)}")
    if flow_epochs < 1 or flow_batch_size < 1:
        raise ValueError(f"flow_epochs and flow_batch_size must be >= 1, got {flow_epochs}, {flow_batch_size}")
    if flow_latents not in FLOW_LATENTS:
        raise ValueError(f"flow_latents {flow_latents!r} is not allowed; choose one of {', '.join(FLOW_LATENTS)}")
    if inputs not in VAE_INPUTS:
        raise ValueError(f"inputs {inputs!r} is not allowed; choose one of {', '.join(VAE_INPUTS)}")


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, sigma^2) || N(0, 1) ) summed over the last axis: (B, L) -> (B,)."""
    return (0.5 * (mu.pow(2) + sigma.pow(2) - 1.0) - torch.log(sigma)).sum(-1)


def optimal_log_sigma(target: torch.Tensor, pred: torch.Tensor, per_stamp: bool = False) -> torch.Tensor:
    """Maximum-likelihood log sigma of the residual, without gradient: per band (C,) over (B, H, W),
    or with per_stamp per stamp and band (B, C) over (H, W)."""
    dims = (2, 3) if per_stamp else (0, 2, 3)
    mse = (target - pred).detach().pow(2).mean(dim=dims)  # (C,) or (B, C)
    return 0.5 * torch.log(mse.clamp(min=math.exp(2 * LOG_SIGMA_MIN)))


def gaussian_nll(target: torch.Tensor, pred: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian negative log-likelihood summed over (C, H, W); log sigma per band (C,) or
    per stamp and band (B, C)."""
    ls = log_sigma.view(-1 if log_sigma.dim() == 2 else 1, log_sigma.shape[-1], 1, 1)  # (1 or B, C, 1, 1)
    per_pixel = 0.5 * ((target - pred) * torch.exp(-ls)).pow(2) + ls + 0.5 * math.log(2 * math.pi)
    return per_pixel.flatten(1).sum(-1)  # (B,)


class GalaxyVAE(CosmolitModule):
    """VAE over raw-electron stamps (B, C, H, W); generation through a latent MAF.

    `encode(x)` -> (mu, sigma) (B, L); `decode(z)` -> images in electrons (B, C, H, W);
    `reconstruct(x)` -> decode(mu); `sample(n, generator)` -> (n, C, H, W) electrons.
    """

    def __init__(
        self,
        bands: str = "ugrizy",
        stamp: int = 64,
        normalisation: Optional[Sequence] = None,
        latent_dim: int = 32,
        filters: Sequence[int] = (32, 64, 128, 256),
        prelu: str = "element",
        kl_weight: float = 0.01,
        recon_sigma: Union[float, str, None] = "optimal",
        lr: float = 1e-3,
        lr_schedule: str = "constant",
        flow_layers: int = 8,
        flow_hidden: Sequence[int] = (256, 256),
        flow_epochs: int = 100,
        flow_batch_size: int = 256,
        flow_lr: float = 1e-3,
        flow_latents: str = "sample",
        inputs: str = "noisy",
        provenance: Optional[dict] = None,
    ):
        filters, flow_hidden = [int(f) for f in filters], [int(h) for h in flow_hidden]
        try:
            _check_hparams(latent_dim, filters, prelu, kl_weight, recon_sigma, lr, flow_layers, flow_hidden,
                           flow_epochs, flow_batch_size, flow_lr, flow_latents, lr_schedule, inputs)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        super().__init__(bands=bands, stamp=stamp, normalisation=normalisation, provenance=provenance)
        self.save_hyperparameters()
        n_bands, latent_dim = len(bands), int(latent_dim)
        self.latent_dim = latent_dim
        self.trunk = Trunk(in_channels=n_bands, stamp=int(stamp), filters=tuple(filters), prelu=prelu)
        self.hidden = init_he_(nn.Sequential(nn.Linear(self.trunk.out_features, 256), make_prelu(prelu, (256,))))
        self.to_mu = nn.Linear(256, latent_dim)
        self.to_std = nn.Linear(256, latent_dim)
        self.decoder = Decoder(latent_dim, n_bands, int(stamp), tuple(reversed(filters)), prelu)
        self.recon_sigma = "learned" if recon_sigma is None else recon_sigma
        if self.recon_sigma == "learned":  # one per band
            self.log_sigma = nn.Parameter(torch.zeros(n_bands))
        elif self.recon_sigma not in FITTED_SIGMAS:
            self.register_buffer("log_sigma", torch.full((n_bands,), math.log(float(recon_sigma))))
        # Generation: the flow works on standardised latents (z - latent_loc) / latent_scale.
        self.flow = LatentFlow(latent_dim, int(flow_layers), tuple(flow_hidden))
        self.register_buffer("latent_loc", torch.zeros(latent_dim))
        self.register_buffer("latent_scale", torch.ones(latent_dim))
        self.register_buffer("flow_fitted", torch.tensor(False))

    # ------------------------------------------------------------------ networks
    def encode_normalised(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) for normalised images y (B, C, H, W): (mu (B, L), sigma (B, L))."""
        h = self.trunk(y)  # (B, F)
        h = self.hidden(h.flatten(1))  # (B, 256)
        return self.to_mu(h), F.softplus(self.to_std(h)) + STD_EPS

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) for raw-electron images x (B, C, H, W): (mu (B, L), sigma (B, L))."""
        return self.encode_normalised(self.normalise(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, L) -> images in electrons (B, C, H, W).

        Without autograd (inference, generation) this takes the fast path of `generate`.
        """
        if not torch.is_grad_enabled():
            return self.generate(z)
        return self.denormalise(self.decoder(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, C, H, W) in electrons from the posterior mean."""
        return self.reconstruct(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return self.decode(mu)

    # ------------------------------------------------------------------ loss
    def loss_terms(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Negative ELBO (weighted KL) for raw inputs x and raw targets (B, C, H, W); graph-safe."""
        mu, sigma = self.encode(x)  # (B, L)
        z = mu + sigma * torch.randn_like(mu)  # reparameterised draw, (B, L)
        pred = self.decoder(z)  # (B, C, H, W), normalised space
        target = self.normalise(target)
        if self.recon_sigma in FITTED_SIGMAS:
            log_sigma = optimal_log_sigma(target, pred, per_stamp=self.recon_sigma == "stamp")  # (C,) or (B, C)
        else:
            log_sigma = self.log_sigma.clamp(min=LOG_SIGMA_MIN)
        rec = gaussian_nll(target, pred, log_sigma).mean()
        kl = gaussian_kl(mu, sigma).mean()
        return {"loss": rec + float(self.hparams.kl_weight) * kl, "rec": rec, "kl": kl}

    @staticmethod
    def _split(batch):
        """(x, target) from a batch: the target is x itself when the batch carries none."""
        if isinstance(batch, (tuple, list)):
            x = batch[0]
            target = batch[1] if len(batch) > 1 and batch[1] is not None else x
            return x, target
        return batch, batch

    def batch_terms(self, batch) -> dict[str, torch.Tensor]:
        x, target = self._split(batch)  # (B, C, H, W) each
        return self.loss_terms(x, target)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, _ = self._split(batch)
        return self.reconstruct(x)

    def configure_optimizers(self):
        # The flow is fitted separately (fit_flow); it is not part of the VAE's optimizer.
        params = [p for name, p in self.named_parameters() if not name.startswith("flow.")]
        return self.with_lr_schedule(make_adam(params, float(self.hparams.lr), self))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample_latents(self, n: int, generator: Optional[torch.Generator] = None,
                       from_flow: bool = True) -> torch.Tensor:
        """n latents (n, L): from the fitted flow, else from the N(0, I) prior."""
        if int(n) < 1:
            raise UsageError(f"the number of samples must be >= 1, got {n}")
        device = self.latent_loc.device
        if from_flow and bool(self.flow_fitted):
            u = self.flow.sample(int(n), generator=generator)  # (n, L), standardised
            return u * self.latent_scale + self.latent_loc
        gdev = generator.device if generator is not None else device
        return torch.randn(int(n), self.latent_dim, generator=generator, device=gdev).to(device)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """Decode latents (N, L) for generation: no autograd, in chunks, NHWC convolutions on CPU.

        Same values as `decode`; on CPU chunks of 32 keep activations in cache (about 2x faster
        for n = 1000), on GPU the whole batch goes at once.
        """
        on_cpu = z.device.type == "cpu"
        chunk = int(chunk or (CPU_CHUNK if on_cpu else len(z)))
        outs = []
        for start in range(0, len(z), max(1, chunk)):
            y = self.decoder(z[start:start + chunk], channels_last=on_cpu)  # (b, C, H, W)
            outs.append(self.denormalise(y).contiguous())
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @torch.no_grad()
    def implausible(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the generated stamps (N, C, H, W) in electrons with a pixel that is not finite or
        beyond MAX_DECODED_ASINH in the normalised space: rare latents from the flow's far tail, which
        the decoder maps outside anything it was trained on (about 1 in 1,000 for the configs/vae.yaml model)."""
        y = self.normalise(images).flatten(1)  # inf stays inf, NaN stays NaN
        return ~torch.isfinite(y).all(1) | (y.abs().amax(1) > MAX_DECODED_ASINH)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, from_flow: bool = True) -> torch.Tensor:
        """n generated stamps (n, C, H, W) in electrons; reproducible with a seeded generator."""
        return self.generate(self.sample_latents(n, generator=generator, from_flow=from_flow))

    @torch.no_grad()
    def encode_loader(self, loader, latents: str = "mean", seed: int = 0, progress: bool = True) -> torch.Tensor:
        """Latents (N, L) of every image of a DataLoader: posterior means or one posterior draw each."""
        from cosmolit.progress import progress_bar

        if latents not in FLOW_LATENTS:
            raise UsageError(f"latents {latents!r} is not allowed; choose one of {', '.join(FLOW_LATENTS)}")
        device = self.latent_loc.device
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        was_training = self.training
        self.eval()
        out = []
        total = len(loader.dataset) if hasattr(loader, "dataset") else 0
        with progress_bar(total, "encoding galaxies", enabled=progress and total > 0) as advance:
            for batch in loader:
                x, _ = self._split(batch)
                mu, sigma = self.encode(x.to(device))  # (B, L)
                if latents == "sample":
                    mu = mu + sigma * torch.randn(mu.shape, generator=gen, device=device)
                out.append(mu.float().cpu())
                advance(len(x))
        self.train(was_training)
        return torch.cat(out)

    def fit_flow(self, datamodule, epochs: Optional[int] = None, seed: int = 0, batch_size: Optional[int] = None,
                 lr: Optional[float] = None, latents: Optional[str] = None, progress: bool = True) -> dict:
        """Second stage: fit the latent flow on the encoded training split (no Trainer needed).

        Returns the flow's history {'nll': [...]} (per-epoch mean NLL of standardised latents).
        """
        hp = self.hparams
        loader = datamodule.train_dataloader()
        z = self.encode_loader(loader, latents=latents or hp.flow_latents, seed=seed, progress=progress)  # (N, L)
        if len(z) < 2:
            raise UsageError(f"fitting the latent flow needs at least 2 training stamps, got {len(z)}")
        loc, scale = z.mean(0), z.std(0).clamp(min=1e-6)  # (L,) each
        history = self.flow.fit((z - loc) / scale, epochs=int(epochs or hp.flow_epochs),
                                batch_size=int(batch_size or hp.flow_batch_size), lr=float(lr or hp.flow_lr),
                                seed=seed, progress=progress)
        self.flow.eval()
        with torch.no_grad():
            self.latent_loc.copy_(loc.to(self.latent_loc))
            self.latent_scale.copy_(scale.to(self.latent_scale))
            self.flow_fitted.fill_(True)
        return history
