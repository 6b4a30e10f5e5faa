"""spectral_cli and the libraries whose layouts it shares: the seed package pytorch-parametrizations 1.0.0 and
CompressAI's ``SpectralConv2d``.

* Numbers and state dicts: the seed's parametrization and ours store the same coefficients and compute the same
  weights; their state dicts load strictly into each other.
* Their checkpoints, untrained, through ``bake_state_dict`` and through ``spectral bake``: the kernel size inferred
  where the shape says it, asked for (``--kernel-size``) where it does not; the record-less seed layout counts as
  already spectral for convert.
* Their checkpoints after training: training moves the stored coordinates away from what ``right_inverse`` gives.
  The dead ones (the imaginary parts of the DC and Nyquist bins of an rfft tensor, which the inverse transform
  ignores) get no gradient, but a checkpoint can still hold anything there (noise, weight averaging with another
  model, a foreign initialiser): they are filled with noise here, and a baked kernel must still be exactly what the
  library that trained it computes. And a file written by ``spectral convert`` loads into a model registered by
  pytorch-parametrizations 1.0.0 where the layouts agree (that package also parametrizes 1x1 convs; we do not).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from models import (
    assert_close_rel,
    assert_same_outputs,
    assert_same_tensors,
    check_file_report_json,
    parse_json,
    read,
    rel_err,
    spectral,
)
from torch import nn
from torch.nn.utils import parametrize

from spectral_cli import (
    AmbiguousKernelSizeError,
    SpectralParametrization,
    bake_state_dict,
    convert_state_dict,
    register_spectral_parametrization,
)
from spectral_cli.statedict.surgery import records_of

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


# ---- the seed's checkpoints through bake_state_dict ---------------------------------------------------------------


def seed_net(k: int | tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, k, padding="same" if isinstance(k, int) and k % 2 else 0),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 3, k, stride=2),
        nn.Conv2d(3, 2, 1),
    )


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
def test_bake_seed_checkpoint(k: int) -> None:
    torch.manual_seed(k)
    model = seed_net(k).eval()
    seed_register(model)
    expected = {
        f"{name}.weight": m.weight.detach().clone() for name, m in model.named_modules() if name in ("0", "2", "3")
    }
    sd = model.state_dict()
    assert records_of(sd) == {}
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        reference = model(x)

    baked = bake_state_dict(sd)

    assert {c.target_key for c in baked.changed} == set(expected)
    for change in baked.changed:
        assert change.inferred is True
        assert change.basis == "rfft"
        assert change.kernel_size == ((k, k) if change.name != "3" else (1, 1))
        assert_close_rel(baked.state_dict[change.target_key], expected[change.target_key], 1e-6)
    plain = seed_net(k).eval()
    plain.load_state_dict(baked.state_dict, strict=True)
    with torch.no_grad():
        assert_close_rel(plain(x), reference, 1e-5)


@pytest.mark.parametrize("ks", [(3, 5), (5, 3), (3, 4), (5, 7)])
def test_seed_non_square_kernel_needs_kernel_size(ks: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, ks))
    seed_register(model)
    expected = model[0].weight.detach().clone()
    sd = model.state_dict()
    with pytest.raises(AmbiguousKernelSizeError, match=r"0\.parametrizations\.weight\.original"):
        bake_state_dict(sd)
    baked = bake_state_dict(sd, kernel_size=ks)
    assert baked.changed[0].kernel_size == ks
    assert baked.changed[0].inferred is False
    assert_close_rel(baked.state_dict["0.weight"], expected, 1e-6)
    nn.Sequential(nn.Conv2d(3, 4, ks)).load_state_dict(baked.state_dict, strict=True)


def test_seed_kernel_size_given_with_other_square_layers() -> None:
    """kernel_size= is for the layers it fits; the square ones are still inferred and baked, not left behind."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, (3, 5)), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 4))
    seed_register(model)
    expected = {f"{i}.weight": model[i].weight.detach().clone() for i in range(3)}
    baked = bake_state_dict(model.state_dict(), kernel_size=(3, 5))
    assert set(baked.state_dict) == {f"{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    for key, value in expected.items():
        assert_close_rel(baked.state_dict[key], value, 1e-6)
    by_name = {c.name: c for c in baked.changed}
    assert [(by_name[n].kernel_size, by_name[n].inferred) for n in "012"] == [
        ((3, 5), False),
        ((3, 3), True),
        ((4, 4), True),
    ]

    # a layer the given size does not fit and whose size cannot be inferred is named, not left behind
    model = nn.Sequential(nn.Conv2d(3, 4, (3, 5)), nn.Conv2d(4, 4, (5, 3)))
    seed_register(model)
    with pytest.raises(AmbiguousKernelSizeError, match=r"1\.parametrizations\.weight\.original"):
        bake_state_dict(model.state_dict(), kernel_size=(3, 5))


def test_seed_checkpoint_loads_into_spectral_cli_registration() -> None:
    """The rfft layout is the seed's: its state dict loads strictly into our registration, same outputs."""
    torch.manual_seed(0)
    model = seed_net(3).eval()
    seed_register(model)
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        reference = model(x)
    ours = seed_net(3).eval()
    register_spectral_parametrization(ours)
    # the seed parametrizes 1x1 kernels too; we leave them spatial
    sd = bake_state_dict(model.state_dict(), include="3").state_dict
    ours.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert_close_rel(ours(x), reference, 1e-5)


# ---- CompressAI's SpectralConv2d through bake_state_dict ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.torch.jit.script. is deprecated:FutureWarning")
def test_bake_compressai_spectral_conv() -> None:
    from compressai.layers import SpectralConv2d, SpectralConvTranspose2d

    torch.manual_seed(0)
    model = nn.Sequential(
        SpectralConv2d(3, 4, 5, padding=2),
        SpectralConvTranspose2d(4, 3, 4, stride=2, padding=1),
        SpectralConv2d(3, 2, 3),
    ).eval()
    sd = model.state_dict()
    assert sd["0.weight_transformed"].dtype == torch.complex64
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        reference = model(x)

    baked = bake_state_dict(sd)

    plain = nn.Sequential(
        nn.Conv2d(3, 4, 5, padding=2), nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1), nn.Conv2d(3, 2, 3)
    )
    assert set(baked.state_dict) == set(plain.state_dict())
    for i, ks in ((0, (5, 5)), (1, (4, 4)), (2, (3, 3))):
        weight = baked.state_dict[f"{i}.weight"]
        assert weight.dtype == torch.float32
        assert_close_rel(weight, model[i].weight.detach(), 1e-6)
        change = next(c for c in baked.changed if c.name == str(i))
        assert change.kernel_size == ks
        assert change.source_key == f"{i}.weight_transformed"
    plain.eval().load_state_dict(baked.state_dict, strict=True)
    with torch.no_grad():
        assert_close_rel(plain(x), reference, 1e-5)


@pytest.mark.parametrize("kernel", [(3, 3), (4, 4), (3, 5)])
def test_record_less_seed_checkpoint_counts_as_already_spectral(kernel: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, kernel))
    seed_register(net)
    result = convert_state_dict(net.state_dict())
    assert result.changed == ()
    assert [(s.key, s.reason) for s in result.skipped] == [("0.parametrizations.weight.original", "already spectral")]
    for key, value in net.state_dict().items():
        assert torch.equal(result.state_dict[key], value)


# ---- the seed's and CompressAI's checkpoints through the command line ----------------------------------------------


class SeedNet(nn.Module):
    def __init__(self, kernel_size: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size)
        self.head = nn.Conv2d(4, 2, 3)


def _seed_checkpoint(tmp_path: Path, kernel_size: tuple[int, int]) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pytorch-parametrizations 1.0.0 state dict, and the spatial weights its parametrization computes."""
    torch.manual_seed(0)
    net = SeedNet(kernel_size)
    seed_register(net)
    path = tmp_path / "seed.pt"
    torch.save(net.state_dict(), path)
    with torch.no_grad():
        expected = {
            "conv.bias": net.conv.bias.clone(),
            "conv.weight": net.conv.weight.clone(),
            "head.bias": net.head.bias.clone(),
            "head.weight": net.head.weight.clone(),
        }
    return path, expected


def test_bake_a_seed_package_checkpoint(tmp_path: Path) -> None:
    path, expected = _seed_checkpoint(tmp_path, (3, 3))
    result = spectral("inspect", path)
    assert result.exit_code == 0 and "inferred" in result.stdout
    result = spectral("bake", path, "-o", tmp_path / "baked.pt")
    assert result.exit_code == 0, result.stderr
    baked = read(tmp_path / "baked.pt")
    assert_same_tensors(baked, expected, ordered=False)
    SeedNet((3, 3)).load_state_dict(baked, strict=True)


def test_bake_a_seed_checkpoint_with_a_non_square_kernel_needs_the_kernel_size(tmp_path: Path) -> None:
    path, expected = _seed_checkpoint(tmp_path, (3, 5))
    out = tmp_path / "baked.pt"
    result = spectral("bake", path, "-o", out)
    assert result.exit_code == 4
    assert "--kernel-size" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    result = spectral("bake", path, "-o", out, "--kernel-size", "3x5", "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    check_file_report_json(doc, "bake")
    assert {layer["name"]: layer["kernel_size"] for layer in doc["layers"]}["conv"] == [3, 5]
    baked = read(out)
    assert_same_tensors({"conv.weight": baked["conv.weight"]}, {"conv.weight": expected["conv.weight"]})


@pytest.mark.slow
def test_bake_a_compressai_spectral_conv(tmp_path: Path) -> None:
    from compressai.layers import SpectralConv2d

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("enc", SpectralConv2d(3, 6, 5, stride=2, padding=2))
    net.add_module("act", nn.ReLU())
    net.add_module("dec", SpectralConv2d(6, 3, 3, padding=1))
    path = tmp_path / "compressai.pt"
    torch.save(net.state_dict(), path)
    assert net.state_dict()["enc.weight_transformed"].dtype == torch.complex64

    result = spectral("bake", path, "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    check_file_report_json(doc, "bake")
    assert [(layer["source_key"], layer["key"]) for layer in doc["layers"]] == [
        ("enc.weight_transformed", "enc.weight"),
        ("dec.weight_transformed", "dec.weight"),
    ]
    baked = read(tmp_path / "compressai.baked.pt")
    with torch.no_grad():
        expected = {"enc.weight": net.enc.weight, "dec.weight": net.dec.weight}
    assert_same_tensors({k: baked[k] for k in expected}, expected)
    plain = nn.Sequential()
    plain.add_module("enc", nn.Conv2d(3, 6, 5, stride=2, padding=2))
    plain.add_module("act", nn.ReLU())
    plain.add_module("dec", nn.Conv2d(6, 3, 3, padding=1))
    plain.load_state_dict(baked, strict=True)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_same_outputs(plain.eval(), net.eval(), x)


# ---- after training -----------------------------------------------------------------------------------------------


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


@pytest.mark.slow
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
