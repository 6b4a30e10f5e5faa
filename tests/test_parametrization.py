"""SpectralParametrization on real conv layers, and the registrar register_spectral_parametrization."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from models import rel_err
from torch import nn
from torch.nn.utils import parametrize

from spectral_cli import Registration, SpectralError, SpectralParametrization, register_spectral_parametrization

BASES = ("rfft", "rdft")

CONV = {
    "Conv1d": (nn.Conv1d, 1),
    "Conv2d": (nn.Conv2d, 2),
    "Conv3d": (nn.Conv3d, 3),
    "ConvTranspose1d": (nn.ConvTranspose1d, 1),
    "ConvTranspose2d": (nn.ConvTranspose2d, 2),
    "ConvTranspose3d": (nn.ConvTranspose3d, 3),
}
# odd, even, rectangular per rank
SIZES = {
    1: {"odd": (3,), "even": (4,), "rect": (2,)},
    2: {"odd": (3, 3), "even": (4, 4), "rect": (2, 5)},
    3: {"odd": (3, 3, 3), "even": (2, 2, 2), "rect": (1, 2, 3)},
}
IN_CH = 4
OUT_CH = 4
GROUPS = {"plain": 1, "grouped": 2, "depthwise": IN_CH}
# every size with plain groups; grouped and depthwise each with two of them (keeps the grid cheap on 2 cores)
GROUPS_X_SIZES = [
    ("plain", "odd"),
    ("plain", "even"),
    ("plain", "rect"),
    ("grouped", "even"),
    ("grouped", "rect"),
    ("depthwise", "odd"),
    ("depthwise", "rect"),
]
SPATIAL = {1: (7,), 2: (5, 6), 3: (3, 4, 3)}


def make_conv(name: str, size: str, groups: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    cls, rank = CONV[name]
    conv = cls(IN_CH, OUT_CH, SIZES[rank][size], groups=GROUPS[groups], padding=1)
    return conv.to(dtype)


def conv_input(conv: nn.Module, batch: int = 2, dtype: torch.dtype | None = None) -> torch.Tensor:
    rank = len(conv.kernel_size)
    w = conv.weight
    return torch.randn(batch, IN_CH, *SPATIAL[rank], dtype=dtype or w.dtype, device=w.device)


def stored_shape(weight_shape: tuple[int, ...], basis: str) -> tuple[int, ...]:
    if basis == "rfft":
        return (2, *weight_shape[:-1], weight_shape[-1] // 2 + 1)
    return weight_shape


def ref_spatial(x: torch.Tensor, ks: tuple[int, ...], basis: str) -> torch.Tensor:
    """Independent float64 synthesis from torch.fft (rfft) / the per-axis packed real DFT (rdft)."""
    x = x.detach().double()
    dims = tuple(range(-len(ks), 0))
    if basis == "rfft":
        return torch.fft.irfftn(torch.complex(x[0], x[1]), s=ks, dim=dims, norm="ortho")
    # rdft: invert the packed orthonormal real DFT axis by axis (unpack, then irfft)
    out = x
    for d in dims:
        n = out.shape[d]
        half = n // 2 + 1
        shape = list(out.shape)
        shape[d] = half
        y = torch.zeros(shape, dtype=torch.complex128)
        y.narrow(d, 0, 1).copy_(out.narrow(d, 0, 1))
        for k in range(1, (n - 1) // 2 + 1):
            re = out.narrow(d, 2 * k - 1, 1) / math.sqrt(2.0)
            im = out.narrow(d, 2 * k, 1) / math.sqrt(2.0)
            y.narrow(d, k, 1).copy_(torch.complex(re, im))
        if n % 2 == 0 and n > 1:
            y.narrow(d, n // 2, 1).copy_(out.narrow(d, n - 1, 1))
        out = torch.fft.irfft(y, n=n, dim=d, norm="ortho")
    return out


def register(conv: nn.Module, basis: str, how: str) -> None:
    if how == "registrar":
        reg = register_spectral_parametrization(conv, basis=basis)
        assert reg == Registration(changed=("",), skipped=())
    else:
        p = SpectralParametrization(conv.kernel_size, basis)
        parametrize.register_parametrization(conv, "weight", p, unsafe=(how == "unsafe"))


# ----------------------------------------------------------------------------------------------------------------
# The grid: layer types x groups x sizes x bases x ways to register
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use the native CPU conv kernels: oneDNN compiles a kernel per new shape, which dominates a grid of tiny
    layers of all-different shapes. The parametrization under test does not depend on the conv backend (the
    registry tests below run with the default backend)."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


@pytest.mark.usefixtures("no_onednn")
@pytest.mark.parametrize("how", ["safe", "unsafe", "registrar"])
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize(("groups", "size"), GROUPS_X_SIZES, ids=[f"{g}-{s}" for g, s in GROUPS_X_SIZES])
@pytest.mark.parametrize("name", list(CONV))
def test_registration_grid(name: str, groups: str, size: str, basis: str, how: str) -> None:
    torch.manual_seed(0)
    conv = make_conv(name, size, groups)
    w0 = conv.weight.detach().clone()
    x = conv_input(conv, batch=1)
    y0 = conv(x)
    # the plain layer's weight gradient, for the chain-rule check below
    y0.square().sum().backward()
    g_w = conv.weight.grad.detach().double()
    y0 = y0.detach()
    # registration keeps the Parameter object (set_ to the new shape), so drop the spatial gradient first
    conv.weight.grad = None

    register(conv, basis, how)

    assert parametrize.is_parametrized(conv, "weight")
    assert isinstance(conv, CONV[name][0])
    assert parametrize.type_before_parametrizations(conv) is CONV[name][0]
    original = conv.parametrizations.weight.original
    assert isinstance(original, nn.Parameter)
    assert tuple(original.shape) == stored_shape(tuple(w0.shape), basis)
    assert original.dtype == w0.dtype
    # stored values are the reference transform of the weight: synthesizing them independently gives w0
    assert rel_err(ref_spatial(original, conv.kernel_size, basis), w0) <= 1e-6
    assert conv.weight.shape == w0.shape and conv.weight.dtype == w0.dtype
    assert rel_err(conv.weight, w0) <= 1e-6
    y1 = conv(x)
    assert rel_err(y1, y0) <= 1e-5

    # gradients flow to original, and agree with the plain layer's weight gradient through the chain rule:
    # for the linear map W = P(X), <dL/dX, dX> == <dL/dW, P(dX)> for any direction dX.
    y1.square().sum().backward()
    g = original.grad
    assert g is not None and g.shape == original.shape
    assert torch.isfinite(g).all() and g.abs().max() > 0
    d = torch.randn_like(original, dtype=torch.float64)
    lhs = (g.double() * d).sum().item()
    rhs = (g_w * ref_spatial(d, conv.kernel_size, basis)).sum().item()
    assert lhs == pytest.approx(rhs, rel=1e-4, abs=1e-5 * g_w.abs().sum().item() * d.abs().max().item())


def ref_packed_rdft(w: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Packed orthonormal real DFT from torch.fft.rfft, axis by axis: [y0, r Re y1, r Im y1, ...], r = sqrt(2)."""
    out = w.double()
    for d in range(-len(ks), 0):
        n = out.shape[d]
        y = torch.fft.rfft(out, dim=d, norm="ortho")
        parts = [y.narrow(d, 0, 1).real]
        for k in range(1, (n - 1) // 2 + 1):
            parts += [math.sqrt(2.0) * y.narrow(d, k, 1).real, math.sqrt(2.0) * y.narrow(d, k, 1).imag]
        if n % 2 == 0 and n > 1:
            parts.append(y.narrow(d, n // 2, 1).real)
        out = torch.cat(parts, dim=d)
    return out


@pytest.mark.parametrize("ks", [(3,), (4,), (4, 3), (2, 5), (1, 2, 3), (2, 2, 2)])
def test_ref_spatial_rdft_helper(ks: tuple[int, ...]) -> None:
    # guard the test helper itself: it inverts the packed DFT built from torch.fft.rfft, which the library matches
    torch.manual_seed(1)
    w = torch.randn(2, *ks, dtype=torch.float64)
    torch.testing.assert_close(ref_spatial(ref_packed_rdft(w, ks), ks, "rdft"), w, rtol=0, atol=1e-12)
    p = SpectralParametrization(ks, "rdft")
    torch.testing.assert_close(p.right_inverse(w), ref_packed_rdft(w, ks), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# cached(), stacking, dtype moves, assignment
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
def test_cached_computes_weight_once(basis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    register_spectral_parametrization(conv, basis=basis)
    p = conv.parametrizations.weight[0]
    calls = []
    inner = p.forward

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return inner(x)

    monkeypatch.setattr(p, "forward", counting)
    x = torch.randn(1, 3, 6, 6)
    with parametrize.cached():
        w1 = conv.weight
        w2 = conv.weight
        y = conv(x)
        assert w1 is w2
    assert len(calls) == 1
    # outside the context every access recomputes
    conv.weight  # noqa: B018
    conv.weight  # noqa: B018
    assert len(calls) == 3
    assert conv.weight is not conv.weight
    torch.testing.assert_close(y, nn.functional.conv2d(x, w1, conv.bias, padding=1))


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.factor


@pytest.mark.parametrize("basis", BASES)
def test_stacked_after_spectral(basis: str) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, (3, 4))
    w0 = conv.weight.detach().clone()
    register_spectral_parametrization(conv, basis=basis)
    original_before = conv.parametrizations.weight.original.detach().clone()
    parametrize.register_parametrization(conv, "weight", Scale(2.0))
    assert len(conv.parametrizations.weight) == 2
    torch.testing.assert_close(conv.parametrizations.weight.original, original_before, rtol=0, atol=0)
    assert rel_err(conv.weight, 2 * w0) <= 1e-6
    # assignment goes through both right_inverses
    w1 = torch.randn_like(w0)
    conv.weight = w1
    assert rel_err(conv.weight, w1) <= 1e-6
    assert rel_err(ref_spatial(conv.parametrizations.weight.original, (3, 4), basis), w1 / 2) <= 1e-6
    # the registrar sees it is already spectral
    reg = register_spectral_parametrization(conv, basis=basis)
    assert reg == Registration(changed=(), skipped=(("", "already spectral"),))


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda c: nn.utils.parametrizations.weight_norm(c), id="weight_norm"),
        pytest.param(lambda c: nn.utils.parametrizations.orthogonal(c), id="orthogonal"),
        pytest.param(lambda c: parametrize.register_parametrization(c, "weight", Scale(3.0)), id="scale"),
    ],
)
def test_registrar_skips_weight_with_another_parametrization(first) -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 3, 3)
    first(conv)
    weight_before = conv.weight.detach().clone()
    plist_before = list(conv.parametrizations.weight)
    reg = register_spectral_parametrization(conv)
    assert reg.changed == ()
    assert reg.skipped == (("", "weight has another parametrization"),)
    assert list(conv.parametrizations.weight) == plist_before
    torch.testing.assert_close(conv.weight, weight_before, rtol=0, atol=0)
    # a spectral parametrization stacked on top by hand counts as already spectral
    parametrize.register_parametrization(conv, "weight", SpectralParametrization(conv.kernel_size, "rdft"))
    assert isinstance(conv.parametrizations.weight[-1], SpectralParametrization)
    assert register_spectral_parametrization(conv).skipped == (("", "already spectral"),)


@pytest.mark.parametrize("basis", BASES)
def test_to_float64(basis: str) -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    plain = copy.deepcopy(conv).double()
    register_spectral_parametrization(conv, basis=basis)
    conv.to(torch.float64)
    assert conv.parametrizations.weight.original.dtype == torch.float64
    assert conv.weight.dtype == torch.float64
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = conv(x)
    assert y.dtype == torch.float64
    assert rel_err(y, plain(x)) <= 1e-6  # the weights were float32 before the move
    assert rel_err(conv.weight, ref_spatial(conv.parametrizations.weight.original, (3, 3), basis)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bfloat16"])
@pytest.mark.parametrize("basis", BASES)
def test_half_precisions(basis: str, dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    w32 = conv.weight.detach().clone()
    register_spectral_parametrization(conv, basis=basis)
    conv.half() if dtype == torch.float16 else conv.bfloat16()
    original = conv.parametrizations.weight.original
    assert original.dtype == dtype
    w = conv.weight
    assert w.dtype == dtype and w.shape == w32.shape
    u = torch.finfo(dtype).eps / 2
    tol = 2 * u * (math.sqrt(2 * 9) + 1)
    assert rel_err(w, w32) <= tol
    # the weight is the float64 synthesis of the stored half coefficients, rounded once
    assert rel_err(w, ref_spatial(original, (3, 3), basis)) <= 2 * u
    x = torch.randn(1, 3, 5, 5, dtype=dtype)
    try:
        y = conv(x)
    except RuntimeError as e:  # some CPU builds have no half conv
        pytest.skip(f"conv in {dtype} unsupported here: {e}")
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("how", ["safe", "unsafe", "registrar"])
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("name", ["Conv1d", "Conv2d", "ConvTranspose2d", "Conv3d"])
def test_assignment_sets_weight(name: str, basis: str, how: str) -> None:
    torch.manual_seed(7)
    conv = make_conv(name, "even", "plain")
    register(conv, basis, how)
    new = torch.randn_like(conv.weight)
    with torch.no_grad():
        conv.weight = new
    assert rel_err(conv.weight, new) <= 1e-6
    assert tuple(conv.parametrizations.weight.original.shape) == stored_shape(tuple(new.shape), basis)


# ----------------------------------------------------------------------------------------------------------------
# The registrar
# ----------------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2))
        self.mid = nn.Conv2d(8, 8, 1)
        self.dec = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.Conv1d(4, 4, 3))
        self.head = nn.Conv2d(4, 3, (1, 3), padding=(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dec[0](self.mid(self.enc(x)))
        h = h + self.dec[1](h.flatten(2)).mean(-1)[..., None, None]
        return self.head(h)


def snapshot(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type]]:
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    classes = {name: type(m) for name, m in module.named_modules()}
    return state, classes


def assert_unchanged(module: nn.Module, snap: tuple[dict[str, torch.Tensor], dict[str, type]]) -> None:
    state, classes = snap
    now = module.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {name: type(m) for name, m in module.named_modules()} == classes


def test_registrar_changes_and_skip_reasons() -> None:
    torch.manual_seed(8)
    net = Net()
    x = torch.randn(1, 3, 8, 8)
    y0 = net(x)
    reg = register_spectral_parametrization(net, exclude="dec.*")
    assert reg.changed == ("enc.0", "enc.2", "head")
    assert reg.skipped == (("mid", "1x1 kernel"), ("dec.0", "excluded"), ("dec.1", "excluded"))
    assert type(net.mid) is nn.Conv2d
    assert type(net.dec[0]) is nn.ConvTranspose2d
    assert parametrize.is_parametrized(net.head, "weight")
    assert rel_err(net(x), y0) <= 1e-5
    # second call: a no-op, now reporting them as already spectral
    state = {k: v.clone() for k, v in net.state_dict().items()}
    reg2 = register_spectral_parametrization(net, exclude="dec.*")
    assert reg2.changed == ()
    assert ("enc.0", "already spectral") in reg2.skipped and ("head", "already spectral") in reg2.skipped
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    # without the exclusion the rest gets registered
    reg3 = register_spectral_parametrization(net)
    assert reg3.changed == ("dec.0", "dec.1")
    assert rel_err(net(x), y0) <= 1e-5


def test_registrar_include_globs() -> None:
    net = Net()
    reg = register_spectral_parametrization(net, include=["enc.*", "head"], exclude=("enc.2",))
    assert reg.changed == ("enc.0", "head")
    assert dict(reg.skipped) == {"enc.2": "excluded", "mid": "excluded", "dec.0": "excluded", "dec.1": "excluded"}
    reg = register_spectral_parametrization(Net(), include="enc.?")
    assert reg.changed == ("enc.0", "enc.2")


def test_registrar_already_spectral_by_hand() -> None:
    net = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3))
    parametrize.register_parametrization(net[0], "weight", SpectralParametrization((3, 3), "rdft"))
    reg = register_spectral_parametrization(net)
    assert reg == Registration(changed=("1",), skipped=(("0", "already spectral"),))
    assert net[0].parametrizations.weight[0].basis == "rdft"
    assert net[1].parametrizations.weight[0].basis == "rfft"


@pytest.mark.parametrize("basis", BASES)
def test_undo_restores_plain_classes_and_bakes(basis: str) -> None:
    torch.manual_seed(9)
    net = Net()
    before = {name: type(m) for name, m in net.named_modules()}
    x = torch.randn(1, 3, 8, 8)
    y0 = net(x)
    reg = register_spectral_parametrization(net, basis=basis)
    # train a bit so the baked weight differs from the initial one
    with torch.no_grad():
        for name in reg.changed:
            net.get_submodule(name).parametrizations.weight.original.mul_(1.5)
    y1 = net(x)
    spatial = {name: net.get_submodule(name).weight.detach().clone() for name in reg.changed}
    undo = register_spectral_parametrization(net, undo=True)
    assert set(undo.changed) == set(reg.changed)
    assert {name: type(m) for name, m in net.named_modules()} == before
    assert type(net.enc[0]) is nn.Conv2d and type(net.dec[0]) is nn.ConvTranspose2d and type(net.dec[1]) is nn.Conv1d
    for name, w in spatial.items():
        m = net.get_submodule(name)
        assert not parametrize.is_parametrized(m)
        assert type(m.weight) is nn.Parameter
        assert rel_err(m.weight, w) <= 1e-6
    assert "enc.0.weight" in net.state_dict() and not any("parametrizations" in k for k in net.state_dict())
    assert rel_err(net(x), y1) <= 1e-5
    assert rel_err(y1, 1.5 * y0) > 1e-3  # the scaling did reach the output (guards the test itself)
    # undo of an undone module is a no-op
    assert register_spectral_parametrization(net, undo=True) == Registration(changed=(), skipped=())


def test_undo_respects_include() -> None:
    net = Net()
    register_spectral_parametrization(net)
    reg = register_spectral_parametrization(net, undo=True, include="enc.*")
    assert reg.changed == ("enc.0", "enc.2")
    assert ("head", "excluded") in reg.skipped
    assert type(net.enc[0]) is nn.Conv2d
    assert parametrize.is_parametrized(net.head, "weight")


@pytest.mark.parametrize("bad", [5, [1], ("enc.*", 3), [None]])
@pytest.mark.parametrize("arg", ["include", "exclude"])
@pytest.mark.parametrize("undo", [False, True])
def test_bad_glob_raises_before_mutation(bad, arg: str, undo: bool) -> None:
    net = Net()
    if undo:
        register_spectral_parametrization(net)
    snap = snapshot(net)
    with pytest.raises(SpectralError):
        register_spectral_parametrization(net, undo=undo, **{arg: bad})
    assert_unchanged(net, snap)


def test_bad_basis_and_module() -> None:
    net = Net()
    snap = snapshot(net)
    with pytest.raises(SpectralError, match="unknown basis"):
        register_spectral_parametrization(net, basis="dct")
    assert_unchanged(net, snap)
    with pytest.raises(SpectralError):
        register_spectral_parametrization(torch.randn(3))


def test_undo_with_stacked_parametrization_raises_before_mutation() -> None:
    torch.manual_seed(10)
    net = Net()
    register_spectral_parametrization(net)
    # stacked on a layer that comes after others in named_modules order, so a late check would be too late
    parametrize.register_parametrization(net.head, "weight", Scale(2.0))
    snap = snapshot(net)
    with pytest.raises(SpectralError, match="head"):
        register_spectral_parametrization(net, undo=True)
    assert_unchanged(net, snap)
    assert parametrize.is_parametrized(net.enc[0], "weight")
    # excluding the stacked one lets the rest be undone
    reg = register_spectral_parametrization(net, undo=True, exclude="head")
    assert "enc.0" in reg.changed and ("head", "excluded") in reg.skipped


@pytest.mark.parametrize("undo_on", ["copy", "original"])
@pytest.mark.parametrize("basis", BASES)
def test_deepcopy_undo_does_not_break_the_other(basis: str, undo_on: str) -> None:
    torch.manual_seed(11)
    net = Net()
    x = torch.randn(1, 3, 8, 8)
    register_spectral_parametrization(net, basis=basis)
    y = net(x)
    twin = copy.deepcopy(net)
    undone, kept = (twin, net) if undo_on == "copy" else (net, twin)
    register_spectral_parametrization(undone, undo=True)
    assert type(undone.enc[0]) is nn.Conv2d
    # the other one is still parametrized, and still computes the same function
    for name in ("enc.0", "enc.2", "dec.0", "dec.1", "head"):
        m = kept.get_submodule(name)
        assert parametrize.is_parametrized(m, "weight"), name
        assert isinstance(m.parametrizations.weight[0], SpectralParametrization)
        assert m.weight.shape == undone.get_submodule(name).weight.shape
    assert any(k.endswith("parametrizations.weight.original") for k in kept.state_dict())
    assert rel_err(kept(x), y) <= 1e-6
    assert rel_err(undone(x), y) <= 1e-5
    # and the kept one can itself be undone afterwards
    register_spectral_parametrization(kept, undo=True)
    assert type(kept.enc[0]) is nn.Conv2d
    assert rel_err(kept(x), y) <= 1e-5


def test_register_on_module_with_parametrized_bias_then_deepcopy() -> None:
    torch.manual_seed(12)
    conv = nn.Conv2d(3, 3, 3)
    parametrize.register_parametrization(conv, "bias", Scale(2.0))
    b = conv.bias.detach().clone()
    reg = register_spectral_parametrization(conv)
    assert reg.changed == ("",)
    twin = copy.deepcopy(conv)
    register_spectral_parametrization(twin, undo=True)
    assert parametrize.is_parametrized(twin, "bias") and not parametrize.is_parametrized(twin, "weight")
    assert parametrize.is_parametrized(conv, "weight")
    torch.testing.assert_close(conv.bias, b)
    x = torch.randn(1, 3, 5, 5)
    assert rel_err(twin(x), conv(x)) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# repr, optimizer
# ----------------------------------------------------------------------------------------------------------------


def test_extra_repr() -> None:
    assert repr(SpectralParametrization((3, 3))) == "SpectralParametrization()"
    assert repr(SpectralParametrization((3, 3), basis="rfft")) == "SpectralParametrization()"
    assert repr(SpectralParametrization((3, 3), basis="rdft")) == "SpectralParametrization(basis='rdft')"


def test_parametrization_validates_arguments() -> None:
    with pytest.raises(SpectralError):
        SpectralParametrization((3, 3), basis="dct")
    with pytest.raises(SpectralError):
        SpectralParametrization(3)
    with pytest.raises(SpectralError):
        SpectralParametrization((3, 3, 3, 3))
    p = SpectralParametrization([3, 2])
    assert p.kernel_size == (3, 2)


@pytest.mark.parametrize("basis", BASES)
def test_adam_step(basis: str) -> None:
    torch.manual_seed(13)
    net = Net()
    register_spectral_parametrization(net, basis=basis)
    originals = {n: p for n, p in net.named_parameters() if n.endswith("original")}
    assert len(originals) == 5
    before = {n: p.detach().clone() for n, p in originals.items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 8, 8)
    loss = net(x).square().mean()
    loss.backward()
    opt.step()
    for n, p in originals.items():
        assert not torch.equal(p, before[n]), n
        assert opt.state[p]["exp_avg"].shape == p.shape
    y = net(x)
    assert torch.isfinite(y).all()
    assert y.square().mean().item() < loss.item()


# ----------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("name", list(CONV))
def test_cuda_after_registration(name: str, basis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convs would differ from CPU by ~1e-3
    torch.manual_seed(14)
    conv = make_conv(name, "odd", "grouped")
    x = conv_input(conv)
    register_spectral_parametrization(conv, basis=basis)
    y_cpu = conv(x)
    conv.cuda()
    assert conv.parametrizations.weight.original.device.type == "cuda"
    y = conv(x.cuda())
    assert y.device.type == "cuda"
    assert rel_err(y.cpu(), y_cpu) <= 1e-5
    assert (
        rel_err(conv.weight.cpu(), ref_spatial(conv.parametrizations.weight.original.cpu(), conv.kernel_size, basis))
        <= 1e-6
    )
    y.square().sum().backward()
    assert conv.parametrizations.weight.original.grad is not None


@requires_cuda
@pytest.mark.parametrize("basis", BASES)
def test_cuda_register_on_gpu_module_and_half(basis: str) -> None:
    torch.manual_seed(15)
    conv = nn.Conv2d(4, 4, 4, padding=1).cuda()
    w0 = conv.weight.detach().clone()
    register_spectral_parametrization(conv, basis=basis)
    assert conv.parametrizations.weight.original.device.type == "cuda"
    assert rel_err(conv.weight, w0) <= 1e-6
    conv.half()
    x = torch.randn(1, 4, 6, 6, device="cuda", dtype=torch.float16)
    y = conv(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert rel_err(conv.weight, w0) <= 1e-2


@pytest.mark.parametrize("basis", ["rfft", "rdft"])
def test_zero_channel_conv_registers_and_bakes(basis: str) -> None:
    conv = nn.Conv2d(0, 4, 3)
    assert register_spectral_parametrization(conv, basis=basis).changed == ("",)
    assert conv.weight.shape == (4, 0, 3, 3)
    assert register_spectral_parametrization(conv, undo=True).changed == ("",)
    assert type(conv) is nn.Conv2d and conv.weight.shape == (4, 0, 3, 3)
