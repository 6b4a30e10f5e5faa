"""Regenerate the sample checkpoints of this folder, byte for byte.

    python sample_models/make_samples.py            # writes next to this file
    python sample_models/make_samples.py OUT_DIR    # writes into OUT_DIR

Every model is built from a fixed seed and saved with ``torch.save`` into a file object (or safetensors'
``save``), both of which produce the same bytes on every run. The model classes live here (not in the
package) so that tests can build the registered models the samples belong to: import this file by its path.
No CompressAI is needed: :class:`GDN` is a minimal generalized divisive normalization with ``beta`` and
``gamma`` parameters.
"""

from __future__ import annotations

import io
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent

#: channel counts of the Balle-style autoencoder samples
N, M = 16, 8


class GDN(nn.Module):
    """Generalized divisive normalization (Balle et al. 2016): ``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)``.

    ``inverse=True`` multiplies instead of dividing (the synthesis transform's IGDN).
    """

    def __init__(self, channels: int, inverse: bool = False) -> None:
        super().__init__()
        self.inverse = inverse
        self.beta = nn.Parameter(torch.ones(channels) + 0.1 * torch.rand(channels))
        self.gamma = nn.Parameter(0.1 * torch.eye(channels) + 0.01 * torch.rand(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.abs().reshape(*self.gamma.shape, 1, 1)
        norm = torch.sqrt(nn.functional.conv2d(x * x, gamma, self.beta.abs()))
        return x * norm if self.inverse else x / norm


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 5, stride=2, padding=2)


def _deconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1)


class BalleAutoencoder(nn.Module):
    """Analysis ``g_a``: (Conv2d 5x5 stride 2 + GDN) x3, Conv2d 5x5; synthesis ``g_s``: the mirror image."""

    def __init__(self, n: int = N, m: int = M) -> None:
        super().__init__()
        self.g_a = nn.Sequential(
            _conv(3, n), GDN(n), _conv(n, n), GDN(n), _conv(n, n), GDN(n), _conv(n, m)
        )  # fmt: skip
        self.g_s = nn.Sequential(
            _deconv(m, n),
            GDN(n, inverse=True),
            _deconv(n, n),
            GDN(n, inverse=True),
            _deconv(n, n),
            GDN(n, inverse=True),
            _deconv(n, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g_s(self.g_a(x))


class Conv1dNet(nn.Module):
    """1-D convs with kernels 3, 4 (even: has a Nyquist bin) and 1 (left alone by convert)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 4, padding=2)
        self.proj = nn.Conv1d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


class Conv3dNet(nn.Module):
    """A 3x3x3 Conv3d and a ConvTranspose3d."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv3d(2, 4, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x)))


#: sample file name -> (model class, input shape for a forward pass)
MODELS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "balle": (BalleAutoencoder, (1, 3, 32, 32)),
    "conv1d": (Conv1dNet, (1, 2, 16)),
    "conv3d": (Conv3dNet, (1, 2, 8, 8, 8)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The sample model ``name`` with the weights of its sample file (same seed, same numbers)."""
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


def example_input(name: str, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(MODELS[name][1], generator=generator)


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def lightning_checkpoint(model: nn.Module) -> dict[str, Any]:
    """A PyTorch Lightning style container around ``model`` (as ``self.model``), after one Adam step."""
    torch.manual_seed(2)
    adam = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = model(example_input("balle")).square().mean()
    loss.backward()
    adam.step()
    return {
        "epoch": 7,
        "global_step": 700,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": OrderedDict(("model." + k, v) for k, v in model.state_dict().items()),
        "optimizer_states": [adam.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 1e-4, "N": N},
    }


def make_samples(out: Path) -> list[Path]:
    """Write every sample into ``out``; return their paths."""
    from spectral_cli import convert_file

    out.mkdir(parents=True, exist_ok=True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        files = _sample_bytes()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    paths = []
    for name, data in files.items():
        (out / name).write_bytes(data)
        paths.append(out / name)
    # The converted sample goes through the package itself (atomic write, read back and compared).
    spectral = out / "balle.spectral.pt"
    convert_file(out / "balle.pt", output=spectral, force=True)
    paths.append(spectral)
    return paths


def _sample_bytes() -> dict[str, bytes]:
    from safetensors.torch import save

    files: dict[str, bytes] = {}
    balle = build("balle").state_dict()
    files["balle.pt"] = torch_bytes(balle)
    files["balle.safetensors"] = save({k: v.contiguous() for k, v in balle.items()}, metadata={"format": "pt"})
    files["lightning.ckpt"] = torch_bytes(lightning_checkpoint(build("balle").train()))
    files["conv1d.pt"] = torch_bytes(build("conv1d").state_dict())
    files["conv3d.pt"] = torch_bytes(build("conv3d").state_dict())
    return files


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else HERE
    import hashlib

    for path in make_samples(out):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{digest}  {path.name} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv)
