"""Large kernels: the separable (FFT) method against the dense product and torch.fft, in bounded memory.

Kernels above ``DENSE_MAX_TAPS`` taps are transformed axis by axis; the dense matrices would grow as taps^2
(9.8 GB at 128x128). Registration, convert and bake pick the method by one rule, so they store the same
numbers; both methods give the numbers of the float64 transform to float rounding. Nothing here is timed
(``python -m benchmarks.kernels`` has the figures).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import rel_err, spectral
from safetensors.torch import load_file, save_file
from torch import nn

import spectral_cli
from spectral_cli import SpectralError, SpectralParametrization, register_spectral_parametrization
from spectral_cli.statedict.surgery import bake_state_dict, convert_state_dict
from spectral_cli.transform.bases import to_spatial, to_spectral
from spectral_cli.transform.kernels import DENSE_MAX_TAPS, transform_method
from spectral_cli.transform.matrices import _float64_matrices
from spectral_cli.transform.spectrum import radial_energy

BASES = ("rfft", "rdft")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]

#: odd, even, rectangular, every rank, sizes 1 in places: small enough for float64 dense references
GRID = [(2,), (5,), (16,), (17,), (3, 4), (6, 5), (1, 6), (6, 1), (2, 3, 4), (4, 4, 4), (1, 1, 5), (5, 1, 2)]

#: small to large kernels, with the two whose dense matrices would take 17 GB and 40 GB in one allocation
SIZES = [(3, 3), (7, 7), (31, 31), (51, 51), (128, 128), (4096,), (255, 255), (100_000,)]


def ids(ks: tuple[int, ...]) -> str:
    return "x".join(map(str, ks))


def test_the_rule_splits_where_documented() -> None:
    assert transform_method((22, 22)) == transform_method((8, 8, 8)) == transform_method((512,)) == "dense"
    assert transform_method((23, 23)) == transform_method((513,)) == transform_method((31, 31)) == "separable"
    assert math.prod((22, 22)) <= DENSE_MAX_TAPS < math.prod((23, 23))


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("ks", GRID, ids=ids)
def test_separable_equals_dense_values_and_gradients(ks: tuple[int, ...], basis: str) -> None:
    """Both directions, and the gradients of both (the rfft synthesis from coefficients that are not Hermitian:
    the dead imaginary parts of self-conjugate bins are ignored by both), in float64."""
    g = torch.Generator().manual_seed(len(ks) * 100 + ks[-1])
    w = torch.randn(4, 3, *ks, generator=g, dtype=torch.float64)
    x = torch.randn(to_spectral(w, ks, basis).shape, generator=g, dtype=torch.float64)  # type: ignore[arg-type]
    for transform, t in ((to_spectral, w), (to_spatial, x)):
        t.requires_grad_(True)
        dense, separable = (transform(t, ks, basis, method=m) for m in ("dense", "separable"))  # type: ignore[operator]
        assert torch.allclose(separable, dense, rtol=0, atol=1e-13), transform.__name__
        upstream = torch.randn(dense.shape, generator=g, dtype=torch.float64)
        (grad_dense,) = torch.autograd.grad(dense, t, upstream)
        (grad_separable,) = torch.autograd.grad(separable, t, upstream)
        assert torch.allclose(grad_separable, grad_dense, rtol=0, atol=1e-13), transform.__name__


@pytest.mark.parametrize("ks", [(23, 24), (600,), (9, 8, 9), (31, 31)], ids=ids)
def test_separable_rfft_is_rfftn(ks: tuple[int, ...]) -> None:
    """Above the threshold, rfft coefficients are torch.fft.rfftn's own (pytorch-parametrizations' numbers),
    the exact zeros of self-conjugate bins included."""
    w = torch.randn(3, 2, *ks)
    x = to_spectral(w, ks, "rfft")
    c = torch.fft.rfftn(w, dim=tuple(range(-len(ks), 0)), norm="ortho")
    assert torch.equal(x[0], c.real) and torch.equal(x[1], c.imag)
    spatial = torch.fft.irfftn(torch.complex(x[0], x[1]), s=ks, dim=tuple(range(-len(ks), 0)), norm="ortho")
    assert torch.equal(to_spatial(x, ks, "rfft"), spatial)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("ks", SIZES, ids=ids)
def test_round_trip_from_3x3_to_100000_taps(ks: tuple[int, ...], basis: str) -> None:
    """float32 kernels come back within 1e-6 (relative to the largest tap), and the coefficients match the
    float64 transform to float rounding."""
    kernels = max(2, 2**16 // math.prod(ks))
    w = torch.randn(kernels, *ks, generator=torch.Generator().manual_seed(3))
    x = to_spectral(w, ks, basis)  # type: ignore[arg-type]
    assert x.dtype == torch.float32
    assert rel_err(to_spatial(x, ks, basis), w) <= 1e-6  # type: ignore[arg-type]
    assert rel_err(x, to_spectral(w.double(), ks, basis)) <= 1e-6  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("basis", BASES)
def test_dtypes_and_devices_keep_their_dtype(basis: str, dtype: torch.dtype, device: str) -> None:
    ks = (40, 33)
    w = torch.randn(3, 2, *ks, device=device).to(dtype)
    x = to_spectral(w, ks, basis)  # type: ignore[arg-type]
    back = to_spatial(x, ks, basis)  # type: ignore[arg-type]
    assert x.dtype == back.dtype == dtype and x.device == w.device
    reference = to_spectral(w.cpu().double(), ks, basis)  # type: ignore[arg-type]
    eps = torch.finfo(dtype).eps
    assert rel_err(x.cpu(), reference) <= 2 * eps
    assert rel_err(back.cpu(), w.cpu()) <= 4 * eps


@pytest.mark.parametrize("layer", ["Conv1d", "Conv2d", "ConvTranspose2d", "Conv2d_depthwise", "Conv3d"])
@pytest.mark.parametrize("basis", BASES)
def test_registered_large_conv_trains_and_holds_no_matrix(layer: str, basis: str) -> None:
    """A registered large-kernel conv keeps no dense matrix, follows .to(dtype), and its weight, forward and
    gradient are those of the dense method (to float rounding)."""
    convs = {
        "Conv1d": lambda: nn.Conv1d(2, 3, 1001, padding=500),
        "Conv2d": lambda: nn.Conv2d(2, 3, 31, padding=15),
        "ConvTranspose2d": lambda: nn.ConvTranspose2d(2, 3, (24, 23)),
        "Conv2d_depthwise": lambda: nn.Conv2d(4, 4, 27, padding=13, groups=4),
        "Conv3d": lambda: nn.Conv3d(1, 2, 9, padding=4),
    }
    torch.manual_seed(0)
    conv = convs[layer]().double()
    plain = copy.deepcopy(conv)
    w0 = conv.weight.detach().clone()
    register_spectral_parametrization(conv, basis=basis)  # type: ignore[arg-type]
    p = conv.parametrizations.weight[0]
    assert isinstance(p, SpectralParametrization) and p._synthesis is None
    assert "parametrizations.weight.original" in conv.state_dict() and len(conv.state_dict()) == 2
    original = conv.parametrizations.weight.original
    dense = to_spectral(w0, p.kernel_size, basis, method="dense")  # type: ignore[arg-type]
    assert torch.allclose(original, dense, rtol=0, atol=1e-12)
    assert torch.allclose(conv.weight, w0, rtol=0, atol=1e-12)

    x = torch.randn(2, conv.in_channels, *([12] * len(p.kernel_size)), dtype=torch.float64)
    out = conv(x)
    assert torch.allclose(out, plain(x), rtol=0, atol=1e-10)
    out.square().sum().backward()
    plain(x).square().sum().backward()  # the gradient of the spatial weight
    x_ref = original.detach().clone().requires_grad_(True)
    w_ref = to_spatial(x_ref, p.kernel_size, basis, method="dense")  # type: ignore[arg-type]
    (grad_ref,) = torch.autograd.grad(w_ref, x_ref, plain.weight.grad)
    assert original.grad is not None
    assert torch.allclose(original.grad, grad_ref, rtol=1e-10, atol=1e-10)

    conv.float()
    assert conv.weight.dtype == torch.float32 and p._synthesis is None
    assert rel_err(conv.weight, w0) <= 1e-6


def test_registration_convert_and_bake_store_the_same_bits(tmp_path: Path) -> None:
    """The one rule: a registered model's state dict, spectral convert of its plain checkpoint and the library's
    convert_state_dict hold the same bits for large kernels; bake gives the weights back."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"big": nn.Conv2d(2, 3, 31, padding=15), "long": nn.Conv1d(3, 2, 1025),
                           "small": nn.Conv2d(3, 3, 3)})  # fmt: skip
    plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
    source = tmp_path / "plain.safetensors"
    save_file(plain, str(source))
    register_spectral_parametrization(model)
    registered = model.state_dict()

    converted = tmp_path / "plain.spectral.safetensors"
    result = spectral("convert", source, "-o", converted)
    assert result.exit_code == 0, result.stderr
    from_file = load_file(str(converted))
    in_memory = convert_state_dict(plain).state_dict
    assert sorted(from_file) == sorted(registered) == sorted(in_memory)
    for key, value in registered.items():
        assert torch.equal(from_file[key], value), key
        assert torch.equal(in_memory[key], value), key

    baked = tmp_path / "baked.safetensors"
    assert spectral("bake", converted, "-o", baked).exit_code == 0
    back = load_file(str(baked))
    expected = bake_state_dict(in_memory).state_dict  # it carries the records (kernel sizes)
    for key, value in plain.items():
        assert torch.equal(back[key], expected[key]), key
        assert rel_err(back[key], value) <= 1e-6, key


_MEMORY_CHILD = r"""
import json, re, sys, time
import torch
import spectral_cli.files.convert
from spectral_cli.cli import app
def status(field):
    return int(re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM back to the current RSS
try:
    app(args=sys.argv[1:], prog_name="spectral")
except SystemExit as e:
    code = e.code or 0
print(json.dumps({"code": code, "above": status("VmHWM") - before}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize(("shape", "command"), [
    ((1, 1, 128, 128), "convert"), ((1, 1, 255, 255), "convert"), ((1, 1, 100_000), "convert"),
    ((1, 1, 255, 255), "bake"), ((64, 1, 512, 512), "convert"), ((64, 1, 512, 512), "bake"),
], ids=["128x128", "255x255", "1-D 100000", "bake 255x255", "64 MB of 512x512", "bake 64 MB of 512x512"])  # fmt: skip
def test_large_kernel_files_convert_in_bounded_memory(tmp_path: Path, shape: tuple[int, ...], command: str) -> None:
    """Files whose dense method would ask 9.8 GB, 17 GB and 40 GB: under 100 MB above imports (measured in a process
    of its own, through the CLI). 64 MB of 512x512 kernels: slabs of one kernel each, and few of them in flight,
    under 150 MB (figures: docs/measurements.md)."""
    source = tmp_path / "large.safetensors"
    weight = torch.randn(*shape)
    save_file({"conv.weight": weight, "conv.bias": torch.zeros(1)}, str(source))
    if command == "bake":
        source_spectral = tmp_path / "large.spectral.safetensors"
        assert spectral("convert", source, "-o", source_spectral).exit_code == 0
        source = source_spectral
    output = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, command, str(source), "-o", str(output), "-q"],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr
    assert result["above"] < (150 if shape[0] > 1 else 100) * 10**6
    out = load_file(str(output))
    if command == "convert":
        x = out["conv.parametrizations.weight.original"]
        assert rel_err(to_spatial(x, shape[2:], "rfft"), weight) <= 1e-6
    else:
        assert rel_err(out["conv.weight"], weight) <= 1e-6


def test_inspect_profiles_a_large_kernel(tmp_path: Path) -> None:
    w = torch.ones(2, 2, 128, 128)  # all DC
    assert radial_energy(w, (128, 128), "spatial", bins=8) == [1.0] + [0.0] * 7
    x = to_spectral(torch.randn(2, 2, 64, 64), (64, 64), "rfft")
    energy = radial_energy(x, (64, 64), "rfft", bins=8)
    assert len(energy) == 8 and abs(sum(energy) - 1) < 1e-9


def test_dense_matrices_are_not_built_for_large_kernels() -> None:
    """Neither the transforms nor registration build (and cache) a large kernel's dense matrices."""
    _float64_matrices.cache_clear()
    w = torch.randn(2, 1, 40, 40)
    x = to_spectral(w, (40, 40))
    to_spatial(x, (40, 40))
    conv = nn.Conv2d(1, 2, 40)
    register_spectral_parametrization(conv)
    conv.weight.sum().backward()
    assert _float64_matrices.cache_info().currsize == 0


def test_an_unknown_method_is_refused() -> None:
    with pytest.raises(SpectralError, match="unknown method 'fft'"):
        to_spectral(torch.randn(2, 3, 3), (3, 3), method="fft")  # type: ignore[arg-type]
    assert spectral_cli.to_spectral is to_spectral


@pytest.mark.slow
def test_compiled_training_of_large_kernels_matches_eager() -> None:
    """torch.compile (inductor, one graph, no break) trains a large-kernel model as eager does: the FFTs of the
    separable method compile as the dense product does."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.ModuleDict({"lk": nn.Conv2d(4, 4, 27, padding=13, groups=4), "seq": nn.Conv1d(4, 2, 601)})
        register_spectral_parametrization(model["lk"])
        register_spectral_parametrization(model["seq"], basis="rdft")
        return model

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = build()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.m["lk"](x)  # (2, 4, 16, 40)
            return self.m["seq"](y.flatten(2).repeat(1, 1, 2)[..., :700])

    torch._dynamo.reset()
    counters.clear()
    model, eager = Net(), Net()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 4, 16, 40, generator=torch.Generator().manual_seed(1))
    out_c, out_e = compiled(x), eager(x)
    assert rel_err(out_c, out_e) <= 1e-5
    out_c.square().sum().backward()
    out_e.square().sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert rel_err(p.grad, q.grad) <= 1e-4, name
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
