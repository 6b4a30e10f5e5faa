"""State-dict surgery: convert, bake, describe, records.

References are independent of ``spectral_cli.statedict.surgery``: ``torch.nn.utils.parametrize`` itself (through
``register_spectral_parametrization``) and ``torch.fft`` directly. Checkpoints of other libraries' layouts (the
seed package, CompressAI) are in ``tests/test_interop.py``.
"""

from __future__ import annotations

import copy
import io
import math
from collections import OrderedDict

import pytest
import torch
from models import assert_close_rel
from torch import nn

from spectral_cli import (
    AmbiguousKernelSizeError,
    SpectralError,
    bake_state_dict,
    convert_state_dict,
    describe_state_dict,
    register_spectral_parametrization,
)
from spectral_cli.statedict.keys import infer_kernel_size
from spectral_cli.statedict.records import METADATA_KEY, LayerRecord
from spectral_cli.statedict.surgery import records_of

BASES = ("rfft", "rdft")
SUFFIX = "parametrizations.weight.original"


class Mixed(nn.Module):
    """Conv1d/2d/3d, transposed, grouped, depthwise (non-square), 1x1, bias-free, Linear and BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 5, padding=2)
        self.t1 = nn.ConvTranspose1d(4, 2, 4, stride=2)
        self.c2 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False)
        self.dw = nn.Conv2d(6, 6, (3, 5), padding=(1, 2), groups=6)
        self.pw = nn.Conv2d(6, 8, 1)
        self.t2 = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.c3 = nn.Conv3d(2, 3, (2, 3, 3))
        self.t3 = nn.ConvTranspose3d(3, 2, 3, groups=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y1 = self.t1(torch.relu(self.c1(x1)))
        y2 = self.bn(self.c2(x2))
        y2 = self.t2(self.pw(self.dw(self.grouped(y2))))
        y2 = self.fc(y2.mean(dim=(-2, -1)))
        y3 = self.t3(self.c3(x3))
        return y1, y2, y3


CONV_NAMES = ("c1", "t1", "c2", "grouped", "dw", "t2", "c3", "t3")


def make_mixed(seed: int = 0, dtype: torch.dtype = torch.float32) -> Mixed:
    torch.manual_seed(seed)
    model = Mixed()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.normal_()
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.to(dtype).eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 3, 16, generator=g),
        torch.randn(1, 3, 16, 16, generator=g),
        torch.randn(1, 2, 4, 6, 6, generator=g),
    )


def outputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(*inputs())


def assert_same_outputs(model: nn.Module, reference: tuple[torch.Tensor, ...], tol: float = 1e-5) -> None:
    for got, want in zip(outputs(model), reference, strict=True):
        assert_close_rel(got, want, tol)


def snapshot(sd: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v.clone()) for k, v in sd.items())


def assert_unchanged(sd: dict[str, torch.Tensor], before: OrderedDict[str, torch.Tensor]) -> None:
    assert list(sd) == list(before)
    for k, v in before.items():
        assert sd[k].dtype == v.dtype
        assert torch.equal(sd[k], v), k


# --------------------------------------------------------------------------------------------------------------
# convert


@pytest.mark.parametrize("basis", BASES)
def test_convert_matches_parametrize_and_loads_strictly(basis: str) -> None:
    model = make_mixed()
    reference = outputs(model)
    sd = model.state_dict()
    before = snapshot(sd)

    result = convert_state_dict(sd, basis=basis)

    registered = copy.deepcopy(model)
    registration = register_spectral_parametrization(registered, basis=basis)
    expected = registered.state_dict()
    # same keys as the registered model, and the values parametrize itself stores
    assert set(result.state_dict) == set(expected)
    for key, value in expected.items():
        got = result.state_dict[key]
        assert got.dtype == value.dtype, key
        assert got.shape == value.shape, key
        if not torch.equal(got, value):
            assert_close_rel(got, value, 1e-6)
    # the layers changed and skipped agree with the registrar
    assert sorted(c.name for c in result.changed) == sorted(registration.changed)
    assert sorted(c.name for c in result.changed) == sorted(CONV_NAMES)
    assert [(s.key, s.reason) for s in result.skipped] == [(f"{n}.weight", r) for n, r in registration.skipped]
    assert [(s.key, s.reason) for s in result.skipped] == [("pw.weight", "1x1 kernel")]

    # a fresh model with other weights, registered, takes the converted dict strictly and computes the same
    fresh = make_mixed(seed=123)
    register_spectral_parametrization(fresh, basis=basis)
    fresh.load_state_dict(result.state_dict, strict=True)
    assert_same_outputs(fresh, reference)

    assert_unchanged(sd, before)


@pytest.mark.parametrize("basis", BASES)
def test_convert_values_against_fft(basis: str) -> None:
    """Independent of parametrize: rfft is torch.fft.rfftn's half spectrum; rdft is orthonormal with DC first."""
    model = make_mixed()
    sd = model.state_dict()
    out = convert_state_dict(sd, basis=basis).state_dict
    for name in CONV_NAMES:
        w = sd[f"{name}.weight"].double()
        ks = tuple(w.shape[2:])
        dims = tuple(range(-len(ks), 0))
        x = out[f"{name}.{SUFFIX}"].double()
        if basis == "rfft":
            c = torch.fft.rfftn(w, s=ks, dim=dims, norm="ortho")
            assert_close_rel(x, torch.stack((c.real, c.imag)), 1e-6)
        else:
            assert x.shape == w.shape
            # Parseval per kernel, and the DC coefficient is the kernel's sum over sqrt(n)
            flat_w, flat_x = w.flatten(2), x.flatten(2)
            assert_close_rel(flat_x.norm(dim=-1), flat_w.norm(dim=-1), 1e-6)
            dc = w.sum(dim=dims) / math.sqrt(math.prod(ks))
            assert_close_rel(flat_x[..., 0], dc, 1e-6)


@pytest.mark.parametrize("basis", BASES)
def test_layer_change_fields(basis: str) -> None:
    model = make_mixed()
    sd = model.state_dict()
    result = convert_state_dict(sd, basis=basis)
    modules = dict(model.named_modules())
    assert len(result.changed) == len(CONV_NAMES)
    for change in result.changed:
        weight = sd[f"{change.name}.weight"]
        ks = tuple(modules[change.name].kernel_size)
        if basis == "rfft":
            stored_shape = (2, *weight.shape[:-1], ks[-1] // 2 + 1)
        else:
            stored_shape = tuple(weight.shape)
        assert change.source_key == f"{change.name}.weight"
        assert change.target_key == f"{change.name}.{SUFFIX}"
        assert change.basis == basis
        assert change.kernel_size == ks
        assert change.shape_before == tuple(weight.shape)
        assert change.shape_after == stored_shape == tuple(result.state_dict[change.target_key].shape)
        assert change.dtype == "float32"
        assert change.params_before == weight.numel()
        assert change.params_after == math.prod(stored_shape)
        assert 0.0 <= change.max_error <= 1e-6
        assert change.inferred is False
        assert result.records[change.target_key] == LayerRecord(basis, ks, "float32")
    assert set(result.records) == {c.target_key for c in result.changed}


def test_convert_root_module_and_bias_free() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    result = convert_state_dict(conv.state_dict())
    assert list(result.state_dict) == [SUFFIX]
    assert result.changed[0].name == ""
    fresh = nn.Conv2d(3, 4, 3, bias=False)
    register_spectral_parametrization(fresh)
    fresh.load_state_dict(result.state_dict, strict=True)
    assert_close_rel(fresh.weight, conv.weight, 1e-6)


@pytest.mark.parametrize("basis", BASES)
def test_include_exclude(basis: str) -> None:
    model = make_mixed()
    reference = outputs(model)
    sd = model.state_dict()
    exclude = ["c2", "t*"]
    result = convert_state_dict(sd, basis=basis, exclude=exclude)
    reasons = {s.key: s.reason for s in result.skipped}
    assert reasons == {
        "c2.weight": "excluded",
        "t1.weight": "excluded",
        "t2.weight": "excluded",
        "t3.weight": "excluded",
        "pw.weight": "1x1 kernel",
    }
    assert sorted(c.name for c in result.changed) == ["c1", "c3", "dw", "grouped"]
    for name in ("c2", "t1", "t2", "t3"):
        assert torch.equal(result.state_dict[f"{name}.weight"], sd[f"{name}.weight"])

    fresh = make_mixed(seed=7)
    registration = register_spectral_parametrization(fresh, basis=basis, exclude=exclude)
    assert sorted(registration.changed) == sorted(c.name for c in result.changed)
    fresh.load_state_dict(result.state_dict, strict=True)
    assert_same_outputs(fresh, reference)

    only = convert_state_dict(sd, basis=basis, include="c*")
    assert sorted(c.name for c in only.changed) == ["c1", "c2", "c3"]
    assert {s.key for s in only.skipped if s.reason == "excluded"} == {
        f"{n}.weight" for n in ("t1", "grouped", "dw", "pw", "t2", "t3")
    }


# --------------------------------------------------------------------------------------------------------------
# bake


@pytest.mark.parametrize("basis", BASES)
def test_bake_inverts_convert(basis: str) -> None:
    model = make_mixed()
    reference = outputs(model)
    sd = model.state_dict()
    converted = convert_state_dict(sd, basis=basis)
    before = snapshot(converted.state_dict)

    baked = bake_state_dict(converted.state_dict)

    assert list(baked.state_dict) == list(sd)
    for key, value in sd.items():
        assert baked.state_dict[key].dtype == value.dtype, key
        assert_close_rel(baked.state_dict[key], value, 1e-6)
    assert sorted(c.name for c in baked.changed) == sorted(CONV_NAMES)
    for change in baked.changed:
        assert change.source_key == f"{change.name}.{SUFFIX}"
        assert change.target_key == f"{change.name}.weight"
        assert change.shape_after == tuple(sd[change.target_key].shape)
        assert change.shape_before == tuple(converted.state_dict[change.source_key].shape)
        assert change.basis == basis
        assert change.inferred is False
        assert change.max_error <= 1e-6
    assert baked.skipped == ()
    # the records are gone, the module metadata torch put there is kept
    assert baked.records == {}
    assert records_of(baked.state_dict) == {}
    meta = getattr(baked.state_dict, "_metadata", {})
    assert METADATA_KEY not in meta
    assert meta.get("bn") == sd._metadata["bn"]  # type: ignore[attr-defined]

    plain = make_mixed(seed=5)
    plain.load_state_dict(baked.state_dict, strict=True)
    assert_same_outputs(plain, reference)
    assert_unchanged(converted.state_dict, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("basis", BASES)
def test_half_precision_round_trip(basis: str, dtype: torch.dtype) -> None:
    model = make_mixed(dtype=dtype)
    sd = model.state_dict()
    converted = convert_state_dict(sd, basis=basis)
    registered = copy.deepcopy(model)
    register_spectral_parametrization(registered, basis=basis)
    for change in converted.changed:
        stored = converted.state_dict[change.target_key]
        assert stored.dtype == dtype
        assert change.dtype == str(dtype).removeprefix("torch.")
        assert converted.records[change.target_key].dtype == change.dtype
        assert torch.equal(stored, registered.state_dict()[change.target_key])

    baked = bake_state_dict(converted.state_dict)
    assert list(baked.state_dict) == list(sd)
    eps = torch.finfo(dtype).eps
    for key, value in sd.items():
        assert baked.state_dict[key].dtype == value.dtype, key
        if value.is_floating_point():
            # one rounding of the coefficients to `dtype` and one of the result: a few eps of the largest tap
            assert_close_rel(baked.state_dict[key], value, 4 * eps)
    make_mixed(dtype=dtype).load_state_dict(baked.state_dict, strict=True)


@pytest.mark.parametrize("basis", BASES)
def test_convert_twice_is_convert_once(basis: str) -> None:
    sd = make_mixed().state_dict()
    once = convert_state_dict(sd, basis=basis)
    other = "rdft" if basis == "rfft" else "rfft"
    for second_basis in (basis, other):
        twice = convert_state_dict(once.state_dict, basis=second_basis)
        assert twice.changed == ()
        assert {s.key for s in twice.skipped if s.reason == "already spectral"} == {c.target_key for c in once.changed}
        assert list(twice.state_dict) == list(once.state_dict)
        for key, value in once.state_dict.items():
            assert torch.equal(twice.state_dict[key], value)
        assert records_of(twice.state_dict) == once.records
        assert twice.records == once.records


@pytest.mark.parametrize("basis", BASES)
def test_records_survive_torch_save(basis: str) -> None:
    model = make_mixed()
    reference = outputs(model)
    converted = convert_state_dict(model.state_dict(), basis=basis)
    assert records_of(converted.state_dict) == converted.records

    buffer = io.BytesIO()
    torch.save(converted.state_dict, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    assert records_of(loaded) == converted.records
    # the (3, 5) depthwise kernel cannot be read from an rfft shape: baking it needs the record
    assert converted.records[f"dw.{SUFFIX}"].kernel_size == (3, 5)
    baked = bake_state_dict(loaded)
    assert not any(c.inferred for c in baked.changed)
    plain = make_mixed(seed=9)
    plain.load_state_dict(baked.state_dict, strict=True)
    assert_same_outputs(plain, reference)

    fresh = make_mixed(seed=10)
    register_spectral_parametrization(fresh, basis=basis)
    fresh.load_state_dict(loaded, strict=True)
    assert_same_outputs(fresh, reference)


def test_plain_dict_input() -> None:
    """A state dict without torch's _metadata (a plain dict) gets its records all the same."""
    model = make_mixed()
    reference = outputs(model)
    converted = convert_state_dict(dict(model.state_dict()))
    assert records_of(converted.state_dict) == converted.records
    assert set(converted.records) == {f"{n}.{SUFFIX}" for n in CONV_NAMES}
    plain = make_mixed(seed=3)
    plain.load_state_dict(bake_state_dict(converted.state_dict).state_dict, strict=True)
    assert_same_outputs(plain, reference)


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("k", range(1, 8))
def test_infer_kernel_size_of_square_rfft_shapes(k: int, rank: int) -> None:
    ks = (k,) * rank
    spectrum = torch.fft.rfftn(torch.zeros(2, 3, *ks), s=ks, dim=tuple(range(-rank, 0)))
    shape = (2, *spectrum.shape)
    assert infer_kernel_size("m.w", shape) == ks
    assert infer_kernel_size("m.w", (3, 2, *ks), basis="rdft") == ks


def test_infer_kernel_size_refuses_one_dimensional_widths() -> None:
    # a 1-D rfft tensor's width is 2b - 2 or 2b - 1: nothing to check it against
    with pytest.raises(AmbiguousKernelSizeError, match=r"m\.w"):
        infer_kernel_size("m.w", (2, 4, 3, 3))


# --------------------------------------------------------------------------------------------------------------
# describe


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spec = nn.Conv2d(3, 4, 3)
        self.plain = nn.Conv2d(4, 4, 3)
        self.wn = nn.Conv2d(4, 4, 3)
        self.one = nn.Conv2d(4, 4, 1)
        self.orth = nn.Linear(4, 4)


@pytest.mark.parametrize("basis", BASES)
def test_describe_state_dict(basis: str) -> None:
    torch.manual_seed(0)
    zoo = Zoo()
    nn.utils.parametrizations.weight_norm(zoo.wn)
    nn.utils.parametrizations.orthogonal(zoo.orth)
    sd = convert_state_dict(zoo.state_dict(), basis=basis, include="spec").state_dict
    twin = Zoo()
    nn.utils.parametrizations.weight_norm(twin.wn)
    nn.utils.parametrizations.orthogonal(twin.orth)
    registration = register_spectral_parametrization(twin, basis=basis)
    assert registration.changed == ("spec", "plain")
    assert dict(registration.skipped) == {"wn": "weight has another parametrization", "one": "1x1 kernel"}
    register_spectral_parametrization(twin, undo=True, include="plain")
    twin.load_state_dict(sd, strict=True)

    infos = describe_state_dict(sd)
    by_name = {i.name: i for i in infos}
    assert {n: i.domain for n, i in by_name.items()} == {
        "spec": "spectral",
        "plain": "spatial",
        "wn": "weight_norm",
        "orth": "parametrized",
    }
    assert len(infos) == 4
    spec = by_name["spec"]
    assert (spec.basis, spec.kernel_size, spec.inferred) == (basis, (3, 3), False)
    assert spec.key == f"spec.{SUFFIX}"
    assert spec.shape == tuple(sd[spec.key].shape)
    assert spec.params == sd[spec.key].numel()
    assert spec.dtype == "float32"
    assert by_name["plain"].kernel_size == (3, 3)
    assert by_name["plain"].key == "plain.weight"
    assert by_name["wn"].key.startswith("wn.parametrizations.weight.original")
    assert by_name["orth"].key == f"orth.{SUFFIX}"

    assert {i.name for i in describe_state_dict(sd, include_spatial=False)} == {"spec", "wn", "orth"}


def test_describe_infers_square_rfft_without_record() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 5), nn.Conv2d(4, 4, (3, 5)))
    register_spectral_parametrization(net)
    sd = net.state_dict()
    assert records_of(sd) == {}
    infos = {i.name: i for i in describe_state_dict(sd)}
    assert (infos["0"].domain, infos["0"].basis, infos["0"].kernel_size, infos["0"].inferred) == (
        "spectral",
        "rfft",
        (5, 5),
        True,
    )
    # ambiguous width: not claimed as spectral with a guessed size
    assert infos["1"].domain == "parametrized"


# --------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("basis", BASES)
def test_half_converted_state_dict_is_refused(basis: str) -> None:
    sd = make_mixed().state_dict()
    converted = convert_state_dict(sd, basis=basis).state_dict
    half = OrderedDict(converted)
    half._metadata = converted._metadata  # type: ignore[attr-defined]
    half["c2.weight"] = sd["c2.weight"]
    with pytest.raises(SpectralError, match=r"c2\.weight"):
        convert_state_dict(half, basis=basis)
    with pytest.raises(SpectralError, match=r"c2\.weight"):
        bake_state_dict(half)


def test_unknown_basis_is_refused() -> None:
    with pytest.raises(SpectralError, match="dct"):
        convert_state_dict(make_mixed().state_dict(), basis="dct")  # type: ignore[arg-type]
