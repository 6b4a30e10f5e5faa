"""A LightningModule for the ecosystem tests (importable by name: Lightning pickles its class path)."""

from __future__ import annotations

from typing import Any

import lightning
import torch
from torch import nn


class LitConv(lightning.LightningModule):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(3, config.channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(config.channels, 3, 3, padding=1))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        (x,) = batch
        return self(x).square().mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.config.lr)
