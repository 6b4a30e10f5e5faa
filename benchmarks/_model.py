"""The Ballé-style autoencoder that the training benchmarks (train_step, convergence) train."""

from __future__ import annotations

import warnings

import torch
from torch import nn


class Autoencoder(nn.Module):
    """Ballé-style analysis/synthesis transforms: ``stages`` x (conv stride 2 + GDN, the last without), mirrored
    with transposed convs and IGDN (CompressAI's ``GDN``).

    No quantization or entropy model: the benchmarks measure the optimisation of the transforms alone.
    """

    def __init__(self, channels: int, kernel: int, stages: int) -> None:
        super().__init__()
        with warnings.catch_warnings():  # CompressAI scripts a function with torch.jit on import
            warnings.simplefilter("ignore")
            from compressai.layers import GDN

        pad = kernel // 2
        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        for i in range(stages):
            enc.append(nn.Conv2d(3 if i == 0 else channels, channels, kernel, stride=2, padding=pad))
            if i < stages - 1:
                enc.append(GDN(channels))
        for i in range(stages):
            last = i == stages - 1
            dec.append(nn.ConvTranspose2d(channels, 3 if last else channels, kernel, 2, padding=pad, output_padding=1))
            if not last:
                dec.append(GDN(channels, inverse=True))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(self.encoder(x))
        return out
