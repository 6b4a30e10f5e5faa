"""The two spectral bases against independent references (torch.fft and float64 math).

Conventions under test (see spectral_cli/transform/bases.py): one flattened kernel per row,
``spatial = spectral @ synthesis`` and ``spectral = spatial @ analysis``.
"""

from __future__ import annotations

import math

import pytest
import torch

import spectral_cli.transform.bases as bases
from spectral_cli import SpectralError
from spectral_cli.transform.bases import to_spatial, to_spectral
from spectral_cli.transform.matrices import matrices
from spectral_cli.transform.synthesis import apply_synthesis

CPU = torch.device("cpu")
BASES = ("rfft", "rdft")

SIZES_1D = [(n,) for n in range(1, 10)]
SIZES_2D_SQUARE = [(n, n) for n in range(1, 10)]
SIZES_2D_RECT = [(2, 5), (6, 3), (1, 4), (4, 1), (3, 2)]
SIZES_3D = [(3, 3, 3), (2, 4, 5), (1, 2, 3), (2, 2, 2)]
ALL_SIZES = SIZES_1D + SIZES_2D_SQUARE + SIZES_2D_RECT + SIZES_3D

# A smaller set for the grids: odd, even, rectangular and size 1 per rank.
GRID_SIZES = [(3,), (4,), (1,), (5,), (3, 3), (4, 4), (2, 5), (1, 1), (3, 3, 3), (2, 2, 2), (1, 2, 3), (1, 1, 1)]


def ids(ks: tuple[int, ...]) -> str:
    return "x".join(map(str, ks))


def kernel_dims(ks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(range(-len(ks), 0))


def rfft_shape(w_shape: tuple[int, ...], ks: tuple[int, ...]) -> tuple[int, ...]:
    return (2, *w_shape[:-1], ks[-1] // 2 + 1)


# ----------------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------------


def ref_rfft_synthesis(x: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    return torch.fft.irfftn(torch.complex(x[0], x[1]), s=ks, dim=kernel_dims(ks), norm="ortho")


def ref_rfft_analysis(w: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    c = torch.fft.rfftn(w, s=ks, dim=kernel_dims(ks), norm="ortho")
    return torch.stack((c.real, c.imag))


def ref_packed_rdft_axis(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Packed orthonormal real DFT along one axis, from torch.fft.rfft.

    Output for length n: [y0, s*Re y1, s*Im y1, s*Re y2, s*Im y2, ...(, Re y_{n/2} for even n)] with
    y = rfft(t, norm="ortho") and s = sqrt(2).
    """
    n = t.shape[dim]
    y = torch.fft.rfft(t, dim=dim, norm="ortho")
    parts = [y.narrow(dim, 0, 1).real]
    for k in range(1, (n - 1) // 2 + 1):
        yk = y.narrow(dim, k, 1)
        parts += [math.sqrt(2.0) * yk.real, math.sqrt(2.0) * yk.imag]
    if n % 2 == 0 and n > 1:
        parts.append(y.narrow(dim, n // 2, 1).real)
    return torch.cat(parts, dim=dim)


def ref_rdft_analysis(w: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    out = w
    for d in kernel_dims(ks):
        out = ref_packed_rdft_axis(out, d)
    return out


def ref_rdft_matrix(ks: tuple[int, ...]) -> torch.Tensor:
    """Analysis matrix A (n x n, float64) with coefficients = flattened_w @ A, built from torch.fft."""
    n = math.prod(ks)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *ks)
    return ref_rdft_analysis(eye, ks).reshape(n, n)


# ----------------------------------------------------------------------------------------------------------------
# rdft matrices
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ks", ALL_SIZES, ids=ids)
def test_rdft_matrices_orthonormal(ks: tuple[int, ...]) -> None:
    n = math.prod(ks)
    m = matrices("rdft", ks, torch.float64, CPU)
    eye = torch.eye(n, dtype=torch.float64)
    assert m.synthesis.shape == (n, n)
    assert m.analysis.shape == (n, n)
    s = m.synthesis
    torch.testing.assert_close(s @ s.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.T @ s, eye, rtol=0, atol=1e-12)
    # analysis is the inverse of synthesis
    torch.testing.assert_close(s @ m.analysis, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.analysis @ s, eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ks", ALL_SIZES, ids=ids)
def test_rdft_dc_is_constant(ks: tuple[int, ...]) -> None:
    n = math.prod(ks)
    m = matrices("rdft", ks, torch.float64, CPU)
    dc = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)
    # coefficient 0 synthesizes a constant kernel, and analysis of a constant kernel lands only in coefficient 0
    torch.testing.assert_close(m.synthesis[0], dc, rtol=0, atol=1e-14)
    torch.testing.assert_close(m.analysis[:, 0], dc, rtol=0, atol=1e-14)
    const = torch.ones(n, dtype=torch.float64)
    coeffs = const @ m.analysis
    assert coeffs[0].item() == pytest.approx(math.sqrt(n), rel=1e-13)
    if n > 1:
        assert coeffs[1:].abs().max().item() < 1e-12


@pytest.mark.parametrize("ks", ALL_SIZES, ids=ids)
def test_rdft_matrix_equals_per_axis_packed_rfft(ks: tuple[int, ...]) -> None:
    ref = ref_rdft_matrix(ks)
    m = matrices("rdft", ks, torch.float64, CPU)
    torch.testing.assert_close(m.analysis, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.synthesis, ref.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ks", GRID_SIZES, ids=ids)
def test_rdft_to_spectral_and_back_match_reference(ks: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    w = torch.randn(3, 2, *ks, dtype=torch.float64)
    ref = ref_rdft_analysis(w, ks)
    x = to_spectral(w, ks, "rdft")
    assert x.shape == w.shape
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-12)
    # synthesis of the reference coefficients gives w back
    torch.testing.assert_close(to_spatial(ref, ks, "rdft"), w, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# rfft against torch.fft
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ks", ALL_SIZES, ids=ids)
def test_rfft_synthesis_equals_irfftn_including_dead_imaginary(ks: tuple[int, ...]) -> None:
    torch.manual_seed(2)
    lead = (3, 2)
    # random X everywhere, including the imaginary parts of self-conjugate bins that irfftn ignores
    x = torch.randn(2, *lead, *ks[:-1], ks[-1] // 2 + 1, dtype=torch.float64)
    ref = ref_rfft_synthesis(x, ks)
    out = to_spatial(x, ks, "rfft")
    assert out.shape == (*lead, *ks)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # the matrix itself, applied by hand
    m = matrices("rfft", ks, torch.float64, CPU)
    rows = x.reshape(2, math.prod(lead), -1)
    by_hand = rows[0] @ m.synthesis[0] + rows[1] @ m.synthesis[1]
    torch.testing.assert_close(by_hand.reshape(ref.shape), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ks", [(3,), (4,), (4, 4), (3, 4), (2, 2, 2)], ids=ids)
def test_rfft_dead_imaginary_coordinates_have_no_effect(ks: tuple[int, ...]) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 2, *ks[:-1], ks[-1] // 2 + 1, dtype=torch.float64)
    # imaginary part of the DC bin along the halved axis (and Nyquist for even sizes) at the origin of all others
    y = x.clone()
    origin = (0,) * (len(ks) - 1)
    y[(1, slice(None), *origin, 0)] += 10.0
    if ks[-1] % 2 == 0:
        y[(1, slice(None), *origin, ks[-1] // 2)] -= 7.0
    torch.testing.assert_close(to_spatial(y, ks, "rfft"), to_spatial(x, ks, "rfft"), rtol=0, atol=1e-12)
    torch.testing.assert_close(ref_rfft_synthesis(y, ks), ref_rfft_synthesis(x, ks), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ks", ALL_SIZES, ids=ids)
def test_rfft_analysis_equals_rfftn(ks: tuple[int, ...]) -> None:
    torch.manual_seed(4)
    w = torch.randn(3, 2, *ks, dtype=torch.float64)
    ref = ref_rfft_analysis(w, ks)
    x = to_spectral(w, ks, "rfft")
    assert x.shape == rfft_shape(tuple(w.shape), ks)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-12)
    # the analysis matrix (built from closed-form cosines and sines) agrees with rfftn too
    m = matrices("rfft", ks, torch.float64, CPU)
    rows = w.reshape(6, -1)
    by_matrix = torch.stack((rows @ m.analysis[0], rows @ m.analysis[1]))
    torch.testing.assert_close(by_matrix.reshape(ref.shape), ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Round trip grid: forward(right_inverse(W)) == W
# ----------------------------------------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def roundtrip_tolerance(dtype: torch.dtype, ks: tuple[int, ...], max_abs: float) -> float:
    """Absolute tolerance of forward(right_inverse(W)).

    fp32 / fp64: relative 1e-6 / 1e-12 of max|W|. Half precisions: the stored coefficients are rounded to the
    dtype (unit roundoff u each); the synthesis amplifies that by at most sqrt(2) in the 2-norm of a kernel
    (Parseval with the doubled interior bins of rfft; 1 for the orthonormal rdft), and the 2-norm of a kernel is at
    most sqrt(n) max|W|; the final cast adds one more rounding. Bound: u (sqrt(2 n) + 1) max|W|, times 2 slack.
    """
    if dtype == torch.float32:
        return 1e-6 * max_abs
    if dtype == torch.float64:
        return 1e-12 * max_abs
    u = torch.finfo(dtype).eps / 2
    return 2 * u * (math.sqrt(2 * math.prod(ks)) + 1) * max_abs


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("ks", GRID_SIZES, ids=ids)
def test_roundtrip_grid(ks: tuple[int, ...], basis: str, dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    w = torch.randn(4, 3, *ks, dtype=torch.float64).to(dtype)
    x = to_spectral(w, ks, basis)
    assert x.dtype == dtype
    expected_shape = rfft_shape(tuple(w.shape), ks) if basis == "rfft" else tuple(w.shape)
    assert tuple(x.shape) == expected_shape
    back = to_spatial(x, ks, basis)
    assert back.dtype == dtype
    assert back.shape == w.shape
    max_abs = w.double().abs().max().item()
    err = (back.double() - w.double()).abs().max().item()
    assert err <= roundtrip_tolerance(dtype, ks, max_abs), (err, max_abs)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("ks", [(3,), (3, 3), (2, 5), (2, 2, 2)], ids=ids)
def test_roundtrip_without_leading_dims_and_noncontiguous(ks: tuple[int, ...], basis: str) -> None:
    torch.manual_seed(6)
    w = torch.randn(*ks, dtype=torch.float64)
    back = to_spatial(to_spectral(w, ks, basis), ks, basis)
    torch.testing.assert_close(back, w, rtol=0, atol=1e-12)
    # a non-contiguous weight (channels transposed) round-trips too
    wt = torch.randn(3, 5, *ks, dtype=torch.float64).transpose(0, 1)
    assert not wt.is_contiguous()
    torch.testing.assert_close(to_spatial(to_spectral(wt, ks, basis), ks, basis), wt, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ks", [(3,), (4, 4), (2, 5), (2, 3, 3)], ids=ids)
def test_rdft_spectral_of_spatial_is_identity(ks: tuple[int, ...]) -> None:
    # rdft is a bijection: right_inverse(forward(X)) == X as well
    torch.manual_seed(7)
    x = torch.randn(2, 3, *ks, dtype=torch.float64)
    torch.testing.assert_close(to_spectral(to_spatial(x, ks, "rdft"), ks, "rdft"), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ks", [(3,), (4, 4), (2, 5), (2, 3, 3)], ids=ids)
def test_rfft_spectral_of_spatial_is_projection(ks: tuple[int, ...]) -> None:
    # rfft is not a bijection: right_inverse o forward is a projection (idempotent), and equals rfftn(irfftn(X))
    torch.manual_seed(8)
    x = torch.randn(2, 3, *ks[:-1], ks[-1] // 2 + 1, dtype=torch.float64)
    p = to_spectral(to_spatial(x, ks, "rfft"), ks, "rfft")
    torch.testing.assert_close(p, ref_rfft_analysis(ref_rfft_synthesis(x, ks), ks), rtol=0, atol=1e-12)
    torch.testing.assert_close(to_spectral(to_spatial(p, ks, "rfft"), ks, "rfft"), p, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("ks", [(3,), (4,), (3, 3), (2, 5), (2, 2, 3)], ids=ids)
def test_gradcheck(ks: tuple[int, ...], basis: str) -> None:
    torch.manual_seed(9)
    w = torch.randn(2, *ks, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: to_spectral(t, ks, basis), (w,))
    x0 = to_spectral(w.detach(), ks, basis)
    x = torch.randn_like(x0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: to_spatial(t, ks, basis), (x,))


def _forward(x: torch.Tensor, ks: tuple[int, ...], basis: str) -> torch.Tensor:
    """The forward of a registered conv (``apply_synthesis``: rfft has a backward of its own)."""
    synthesis = matrices(basis, ks, x.dtype, x.device).synthesis  # type: ignore[arg-type]
    return apply_synthesis(x, synthesis, ks, basis)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("ks", [(3,), (4,), (3, 3), (2, 5), (4, 4), (2, 2, 3)], ids=ids)
def test_registered_forward_gradients_match_irfftn(ks: tuple[int, ...]) -> None:
    """The rfft forward's own backward against autograd through ``torch.fft.irfftn``: first and second order
    (gradcheck), ``torch.func.grad`` and ``vmap`` over a batch of weights."""
    torch.manual_seed(12)
    x = torch.randn(2, 3, 2, *ks[:-1], ks[-1] // 2 + 1, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 2, *ks, dtype=torch.float64)
    ours = torch.autograd.grad((_forward(x, ks, "rfft") * probe).sum(), x)[0]
    ref = torch.autograd.grad((ref_rfft_synthesis(x, ks) * probe).sum(), x)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: _forward(t, ks, "rfft"), (x,))
    assert torch.autograd.gradgradcheck(lambda t: _forward(t, ks, "rfft"), (x,))
    # the matrix too, where it requires a gradient (the parametrization's buffer never does)
    s = matrices("rfft", ks, torch.float64, x.device).synthesis.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, m: apply_synthesis(t, m, ks, "rfft"), (x, s))
    func = torch.func.grad(lambda t: (_forward(t, ks, "rfft") * probe).sum())(x.detach())
    torch.testing.assert_close(func, ref, rtol=0, atol=1e-12)
    batch = torch.randn(4, *x.shape, dtype=torch.float64)
    mapped = torch.vmap(lambda t: _forward(t, ks, "rfft"))(batch)
    torch.testing.assert_close(mapped, torch.stack([ref_rfft_synthesis(t, ks) for t in batch]), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("basis", BASES)
def test_matrices_are_cached(basis: str) -> None:
    a = matrices(basis, (3, 3), torch.float32, CPU)
    b = matrices(basis, (3, 3), torch.float32, CPU)
    assert a is b
    assert a.synthesis is b.synthesis and a.analysis is b.analysis
    c = matrices(basis, (3, 3), torch.float64, CPU)
    assert c is not a
    assert c.synthesis.dtype == torch.float64 and a.synthesis.dtype == torch.float32
    d = matrices(basis, (3, 4), torch.float32, CPU)
    assert d is not a


def test_matrices_shapes() -> None:
    m = matrices("rfft", (3, 4), torch.float32, CPU)
    assert m.synthesis.shape == (2, 3 * 3, 12)
    assert m.analysis.shape == (2, 12, 3 * 3)
    m = matrices("rdft", (3, 4), torch.float32, CPU)
    assert m.synthesis.shape == (12, 12)
    assert m.analysis.shape == (12, 12)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [to_spatial, to_spectral])
def test_unknown_basis(fn) -> None:
    with pytest.raises(SpectralError, match="unknown basis"):
        fn(torch.randn(2, 2, 3, 3), (3, 3), "dct")
    with pytest.raises(SpectralError):
        matrices("fft", (3, 3), torch.float32, CPU)


@pytest.mark.parametrize("bad", [3, (), [], (3, 3, 3, 3), (0, 3), (3, 0), (-1,), (3.0, 3), (True, 3), "33", None])
@pytest.mark.parametrize("basis", BASES)
def test_bad_kernel_size(bad, basis: str) -> None:
    w = torch.randn(2, 3, 3)
    with pytest.raises(SpectralError):
        to_spectral(w, bad, basis)
    with pytest.raises(SpectralError):
        to_spatial(w, bad, basis)


@pytest.mark.parametrize("basis", BASES)
def test_wrong_trailing_shape(basis: str) -> None:
    with pytest.raises(SpectralError):
        to_spectral(torch.randn(4, 3, 3, 4), (3, 3), basis)
    with pytest.raises(SpectralError):
        to_spectral(torch.randn(3), (3, 3), basis)
    bad_spectral = torch.randn(2, 4, 3, 3, 3)  # rfft of (3, 3) ends in (3, 2); rdft in (3, 3)
    if basis == "rfft":
        with pytest.raises(SpectralError):
            to_spatial(bad_spectral, (3, 3), basis)
    with pytest.raises(SpectralError):
        to_spatial(torch.randn(2, 4, 3, 4), (3, 3), basis)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("basis", BASES)
def test_integer_tensor(dtype: torch.dtype, basis: str) -> None:
    w = torch.ones(2, 3, 3, dtype=dtype)
    with pytest.raises(SpectralError):
        to_spectral(w, (3, 3), basis)
    x = torch.ones(2, 2, 3, 2, dtype=dtype) if basis == "rfft" else w
    with pytest.raises(SpectralError):
        to_spatial(x, (3, 3), basis)


def test_complex_tensor_rejected() -> None:
    with pytest.raises(SpectralError):
        to_spectral(torch.randn(2, 3, 3, dtype=torch.complex64), (3, 3), "rfft")


@pytest.mark.parametrize("lead", [1, 3, 4])
def test_rfft_dim0_must_be_2(lead: int) -> None:
    with pytest.raises(SpectralError, match="dim 0"):
        to_spatial(torch.randn(lead, 4, 3, 3, 2), (3, 3), "rfft")
    # and a tensor with nothing in front of the kernel dims
    with pytest.raises(SpectralError):
        to_spatial(torch.randn(3, 2), (3, 3), "rfft")


# ----------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
class TestCuda:
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    @pytest.mark.parametrize("basis", BASES)
    @pytest.mark.parametrize("ks", GRID_SIZES, ids=ids)
    def test_roundtrip(self, ks: tuple[int, ...], basis: str, dtype: torch.dtype) -> None:
        torch.manual_seed(10)
        w64 = torch.randn(4, 3, *ks, dtype=torch.float64)
        w = w64.to(dtype).cuda()
        x = to_spectral(w, ks, basis)
        assert x.device.type == "cuda" and x.dtype == dtype
        expected_shape = rfft_shape(tuple(w.shape), ks) if basis == "rfft" else tuple(w.shape)
        assert tuple(x.shape) == expected_shape
        back = to_spatial(x, ks, basis)
        assert back.device.type == "cuda" and back.dtype == dtype and back.shape == w.shape
        max_abs = w.double().abs().max().item()
        err = (back.double() - w.double()).abs().max().item()
        assert err <= roundtrip_tolerance(dtype, ks, max_abs), (err, max_abs)

    @pytest.mark.parametrize("ks", GRID_SIZES, ids=ids)
    def test_rfft_synthesis_matches_cpu_float64_irfftn(self, ks: tuple[int, ...]) -> None:
        torch.manual_seed(11)
        x = torch.randn(2, 3, 2, *ks[:-1], ks[-1] // 2 + 1, dtype=torch.float64)
        ref = ref_rfft_synthesis(x, ks)  # CPU float64 reference
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            out = to_spatial(x.to(dtype).cuda(), ks, "rfft")
            assert out.device.type == "cuda" and out.dtype == dtype
            torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=tol * ref.abs().max().item())

    @pytest.mark.parametrize("ks", [(4,), (2, 4), (4, 4), (2, 2, 2)], ids=ids)
    def test_rfft_float16_matches_cuda_irfftn(self, ks: tuple[int, ...]) -> None:
        # torch.fft supports float16 on CUDA only for power-of-two sizes. Use Hermitian-consistent X (the rfftn of
        # a real kernel), where every FFT backend agrees, and measure both against a float64 CPU reference of the
        # same float16 input.
        torch.manual_seed(12)
        w = torch.randn(3, 2, *ks, dtype=torch.float64)
        x = ref_rfft_analysis(w, ks).to(torch.float16).cuda()
        exact = ref_rfft_synthesis(x.cpu().double(), ks)
        scale = exact.abs().max().item()
        u = torch.finfo(torch.float16).eps / 2
        out = to_spatial(x, ks, "rfft")
        assert out.dtype == torch.float16 and out.device.type == "cuda"
        # computed in float32, rounded once to float16
        assert (out.cpu().double() - exact).abs().max().item() <= 2 * u * scale
        cufft = torch.fft.irfftn(torch.complex(x[0], x[1]), s=ks, dim=kernel_dims(ks), norm="ortho")
        assert cufft.dtype == torch.float16
        # cuFFT computes in half precision: a few roundings per butterfly stage
        tol = 4 * u * (math.log2(math.prod(ks)) + 1) * math.sqrt(math.prod(ks)) * scale
        assert (cufft.cpu().double() - exact).abs().max().item() <= tol
        assert (out.double() - cufft.double()).abs().max().item() <= tol + 2 * u * scale

    @pytest.mark.parametrize("basis", BASES)
    @pytest.mark.parametrize("ks", [(3,), (4, 4), (2, 5), (2, 3, 3)], ids=ids)
    def test_analysis_matches_cpu(self, ks: tuple[int, ...], basis: str) -> None:
        torch.manual_seed(13)
        w = torch.randn(3, 2, *ks, dtype=torch.float64)
        ref = ref_rfft_analysis(w, ks) if basis == "rfft" else ref_rdft_analysis(w, ks)
        torch.testing.assert_close(to_spectral(w.cuda(), ks, basis).cpu(), ref, rtol=0, atol=1e-12)
        out32 = to_spectral(w.float().cuda(), ks, basis).cpu().double()
        torch.testing.assert_close(out32, ref, rtol=0, atol=1e-5 * ref.abs().max().item())

    def test_matrices_cached_per_device(self) -> None:
        dev = torch.device("cuda", torch.cuda.current_device())
        a = matrices("rdft", (3, 3), torch.float32, dev)
        assert a is matrices("rdft", (3, 3), torch.float32, dev)
        assert a.synthesis.device.type == "cuda"
        assert a is not matrices("rdft", (3, 3), torch.float32, CPU)


# ----------------------------------------------------------------------------------------------------------------
# Chunked products: the bits of a kernel's coefficients do not depend on how a tensor is split
# ----------------------------------------------------------------------------------------------------------------

CHUNK_CASES = [
    ((3, 3), 37 * 16),
    ((5, 5), 200),
    ((4, 6), 129),
    ((5,), 1000),
    ((3, 3, 3), 77),
    ((2, 2), 3),
    ((23, 24), 37),
    ((600,), 40),
    ((9, 8, 9), 19),
]  # separable (FFT) sizes too


@pytest.fixture
def small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of a few kernels, so that small tensors span many runs and a tail run of any size."""
    monkeypatch.setattr(bases, "CHUNK_TAPS", 250)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.usefixtures("small_runs")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize(("ks", "rows"), CHUNK_CASES, ids=lambda c: str(c))
def test_slabs_of_whole_runs_give_the_bits_of_the_whole(ks: tuple[int, ...], rows: int, basis: str,
                                                        dtype: torch.dtype) -> None:  # fmt: skip
    """What streaming relies on: transforming slabs of whole runs (fresh, aligned memory, one thread) gives the
    bits of the whole tensor (views at any offset, the machine's threads), both directions."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, *ks, generator=g).to(dtype)
    run = bases.chunk_rows(ks)
    assert run < rows or rows == 3
    misaligned = torch.empty(w.numel() + 1, dtype=dtype)[1:].view(w.shape)  # a view 2-4 bytes off alignment
    misaligned.copy_(w)
    whole = to_spectral(misaligned, ks, basis)
    back = to_spatial(whole, ks, basis)
    assert whole.is_contiguous() and back.is_contiguous()  # parameters are made from these (FSDP needs it)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, rows, 2 * run):  # slabs of two runs, the last one shorter
            j = min(rows, i + 2 * run)
            part = to_spectral(w[i:j].clone(), ks, basis)
            assert part.is_contiguous()
            plane = (slice(None), slice(i, j)) if basis == "rfft" else (slice(i, j),)
            assert _bits(part) == _bits(whole[plane]), (i, j)
            assert _bits(to_spatial(part, ks, basis)) == _bits(back[i:j]), (i, j)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.usefixtures("small_runs")
@pytest.mark.parametrize("basis", BASES)
def test_differentiable_path_gives_the_same_bits(basis: str) -> None:
    w = torch.randn(301, 3, 3)
    expected = to_spectral(w, (3, 3), basis)
    w.requires_grad_(True)
    x = to_spectral(w, (3, 3), basis)
    assert x.requires_grad and _bits(x.detach()) == _bits(expected)
    y = to_spatial(x, (3, 3), basis)
    assert y.requires_grad and _bits(y.detach()) == _bits(to_spatial(expected, (3, 3), basis))
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


@pytest.mark.parametrize("ks", [(3, 3), (4, 4), (2, 6), (4,), (2, 2, 2)], ids=ids)
def test_rfft_dead_imaginary_parts_are_exactly_zero(ks: tuple[int, ...]) -> None:
    """The imaginary parts of self-conjugate bins come out exactly 0, as from rfftn (no 1e-16 from sin(pi))."""
    w = torch.randn(5, *ks, dtype=torch.float64)
    x = to_spectral(w, ks, "rfft")
    c = torch.fft.rfftn(w, s=ks, dim=tuple(range(-len(ks), 0)), norm="ortho")
    assert torch.equal(x[1] == 0, c.imag == 0)
    assert (c.imag == 0).any()
