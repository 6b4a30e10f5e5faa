"""Foreign checkpoints after training, through the command line (untrained ones are in test_cli.py).

Training moves the stored coordinates away from what ``right_inverse`` gives. The dead ones (the imaginary parts
of the DC and Nyquist bins of an rfft tensor, which the inverse transform ignores) get no gradient, but a
checkpoint can still hold anything there (noise, weight averaging with another model, a foreign initialiser):
they are filled with noise here, and a baked kernel must still be exactly what the library that trained it
computes. And a file written by ``spectral convert`` loads into a model registered by
pytorch-parametrizations 1.0.0 where the layouts agree (that package also parametrizes 1x1 convs; we do not).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import assert_same_outputs, assert_same_tensors, parse_json, read, spectral
from torch import nn

seed_package = pytest.importorskip("pytorch_parametrizations")
from pytorch_parametrizations.spectral.utils import register_spectral_parametrization as seed_register  # noqa: E402


class Net(nn.Module):
    """Square, non-square, even and transposed kernels; no 1x1 conv, so both tools parametrize the same layers."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, k, padding=k // 2), nn.ReLU(), nn.Conv2d(8, 8, 4, padding=2))
        self.dec = nn.ConvTranspose2d(8, 3, 5, stride=2, padding=2, output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.relu(self.enc(x)))


def _train(model: nn.Module, steps: int = 5) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=g)
        opt.zero_grad()
        out = model(x)
        out = out["x_hat"] if isinstance(out, dict) else out
        (out**2).mean().backward()
        opt.step()


def _perturb(model: nn.Module) -> None:
    """Noise on every stored coefficient, the dead ones included."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("original", "weight_transformed")):
                noise = torch.randn(p.shape, generator=g, dtype=p.real.dtype if p.is_complex() else p.dtype)
                p.add_(0.01 * (noise if not p.is_complex() else torch.complex(noise, noise.flip(0))))


def _dead_coordinates_moved(state: dict[str, torch.Tensor], key: str) -> bool:
    """The imaginary part of the DC bin, which no inverse transform reads, was changed by training."""
    stored = state[key]
    imag = stored[1] if not stored.is_complex() else stored.imag
    return bool(imag[..., 0, 0].abs().max() > 0)


def test_bake_a_checkpoint_trained_with_pytorch_parametrizations(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = Net()
    seed_register(net)
    _train(net)
    _perturb(net)
    state = net.state_dict()
    assert _dead_coordinates_moved(state, "enc.0.parametrizations.weight.original")
    torch.save(state, tmp_path / "trained.pt")
    with torch.no_grad():
        expected = {k: v.clone() for k, v in Net().state_dict().items()}  # the plain model's keys
        for name in ("enc.0", "enc.2", "dec"):
            module = net.get_submodule(name)
            expected[f"{name}.weight"] = module.weight.clone()  # what the seed package computes
            expected[f"{name}.bias"] = module.bias.clone()

    result = spectral("bake", tmp_path / "trained.pt", "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    assert {layer["name"]: layer["kernel_size"] for layer in doc["layers"]} == {
        "enc.0": [3, 3],
        "enc.2": [4, 4],
        "dec": [5, 5],
    }
    baked = read(tmp_path / "trained.baked.pt")
    assert_same_tensors(baked, expected, ordered=False)
    plain = Net()
    plain.load_state_dict(baked, strict=True)
    assert_same_outputs(plain, net, torch.randn(1, 3, 8, 8))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # compressai scripts a function on import
def test_bake_a_trained_compressai_spectral_conv(tmp_path: Path) -> None:
    from compressai.layers import SpectralConv2d

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("a", SpectralConv2d(3, 6, 5, stride=2, padding=2))
    net.add_module("act", nn.ReLU())
    net.add_module("b", SpectralConv2d(6, 3, 4, padding=2))
    _train(net)
    _perturb(net)
    state = net.state_dict()
    assert state["a.weight_transformed"].dtype == torch.complex64
    assert _dead_coordinates_moved(state, "a.weight_transformed")
    torch.save(state, tmp_path / "trained.pt")

    result = spectral("bake", tmp_path / "trained.pt", "-o", tmp_path / "baked.pt")
    assert result.exit_code == 0, result.stderr
    baked = read(tmp_path / "baked.pt")
    with torch.no_grad():
        expected = {"a.weight": net.a.weight, "b.weight": net.b.weight, "a.bias": net.a.bias, "b.bias": net.b.bias}
    assert_same_tensors(baked, expected, ordered=False)
    plain = nn.Sequential(nn.Conv2d(3, 6, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(6, 3, 4, padding=2))
    plain.load_state_dict({k.replace("a.", "0.").replace("b.", "2."): v for k, v in baked.items()}, strict=True)
    assert_same_outputs(plain, net, torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_converted_file_loads_into_a_pytorch_parametrizations_model(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(1)
    plain = Net(k=5).eval()
    source = tmp_path / f"plain.{fmt}"
    if fmt == "pt":
        torch.save(plain.state_dict(), source)
    else:
        from safetensors.torch import save_file

        save_file(plain.state_dict(), str(source))
    result = spectral("convert", source, "-o", tmp_path / f"spectral.{fmt}")  # rfft, the seed package's layout
    assert result.exit_code == 0, result.stderr
    converted = read(tmp_path / f"spectral.{fmt}")

    torch.manual_seed(2)  # other initial weights: a silent non-load would show
    theirs = Net(k=5).eval()
    seed_register(theirs)
    missing, unexpected = theirs.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    assert_same_outputs(theirs, plain, torch.randn(2, 3, 8, 8), tol=1e-5)
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, converted[key]), key

    # and their training continues from it: one step later, baking it gives their weights
    _train(theirs, steps=1)
    torch.save(theirs.state_dict(), tmp_path / "continued.pt")
    result = spectral("bake", tmp_path / "continued.pt", "-o", tmp_path / "baked.pt")
    assert result.exit_code == 0, result.stderr
    baked = read(tmp_path / "baked.pt")
    with torch.no_grad():
        for name in ("enc.0", "enc.2", "dec"):
            assert_same_tensors({"w": baked[f"{name}.weight"]}, {"w": theirs.get_submodule(name).weight})
