"""The VAE decoder of the study: a latent vector -> a multi-band galaxy stamp.

Layout (Arcelin et al. 2021, arXiv:2005.12039 and arXiv:2106.02465), channels-first:

    z (B, L) -> Linear(L, 256) + PReLU -> Linear(256, 4*4*256) + PReLU -> (B, 256, 4, 4)
    -> for f in filters (256, 128, 64, 32):
           ConvTranspose2d(k3, stride 2, padding 1, output_padding 1) + PReLU   # doubles H, W
           ConvTranspose2d(k3, stride 1, padding 1) + PReLU                    # same size
    -> Conv2d(32, bands, k3, padding 1)                                         # (B, bands, 64, 64)

No output activation: the VAE works in the asinh-normalised space, which is unbounded
(see cosmolit/models/vae.py). With prelu="element" (Keras' default PReLU: one slope per
element) and the defaults (L=32, 6 bands, 64 x 64) the decoder has 3,319,942 parameters,
exactly the TensorFlow count of the study; 491,520 + 4,352 of them are PReLU slopes.
Dilation stays 1 everywhere: PopTorch cannot lower dilated transposed convolutions.
"""

from __future__ import annotations

import torch
from torch import nn

from cosmolit.errors import UsageError
from cosmolit.nn.trunk import PRELU_KINDS, init_he_, make_prelu


class Decoder(nn.Module):
    """Latent (B, latent_dim) -> image (B, out_channels, stamp, stamp), unbounded values."""

    def __init__(self, latent_dim: int = 32, out_channels: int = 6, stamp: int = 64,
                 filters=(256, 128, 64, 32), prelu: str = "element", dense: int = 256):
        super().__init__()
        filters = tuple(int(f) for f in filters)
        if latent_dim < 1 or out_channels < 1:
            raise UsageError(f"decoder needs latent_dim >= 1 and out_channels >= 1, got {latent_dim}, {out_channels}")
        if not filters or min(filters) < 1:
            raise UsageError(f"decoder filters must be positive integers, got {list(filters)}")
        base = stamp // 2 ** len(filters)
        if base < 1 or base * 2 ** len(filters) != stamp:
            raise UsageError(
                f"stamp size {stamp} is not a multiple of 2^{len(filters)} (one halving per filter block); "
                f"use a stamp divisible by {2 ** len(filters)} or fewer filters"
            )
        if prelu not in PRELU_KINDS:
            raise UsageError(f"prelu {prelu!r} is not allowed; choose one of {', '.join(PRELU_KINDS)}")
        self.latent_dim, self.out_channels, self.stamp = int(latent_dim), int(out_channels), int(stamp)
        self.base, self.first = base, filters[0]
        self.dense = nn.Sequential(
            nn.Linear(latent_dim, dense), make_prelu(prelu, (dense,)),
            nn.Linear(dense, base * base * filters[0]), make_prelu(prelu, (base * base * filters[0],)),
        )
        blocks = []
        c_in, size = filters[0], base
        for f in filters:
            size *= 2
            blocks += [
                nn.ConvTranspose2d(c_in, f, 3, stride=2, padding=1, output_padding=1), make_prelu(prelu, (f, size, size)),
                nn.ConvTranspose2d(f, f, 3, stride=1, padding=1), make_prelu(prelu, (f, size, size)),
            ]
            c_in = f
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c_in, out_channels, 3, padding=1)
        init_he_(self.dense)
        init_he_(self.blocks)  # the head keeps torch's default (small outputs at the start)

    def forward(self, z: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """z (B, L) -> (B, C, stamp, stamp). channels_last=True runs the convolutions in NHWC memory
        layout (same values; about 2x faster on CPU with oneDNN); keep False in compiled (IPU) steps."""
        h = self.dense(z)  # (B, base*base*F0)
        h = h.view(z.shape[0], self.first, self.base, self.base)  # (B, F0, base, base)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.blocks(h)  # (B, F_last, stamp, stamp)
        return self.head(h)  # (B, C, stamp, stamp)
