"""ShapeCNN: the study's deterministic network estimating ellipticity (e1, e2) and redshift.

Trunk (cosmolit.nn.trunk) -> GaussianHead: for T targets, a mean (T,) and the Cholesky factor of
a full covariance (T, T) per galaxy, trained with the exact Gaussian negative log-likelihood
(Arcelin 2021, arXiv:2106.02465; TFP's MultivariateNormalTriL in the study). Targets are
standardised with training-set statistics, the loss is `decoupled` by default (means by squared
error, covariance by the NLL on fixed means and features; `nll` is the study's exact likelihood,
`mse` its timing runs) and the e1, e2 response is calibrated on the validation split: see
cosmolit.models.targets.

With the defaults (6 bands ugrizy, 64x64 stamps, filters 32..256, element-wise PReLU, 3 targets)
the network has 1,517,205 trainable parameters, the study's TensorFlow count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from cosmolit.errors import UsageError
from cosmolit.models.base import CosmolitModule, check_network_hparams
from cosmolit.models.targets import (CPU_CHUNK, N_SYMMETRIES, TargetTransform, check_shape_hparams, default_calibrate,
                                     monitored_metric, shape_loss, standardised_mse, transform_images)
from cosmolit.nn.gaussian import GaussianHead, covariance, head_to_gaussian
from cosmolit.nn.trunk import Trunk

DEFAULT_TARGETS = ("e1", "e2", "redshift")


def _check_hparams(targets, filters, prelu, loss, lr, calibrate, lr_schedule="constant") -> None:
    check_network_hparams(filters, prelu, lr, targets, lr_schedule)
    check_shape_hparams(targets, loss, calibrate)


@dataclass
class ShapeCNNConfig:
    """The `model:` section of a shape-CNN fit config (configs/cnn.yaml)."""

    targets: tuple[str, ...] = DEFAULT_TARGETS
    filters: tuple[int, ...] = (32, 64, 128, 256)
    prelu: str = "element"
    loss: str = "decoupled"
    lr: float = 1e-3
    lr_schedule: str = "constant"
    calibrate: Optional[tuple[str, ...]] = None  # None: e1, e2 when among the targets
    symmetrise: bool = True  # the model's own default stays False (checkpoints without the key)

    def __post_init__(self):
        if self.calibrate is None:
            self.calibrate = tuple(default_calibrate(self.targets))
        _check_hparams(self.targets, self.filters, self.prelu, self.loss, self.lr, self.calibrate, self.lr_schedule)


class ShapeCNN(CosmolitModule):
    """Raw-electron stamps (B, C, H, W) -> Gaussian over the targets: mean (B, T), scale_tril (B, T, T)."""

    def __init__(
        self,
        targets: Sequence[str] = DEFAULT_TARGETS,
        bands: str = "ugrizy",
        stamp: int = 64,
        normalisation: Optional[Sequence] = None,
        filters: Sequence[int] = (32, 64, 128, 256),
        prelu: str = "element",
        loss: str = "decoupled",
        lr: float = 1e-3,
        lr_schedule: str = "constant",
        calibrate: Optional[Sequence[str]] = None,
        target_stats: Optional[Sequence] = None,
        symmetrise: bool = False,
        provenance: Optional[dict] = None,
    ):
        targets, filters = [str(t) for t in targets], [int(f) for f in filters]
        calibrate = default_calibrate(targets) if calibrate is None else [str(t) for t in calibrate]
        try:
            _check_hparams(targets, filters, prelu, loss, lr, calibrate, lr_schedule)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        super().__init__(bands=bands, stamp=stamp, normalisation=normalisation, provenance=provenance)
        self.save_hyperparameters()
        self.n_targets = len(targets)
        self.trunk = Trunk(in_channels=len(bands), stamp=int(stamp), filters=tuple(filters), prelu=prelu)
        self.head = GaussianHead(self.trunk.out_features, self.n_targets)
        self.target_transform = TargetTransform(targets, target_stats, calibrate, symmetrise)

    def forward(self, x: torch.Tensor, calibrated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) raw electrons -> (mean (B, T), scale_tril (B, T, T)) in the targets' units:
        one pass, never symmetrised; `estimate` gives `cosmolit predict`'s numbers."""
        mean, scale_tril = self.head(self.trunk(self.normalise(x)))
        return self.target_transform.to_physical(mean, scale_tril, calibrated)

    def estimate(self, x: torch.Tensor, calibrated: bool = True) -> dict[str, torch.Tensor]:
        """Predictions for raw images x: {'mean' (B, T), 'cov' (B, T, T)}; with the `symmetrise`
        hyper-parameter, averaged over the 8 grid symmetries (cosmolit.models.targets). Always with
        BatchNorm's running statistics, whatever the module's mode (`load_from_checkpoint` returns a
        module in training mode); differentiable when autograd is on."""
        if self.training:
            self.eval()
            try:
                return self.estimate(x, calibrated)
            finally:
                self.train()
        if x.device.type == "cpu" and len(x) > CPU_CHUNK and not torch.is_grad_enabled() and not self.training:
            parts = [self.estimate(x[i:i + CPU_CHUNK], calibrated) for i in range(0, len(x), CPU_CHUNK)]
            return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        if not self.hparams.get("symmetrise", False):
            mean, scale_tril = self(x, calibrated)
            return {"mean": mean, "cov": covariance(scale_tril)}
        tt, xn = self.target_transform, self.normalise(x)
        mean, cov = 0.0, 0.0
        for g in range(N_SYMMETRIES):
            m, scale_tril = tt.to_physical(*self.head(self.trunk(transform_images(xn, g))), calibrated=False)
            sign = tt.symmetry_signs(g).to(m.dtype)  # (T,)
            mean = mean + m * sign / N_SYMMETRIES
            cov = cov + covariance(scale_tril) * sign.unsqueeze(-1) * sign / N_SYMMETRIES
        if calibrated:
            mean, cov = tt.calibrate_moments(mean, cov)
        return {"mean": mean, "cov": cov}

    @property
    def monitor(self) -> str:
        return monitored_metric(self.hparams.loss)

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'loss', 'mse'} for raw images x (B, C, H, W) and physical targets y (B, T), in standardised
        units: the training loss and the squared error of the means (no gradient)."""
        h = self.trunk(self.normalise(x))  # (B, F)
        mean, scale_tril = self.head(h)  # (B, T), (B, T, T)
        fixed = None
        if self.hparams.loss == "decoupled":
            _, fixed = head_to_gaussian(self.head.linear(h.detach()), self.n_targets)
        y = self.target_transform.standardise(y)
        return {"loss": shape_loss(self.hparams.loss, y, mean, scale_tril, fixed).mean(),
                "mse": standardised_mse(y, mean)}

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar training loss (see loss_terms)."""
        return self.loss_terms(x, y)["loss"]

    def batch_terms(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch  # (B, C, H, W), (B, T)
        return self.loss_terms(x, y)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.estimate(x)  # mean (B, T), cov (B, T, T)
