"""Numbers and state dicts interchangeable with the seed package pytorch-parametrizations 1.0.0."""

from __future__ import annotations

import copy

import pytest
import torch
from models import rel_err
from torch import nn
from torch.nn.utils import parametrize

from spectral_cli import SpectralParametrization, register_spectral_parametrization

seed = pytest.importorskip("pytorch_parametrizations")
from pytorch_parametrizations import SpectralParametrization as SeedParam  # noqa: E402
from pytorch_parametrizations.spectral.utils import register_spectral_parametrization as seed_register  # noqa: E402

LAYERS = {
    "Conv2d": lambda ks: nn.Conv2d(3, 6, ks, padding=1),
    "ConvTranspose2d": lambda ks: nn.ConvTranspose2d(3, 6, ks, stride=2, padding=1),
    "Conv2d_grouped": lambda ks: nn.Conv2d(4, 6, ks, padding=1, groups=2),
}
SIZES = [(3, 3), (4, 4), (5, 5), (2, 5), (3, 2), (2, 2), (6, 6), (1, 3), (7, 4), (31, 31), (24, 23)]  # last two: FFTs


def assert_same_coefficients(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The seed's numbers to float rounding: the seed takes torch.fft.rfftn, we a matrix product (measured: both
    within 1.4 eps of the float64 transform, relative to the largest coefficient); the same exact zeros (the
    imaginary parts of self-conjugate bins)."""
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours == 0, theirs == 0)
    assert rel_err(ours, theirs) <= 3 * torch.finfo(ours.dtype).eps


@pytest.mark.parametrize("unsafe", [True, False])
@pytest.mark.parametrize("ks", SIZES, ids=lambda ks: f"{ks[0]}x{ks[1]}")
@pytest.mark.parametrize("layer", list(LAYERS))
def test_same_original_and_weight(layer: str, ks: tuple[int, int], unsafe: bool) -> None:
    torch.manual_seed(0)
    conv_seed = LAYERS[layer](ks)
    conv_ours = copy.deepcopy(conv_seed)
    w0 = conv_seed.weight.detach().clone()
    # the seed package passes conv.kernel_size (a tuple); do the same
    parametrize.register_parametrization(conv_seed, "weight", SeedParam(conv_seed.kernel_size), unsafe=True)
    parametrize.register_parametrization(
        conv_ours, "weight", SpectralParametrization(conv_ours.kernel_size), unsafe=unsafe
    )
    x_seed = conv_seed.parametrizations.weight.original
    x_ours = conv_ours.parametrizations.weight.original
    assert x_ours.shape == x_seed.shape
    assert x_ours.dtype == x_seed.dtype == torch.float32
    assert_same_coefficients(x_ours, x_seed)
    assert rel_err(conv_ours.weight, conv_seed.weight) <= 1e-6
    assert rel_err(conv_seed.weight, w0) <= 1e-6  # guard: the seed itself round-trips
    # the same forward weight from arbitrary coefficients (dead imaginary coordinates included)
    with torch.no_grad():
        x_seed.copy_(torch.randn_like(x_seed))
        x_ours.copy_(x_seed)
    assert rel_err(conv_ours.weight, conv_seed.weight) <= 1e-6


@pytest.mark.parametrize("ks", [(3, 3), (4, 4)], ids=["3x3", "4x4"])
def test_same_original_float64(ks: tuple[int, int]) -> None:
    torch.manual_seed(1)
    conv_seed = nn.Conv2d(3, 4, ks).double()
    conv_ours = copy.deepcopy(conv_seed)
    seed_register(conv_seed)
    register_spectral_parametrization(conv_ours)
    assert_same_coefficients(conv_ours.parametrizations.weight.original, conv_seed.parametrizations.weight.original)
    assert rel_err(conv_ours.weight, conv_seed.weight) <= 1e-12


class Model(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, k, padding=k // 2), nn.ReLU(), nn.Conv2d(8, 8, (3, k), padding=1))
        self.dec = nn.ConvTranspose2d(8, 3, k + 1, stride=2, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


def registered_pair(k: int) -> tuple[nn.Module, nn.Module]:
    model_seed = Model(k)
    model_ours = Model(k)
    seed_register(model_seed)
    reg = register_spectral_parametrization(model_ours)
    assert reg.changed == ("enc.0", "enc.2", "dec")
    return model_seed, model_ours


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("direction", ["seed_to_ours", "ours_to_seed"])
def test_state_dicts_load_strictly_into_each_other(direction: str, k: int) -> None:
    torch.manual_seed(2)
    model_seed, model_ours = registered_pair(k)
    source, target = (model_seed, model_ours) if direction == "seed_to_ours" else (model_ours, model_seed)
    # give the source non-initial coefficients so a silent non-load would show
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith("original"):
                p.add_(0.05 * torch.randn_like(p))
    state = source.state_dict()
    assert set(state) == set(target.state_dict())
    result = target.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(target(x), source(x)) <= 1e-5
    for name in ("enc.0", "enc.2", "dec"):
        assert rel_err(target.get_submodule(name).weight, source.get_submodule(name).weight) <= 1e-6


@pytest.mark.parametrize("k", [3, 4])
def test_baked_weights_agree_after_undo(k: int) -> None:
    torch.manual_seed(3)
    model_seed, model_ours = registered_pair(k)
    model_ours.load_state_dict(model_seed.state_dict(), strict=True)
    x = torch.randn(1, 3, 8, 8)
    seed_register(model_seed, undo=True)
    register_spectral_parametrization(model_ours, undo=True)
    assert set(model_seed.state_dict()) == set(model_ours.state_dict())
    for key, value in model_seed.state_dict().items():
        assert rel_err(model_ours.state_dict()[key], value) <= 1e-6, key
    assert rel_err(model_ours(x), model_seed(x)) <= 1e-5
