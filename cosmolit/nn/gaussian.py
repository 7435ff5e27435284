"""Full-covariance Gaussian outputs: a head, its mapping from raw outputs, and the exact NLL.

The shape networks predict, for d targets (e1, e2, redshift), a mean (d,) and the lower Cholesky
factor L (d, d) of the covariance C = L L^T, as the study's TFP MultivariateNormalTriL layer
(Arcelin 2021, arXiv:2106.02465): d + d(d+1)/2 raw outputs, the diagonal of L through
softplus + 1e-5, the off-diagonal entries free.

Everything here uses static indexing and elementwise ops only: no torch.linalg.cholesky,
solve_triangular, inverse or MultivariateNormal.log_prob, which PopTorch 3.4 cannot lower.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cosmolit.errors import UsageError

DIAG_EPS = 1e-5  # added to the softplus of L's diagonal, as the study's TFP layer


def tril_size(d: int) -> int:
    """Number of entries of a d x d lower triangle (diagonal included)."""
    return d * (d + 1) // 2


def _tril_order(d: int) -> list[tuple[int, int]]:
    """(row, col) of the raw tril outputs: the d diagonal entries first, then the strict lower triangle row by row."""
    return [(i, i) for i in range(d)] + [(i, j) for i in range(d) for j in range(i)]


def head_to_gaussian(raw: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """raw (B, d + d(d+1)/2) -> (mean (B, d), scale_tril (B, d, d)), lower-triangular, diagonal > 0.

    raw[:, :d] is the mean, raw[:, d:2d] the diagonal of L before softplus, the rest the strict
    lower triangle in row order ((1,0), (2,0), (2,1), ...). Built by concatenation with constant
    zeros, so every shape is static.
    """
    d = int(dim)
    if raw.shape[-1] != d + tril_size(d):
        raise UsageError(f"raw Gaussian outputs have {raw.shape[-1]} features, expected {d + tril_size(d)} for dim {d}")
    mean = raw[:, :d]  # (B, d)
    diag = F.softplus(raw[:, d : 2 * d]) + DIAG_EPS  # (B, d)
    off = raw[:, 2 * d :]  # (B, d(d-1)/2)
    zero = raw.new_zeros(raw.shape[0], 1)  # (B, 1)
    rows = []
    k = 0
    for i in range(d):
        entries = []
        for j in range(d):
            if j < i:
                entries.append(off[:, k : k + 1])
                k += 1
            elif j == i:
                entries.append(diag[:, i : i + 1])
            else:
                entries.append(zero)
        rows.append(torch.cat(entries, dim=1))  # (B, d)
    return mean, torch.stack(rows, dim=1)  # (B, d), (B, d, d)


class GaussianHead(nn.Module):
    """features (B, in_features) -> (mean (B, dim), scale_tril (B, dim, dim)) through one Linear."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        if int(dim) < 1:
            raise UsageError(f"a Gaussian head needs dim >= 1, got {dim}")
        self.dim = int(dim)
        self.linear = nn.Linear(int(in_features), self.dim + tril_size(self.dim))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return head_to_gaussian(self.linear(h), self.dim)  # (B, d), (B, d, d)


def gaussian_nll(y: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """-log N(y | mean, L L^T) per sample (B,), for y, mean (B, d) and L = scale_tril (B, d, d).

    Solves L z = y - mean by forward substitution over the (static, small) dimension d, then
    nll = |z|^2 / 2 + sum_i log L_ii + d log(2 pi) / 2. Only the lower triangle of L is read.
    """
    d = mean.shape[-1]
    r = y - mean  # (B, d)
    z, diag = [], []
    for i in range(d):
        acc = r[:, i]  # (B,)
        for j in range(i):
            acc = acc - scale_tril[:, i, j] * z[j]
        diag.append(scale_tril[:, i, i])  # (B,)
        z.append(acc / diag[i])
    z = torch.stack(z, dim=-1)  # (B, d)
    # log|L| = sum log L_ii, from selects (aten::diagonal is not in PopTorch 3.4's list)
    log_det = torch.log(torch.stack(diag, dim=-1)).sum(-1)  # (B,)
    return 0.5 * (z * z).sum(-1) + log_det + 0.5 * d * math.log(2.0 * math.pi)


def covariance(scale_tril: torch.Tensor) -> torch.Tensor:
    """L L^T (B, d, d) from scale_tril (B, d, d)."""
    return scale_tril @ scale_tril.transpose(-1, -2)


def shape_loss(kind: str, y: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor,
               scale_tril_fixed_features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample loss (B,) in standardised units (the losses are described in cosmolit.models.targets).

    `scale_tril_fixed_features` is the covariance factor computed from detached trunk features
    (decoupled only); the means (B, T) carry the gradient of the squared error.
    """
    if kind == "nll":
        return gaussian_nll(y, mean, scale_tril)
    squared = 0.5 * ((mean - y) ** 2).sum(-1)  # (B,)
    if kind == "mse":
        return squared
    if scale_tril_fixed_features is None:
        raise ValueError("the decoupled loss needs the covariance factor computed on detached features")
    return squared + gaussian_nll(y, mean.detach(), scale_tril_fixed_features)
