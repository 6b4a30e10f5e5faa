"""Real architectures with random weights (nothing downloaded): registration and state-dict surgery.

For every model: the function it computes is the same before registering, after
``register_spectral_parametrization`` and after undo; and the pure surgery path (``convert_state_dict`` on the
plain state dict) loads strictly into a freshly built, registered model of the same class and computes the same
function as the original plain model. ``bake_state_dict`` of that brings back a plain state dict.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from spectral_cli import bake_state_dict, convert_state_dict, register_spectral_parametrization
from spectral_cli.parametrization import CONV_TYPES

# compressai's import calls torch.jit.script, which torch 2.14 deprecates
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated:FutureWarning")]

TOL = 1e-5


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None)


def convnext_atto() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", pretrained=False)


def bmshj2018_factorized() -> nn.Module:
    from compressai.models import FactorizedPrior

    return FactorizedPrior(N=32, M=48)  # the quality-1 zoo model is FactorizedPrior(128, 192): same layers


def cheng2020_anchor() -> nn.Module:
    from compressai.models import Cheng2020Anchor

    return Cheng2020Anchor(N=32)  # the quality-1 zoo model is Cheng2020Anchor(128): same layers


def bmshj2018_factorized_zoo() -> nn.Module:
    from compressai.zoo import bmshj2018_factorized

    return bmshj2018_factorized(quality=1, pretrained=False)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": resnet18,
    "convnext_atto": convnext_atto,
    "bmshj2018_factorized": bmshj2018_factorized,
    "cheng2020_anchor": cheng2020_anchor,
    "bmshj2018_factorized_zoo": bmshj2018_factorized_zoo,
}
COMPRESSAI = ("bmshj2018_factorized", "cheng2020_anchor", "bmshj2018_factorized_zoo")
SMALL = ("resnet18", "convnext_atto", "bmshj2018_factorized", "cheng2020_anchor")


@functools.cache
def _pristine(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    if name in COMPRESSAI:
        # fill the entropy coders' tables (_quantized_cdf, _offset, _cdf_length, scale_table): they must pass
        # through surgery and strict loading untouched
        model.update(force=True)  # type: ignore[operator]
    return model


def build(name: str, seed: int) -> nn.Module:
    """A newly built model (a copy of one built once per name and seed, never registered nor loaded into)."""
    return copy.deepcopy(_pristine(name, seed))


def image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def run(model: nn.Module) -> list[torch.Tensor]:
    """Everything the model computes from one image (eval mode: deterministic)."""
    with torch.no_grad():
        out = model(image())
    if isinstance(out, dict):  # CompressAI: x_hat and every likelihood
        return [out["x_hat"], *(out["likelihoods"][k] for k in sorted(out["likelihoods"]))]
    return [out]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        scale = w.abs().max().item()
        err = (g - w).abs().max().item() / (scale if scale > 0 else 1.0)
        assert err <= TOL, err


def assert_different(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Guards the tests above against a fresh model that happens to compute the reference already."""
    assert any(not torch.allclose(g, w, rtol=1e-3, atol=1e-6) for g, w in zip(got, want, strict=True))


def multi_tap_convs(model: nn.Module) -> set[str]:
    """Conv layers the library must convert: more than one tap, and not masked (MaskedConv2d is skipped)."""
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, CONV_TYPES)
        and torch.Size(m.kernel_size).numel() > 1  # type: ignore[arg-type]
        and not hasattr(m, "mask")
    }


def plain_reference(name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    model = build(name, seed=0)
    # CompressAI's MaskedConv2d (cheng2020 context model) multiplies its weight by the mask in place on the
    # first forward; run once so the plain weights are the masked ones the model actually uses.
    reference = run(model)
    assert_same(run(model), reference)
    return model, reference


@pytest.mark.parametrize("basis", ["rfft", "rdft"])
@pytest.mark.parametrize("name", SMALL)
def test_register_and_undo_keep_outputs(name: str, basis: str) -> None:
    model, reference = plain_reference(name)
    convs = multi_tap_convs(model)
    assert convs

    registration = register_spectral_parametrization(model, basis=basis)
    assert set(registration.changed) == convs
    assert all(reason == "1x1 kernel" or reason.startswith("masked conv") for _, reason in registration.skipped)
    assert_same(run(model), reference)

    undone = register_spectral_parametrization(model, undo=True)
    assert set(undone.changed) == convs
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert_same(run(model), reference)
    assert "parametrizations" not in " ".join(model.state_dict())


@pytest.mark.parametrize(
    ("name", "basis"),
    [(name, basis) for name in SMALL for basis in ("rfft", "rdft")] + [("bmshj2018_factorized_zoo", "rfft")],
)
def test_surgery_loads_strictly_into_fresh_model(name: str, basis: str) -> None:
    model, reference = plain_reference(name)
    sd = model.state_dict()
    keys = list(sd)

    converted = convert_state_dict(sd, basis=basis)
    assert {c.name for c in converted.changed} == multi_tap_convs(model)
    assert all(c.max_error <= 1e-6 for c in converted.changed)

    fresh = build(name, seed=1)
    assert_different(run(fresh), reference)
    register_spectral_parametrization(fresh, basis=basis)
    assert set(converted.state_dict) == set(fresh.state_dict())
    fresh.load_state_dict(converted.state_dict, strict=True)
    assert_same(run(fresh), reference)
    # everything was loaded: the spectral tensors as the surgery computed them, and every other entry
    # (CompressAI's entropy-coder tables included) as it was
    stored = fresh.state_dict()
    for key, value in converted.state_dict.items():
        assert torch.equal(stored[key], value), key

    baked = bake_state_dict(converted.state_dict)
    assert list(baked.state_dict) == keys
    plain = build(name, seed=2)
    plain.load_state_dict(baked.state_dict, strict=True)
    assert_same(run(plain), reference)
    assert list(model.state_dict()) == keys


def test_masked_conv_stays_causal_after_registration() -> None:
    from compressai.layers import MaskedConv2d

    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 5, padding=2, mask_type="A")
    registration = register_spectral_parametrization(conv)
    assert registration.changed == ()
    assert registration.skipped[0][1].startswith("masked conv")
    x = torch.randn(1, 2, 9, 9)
    future = x.clone()
    future[..., 4, 4:] += 1.0  # the current position and the rest of its row
    future[..., 5:, :] += 1.0  # every later row
    with torch.no_grad():
        torch.testing.assert_close(conv(x)[..., 4, 4], conv(future)[..., 4, 4], rtol=0, atol=1e-6)


def test_masked_conv_is_skipped_by_state_dict_surgery() -> None:
    from compressai.layers import MaskedConv2d

    net = torch.nn.Sequential(MaskedConv2d(2, 3, 5, padding=2), torch.nn.Conv2d(3, 3, 3))
    result = convert_state_dict(net.state_dict())
    assert [c.source_key for c in result.changed] == ["1.weight"]
    assert [(s.key, s.reason.split(" (")[0]) for s in result.skipped] == [("0.weight", "masked conv")]
    registered = torch.nn.Sequential(MaskedConv2d(2, 3, 5, padding=2), torch.nn.Conv2d(3, 3, 3))
    register_spectral_parametrization(registered)
    registered.load_state_dict(result.state_dict, strict=True)
