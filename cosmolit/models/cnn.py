"""ShapeCNN: the study's deterministic network estimating ellipticity (e1, e2) and redshift.

Trunk (cosmolit.nn.trunk) -> GaussianHead: for T targets, a mean (T,) and the Cholesky factor of
a full covariance (T, T) per galaxy, trained with the exact Gaussian negative log-likelihood
(Arcelin 2021, arXiv:2106.02465; TFP's MultivariateNormalTriL in the study). loss="mse" trains the
means only with a mean squared error, as the study's timing runs.

With the defaults (6 bands ugrizy, 64x64 stamps, filters 32..256, element-wise PReLU, 3 targets)
the network has 1,517,205 trainable parameters, the study's TensorFlow count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from cosmolit.backends import mark_loss
from cosmolit.errors import UsageError
from cosmolit.models.base import CosmolitModule, check_network_hparams
from cosmolit.nn.gaussian import GaussianHead, covariance, gaussian_nll
from cosmolit.nn.trunk import Trunk

DEFAULT_TARGETS = ("e1", "e2", "redshift")
LOSSES = ("nll", "mse")


def _check_hparams(targets, filters, prelu, loss, lr) -> None:
    check_network_hparams(filters, prelu, lr, targets)
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not allowed; choose one of {', '.join(LOSSES)}")


@dataclass
class ShapeCNNConfig:
    """The `model:` section of a shape-CNN fit config (configs/cnn.yaml)."""

    targets: tuple[str, ...] = DEFAULT_TARGETS
    filters: tuple[int, ...] = (32, 64, 128, 256)
    prelu: str = "element"
    loss: str = "nll"
    lr: float = 1e-3

    def __post_init__(self):
        _check_hparams(self.targets, self.filters, self.prelu, self.loss, self.lr)


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
        loss: str = "nll",
        lr: float = 1e-3,
        provenance: Optional[dict] = None,
    ):
        targets, filters = [str(t) for t in targets], [int(f) for f in filters]
        try:
            _check_hparams(targets, filters, prelu, loss, lr)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        super().__init__(bands=bands, stamp=stamp, normalisation=normalisation, provenance=provenance)
        self.save_hyperparameters()
        self.n_targets = len(targets)
        self.trunk = Trunk(in_channels=len(bands), stamp=int(stamp), filters=tuple(filters), prelu=prelu)
        self.head = GaussianHead(self.trunk.out_features, self.n_targets)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) raw electrons -> (mean (B, T), scale_tril (B, T, T))."""
        return self.head(self.trunk(self.normalise(x)))

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar loss for raw images x (B, C, H, W) and targets y (B, T): mean NLL, or MSE of the means."""
        mean, scale_tril = self(x)  # (B, T), (B, T, T)
        if self.hparams.loss == "mse":
            return ((mean - y) ** 2).mean()
        return gaussian_nll(y, mean, scale_tril).mean()

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, C, H, W), (B, T)
        return self.step_output("train", mark_loss(self, self.compute_loss(x, y)))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return self.step_output("val", self.compute_loss(x, y))

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        mean, scale_tril = self(x)
        return {"mean": mean, "cov": covariance(scale_tril)}  # (B, T), (B, T, T)
