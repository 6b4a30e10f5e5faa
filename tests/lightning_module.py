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


class LitScheduled(lightning.LightningModule):
    """Plain convs, Adam and a per-step learning-rate schedule (halved every 2 steps): what a run resumes."""

    def __init__(self, channels: int = 4, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                 nn.Conv2d(channels, 3, 3, padding=1))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        (x,) = batch
        return (self(x) - x).square().mean()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class LitSpectralInit(LitScheduled):
    """:class:`LitScheduled` with its convs registered in ``__init__``."""

    def __init__(self, channels: int = 4, lr: float = 0.01) -> None:
        super().__init__(channels, lr)
        from spectral_cli import register_spectral_parametrization

        register_spectral_parametrization(self.net)


class LitSpectralConfigure(LitScheduled):
    """:class:`LitScheduled` with its convs registered in ``configure_model`` (called before the checkpoint loads)."""

    def configure_model(self) -> None:
        from spectral_cli import register_spectral_parametrization
        from spectral_cli.parametrization import spectral_parametrization_of

        if spectral_parametrization_of(self.net[0]) is None:
            register_spectral_parametrization(self.net)
