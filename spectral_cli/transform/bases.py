"""The two spectral bases: ``to_spectral`` and ``to_spatial``.

``rfft``
    The layout of pytorch-parametrizations 1.0.0 (and of CompressAI / tensorflow_compression's RDFT parameter):
    ``X = stack((C.real, C.imag))`` with ``C = rfftn(W, s=kernel_size, norm="ortho")`` over the last
    ``len(kernel_size)`` dims. ``X`` has shape ``(2, *W.shape[:-1], kernel_size[-1] // 2 + 1)``.
``rdft``
    The orthonormal real DFT of Ballé (PCS 2018): per kernel axis the packed real DFT
    ``[y0, Re y1, Im y1, Re y2, ...]`` scaled to be orthonormal, combined over axes by a Kronecker product.
    ``X`` has the shape of ``W``.

Both maps are linear. Kernels of up to :data:`~spectral_cli.transform.kernels.DENSE_MAX_TAPS` taps are
transformed as one matrix product over the flattened kernels (the ``dense`` method), with the matrices of
:mod:`spectral_cli.transform.matrices` (built in float64 from closed-form cosines and sines, cached per basis,
kernel size, dtype and device); larger ones axis by axis with FFTs (``separable``,
:mod:`spectral_cli.transform.separable`), in memory that grows with the kernels, not with taps^2.
Half-precision tensors are computed in float32 and cast back, so a tensor keeps its dtype.

:func:`to_spectral` and :func:`to_spatial` work over fixed runs of :func:`chunk_rows` kernels counted from a
tensor's first kernel, so their bits do not depend on how a caller splits a tensor (a BLAS product's last bits
may depend on how many rows it is given; an FFT's on the row alone): a file converted slab by slab holds the
bits of the same tensor converted whole, and of ``right_inverse`` at registration.

Conventions (row vectors, one flattened kernel per row): ``spatial = spectral @ synthesis`` and
``spectral = spatial @ analysis``.

Example:
    >>> import torch
    >>> from spectral_cli.transform.bases import to_spectral, to_spatial
    >>> w = torch.randn(8, 4, 3, 3)
    >>> x = to_spectral(w, (3, 3), "rfft")
    >>> tuple(x.shape)
    (2, 8, 4, 3, 2)
    >>> torch.allclose(to_spatial(x, (3, 3), "rfft"), w, atol=1e-6)
    True
    >>> tuple(to_spectral(w, (3, 3), "rdft").shape)
    (8, 4, 3, 3)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import SpectralError
from .kernels import (
    DEFAULT_BASIS,
    Basis,
    Method,
    check_basis,
    check_kernel_size,
    check_method,
    spectral_kernel_shape,
    spectral_shape,
)
from .matrices import compute_dtype, matrices, row_matrices, row_width, without_autocast
from .separable import analysis_rows, synthesis_planes

#: kernel taps per run of a chunked product: 1 MiB of float32 rows
CHUNK_TAPS = 1 << 18

#: products are taken over a multiple of this many rows (zero rows added), into fresh memory. Measured with
#: MKL (tests/test_bases.py checks it): a row's last bits then depend on the row alone, not on how many rows
#: share the product, on the threads or on where the input lies; they do depend on where the output lies and,
#: for row counts that are not a multiple of 4, on the count.
ROW_MULTIPLE = 16


def _check_tensor(t: torch.Tensor, trailing: tuple[int, ...], what: str, lead_rank: int) -> None:
    if not t.is_floating_point():
        raise SpectralError(f"{what} must be a floating-point tensor, got {t.dtype}")
    k = len(trailing)
    if t.dim() < k + lead_rank or tuple(t.shape[t.dim() - k :]) != trailing:
        raise SpectralError(f"{what} of shape {tuple(t.shape)} does not end in {trailing}")


def chunk_rows(kernel_size: Sequence[int], method: Method | None = None) -> int:
    """Kernels per run of the chunked work of :func:`to_spectral` and :func:`to_spatial`: about
    :data:`CHUNK_TAPS` taps, a multiple of 16 kernels for the dense product, at least one kernel for the
    separable one (whose rows need no padding), so that a slab of the largest kernels holds one. ``method`` is
    :func:`~spectral_cli.transform.kernels.transform_method`'s unless given.

    Example:
        >>> chunk_rows((3, 3)), chunk_rows((5, 5)), chunk_rows((51, 51)), chunk_rows((1024, 1024))
        (29120, 10480, 100, 1)
        >>> chunk_rows((51, 51), "dense")
        96
    """
    rows = CHUNK_TAPS // math.prod(kernel_size)
    if check_method(method, kernel_size) == "separable":
        return max(1, rows)
    return max(ROW_MULTIPLE, rows // ROW_MULTIPLE * ROW_MULTIPLE)


def _run(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], i: int, j: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum(a[i:j] @ m for a, m in factors)`` into fresh memory (or ``out``: 64-byte aligned, rows padded), the
    rows padded with zeros to a multiple of :data:`ROW_MULTIPLE`."""
    pad = -(j - i) % ROW_MULTIPLE
    parts = [(a[i:j], m) for a, m in factors]
    if pad:
        parts = [(torch.cat((a, a.new_zeros(pad, a.shape[1]))), m) for a, m in parts]
    with without_autocast(parts[0][0].device):
        if out is not None and len(parts) == 1:
            total = torch.mm(parts[0][0], parts[0][1], out=out)
        else:
            total = parts[0][0] @ parts[0][1]
        for a, m in parts[1:]:
            total = torch.addmm(total, a, m)
    return total[: j - i] if pad else total


def padded_rows(rows: int, method: Method) -> int:
    """Rows a product over ``rows`` kernels takes: a multiple of :data:`ROW_MULTIPLE` for the dense product
    (zero rows added), ``rows`` for the separable one (a row's bits depend on that row alone)."""
    return -rows % ROW_MULTIPLE + rows if method == "dense" else rows


def _chunked(
    n: int,
    chunk: int,
    run: Callable[[int, int], torch.Tensor],
    grad: bool,
    place: Callable[[torch.Tensor, int, int], None],
) -> torch.Tensor | None:
    """``run(i, j)`` over runs of ``chunk`` of the ``n`` rows. One run is returned as it is; several are joined
    and returned when the result needs a gradient (``grad``), else handed to ``place(run, i, j)`` (None is
    returned)."""
    bounds = [(i, min(n, i + chunk)) for i in range(0, n, chunk)]
    if len(bounds) == 1:
        return run(0, n)
    if grad:
        return torch.cat([run(i, j) for i, j in bounds])
    for i, j in bounds:
        place(run(i, j), i, j)
    return None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def spectral_rows(
    rows: torch.Tensor,
    kernel_size: Sequence[int],
    basis: Basis = DEFAULT_BASIS,
    out: torch.Tensor | None = None,
    *,
    method: Method | None = None,
) -> torch.Tensor:
    """The coefficients of flattened kernels ``rows`` (compute dtype), with the bits :func:`to_spectral` gives
    them: ``rdft`` one row per kernel; ``rfft`` the real then the imaginary plane's numbers side by side in each
    row (one product for both planes, rows of ``2 * bins``).

    The dense product takes at most :func:`chunk_rows` kernels, or any multiple of 16 (zero rows added at the
    end of a tensor do not change the others' bits); the separable one any number. ``out``, if given, receives
    the result: contiguous, starting at a 64-byte boundary (as torch allocates), with :func:`padded_rows` rows
    and :func:`~spectral_cli.transform.matrices.product_width` columns. The result is a view of its first
    :func:`row_width` columns.
    """
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    method = check_method(method, ks)
    width = row_width(ks, basis)
    if method == "separable":
        product = analysis_rows(rows, ks, basis)
        return out[: rows.shape[0], :width].copy_(product) if out is not None else product
    if rows.shape[0] > chunk_rows(ks, method) and rows.shape[0] % ROW_MULTIPLE:
        raise SpectralError(f"spectral_rows takes at most {chunk_rows(ks, method)} kernels of {ks}, or a multiple of "
                            f"{ROW_MULTIPLE}, got {rows.shape[0]}")  # fmt: skip
    product = _run([(rows, row_matrices(basis, ks, rows.dtype, rows.device).analysis)], 0, rows.shape[0], out)
    return product[:, :width]


def to_spatial(
    x: torch.Tensor, kernel_size: Sequence[int], basis: Basis = DEFAULT_BASIS, *, method: Method | None = None
) -> torch.Tensor:
    """Map spectral coefficients ``x`` back to spatial kernels (differentiable; keeps ``x.dtype``).

    ``method`` (``"dense"`` or ``"separable"``) is :func:`~spectral_cli.transform.kernels.transform_method`'s
    unless given; the two agree to float rounding.
    """
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    method = check_method(method, ks)
    check_spectral(x, ks, basis)
    cdtype = compute_dtype(x.dtype)
    n_in = math.prod(spectral_kernel_shape(ks, basis))
    if basis == "rfft":
        inputs = tuple(x.to(cdtype).reshape(2, -1, n_in))
        lead = x.shape[1 : x.dim() - len(ks)]
    else:
        inputs = (x.to(cdtype).reshape(-1, n_in),)
        lead = x.shape[: x.dim() - len(ks)]
    run: Callable[[int, int], torch.Tensor]
    if method == "separable":

        def run(i: int, j: int) -> torch.Tensor:
            return synthesis_planes([plane[i:j] for plane in inputs], ks, basis)
    else:
        synthesis = matrices(basis, ks, cdtype, x.device).synthesis
        factors = list(zip(inputs, synthesis if basis == "rfft" else (synthesis,), strict=True))

        def run(i: int, j: int) -> torch.Tensor:
            return _run(factors, i, j)

    out: list[torch.Tensor] = []  # made when a second run comes (one run is used as it is)

    def place(result: torch.Tensor, i: int, j: int) -> None:
        if not out:
            out.append(result.new_empty(inputs[0].shape[0], result.shape[1]))
        out[0][i:j] = result

    rows = _chunked(inputs[0].shape[0], chunk_rows(ks, method), run, _needs_grad(x), place)
    return (out[0] if rows is None else rows).reshape(*lead, *ks).to(x.dtype)


def check_spectral(x: torch.Tensor, ks: tuple[int, ...], basis: Basis) -> None:
    """Raise :class:`SpectralError` unless ``x`` is a floating-point ``basis`` tensor for kernel size ``ks``."""
    trailing = spectral_kernel_shape(ks, basis)
    _check_tensor(x, trailing, f"a {basis} tensor for kernel size {ks}", 1 if basis == "rfft" else 0)
    if basis == "rfft" and x.shape[0] != 2:
        raise SpectralError(f"an rfft tensor stacks real and imaginary parts in dim 0 (size 2), got {tuple(x.shape)}")


def to_spectral(
    w: torch.Tensor, kernel_size: Sequence[int], basis: Basis = DEFAULT_BASIS, *, method: Method | None = None
) -> torch.Tensor:
    """Map spatial kernels ``w`` to spectral coefficients (keeps ``w.dtype``; differentiable).

    ``rfft`` gives the numbers of ``torch.fft.rfftn`` (as pytorch-parametrizations 1.0.0 stores them) to
    float rounding: for small kernels as a matrix product (faster than ``rfftn`` there), for large
    ones with ``rfftn`` itself (``method``: see :func:`to_spatial`).
    """
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    method = check_method(method, ks)
    _check_tensor(w, ks, f"a weight for kernel size {ks}", 0)
    cdtype = compute_dtype(w.dtype)
    if w.numel() == 0:  # a conv with no channels: nothing to transform
        return w.new_zeros(spectral_shape(w.shape, ks, basis))
    flat = w.to(cdtype).reshape(-1, math.prod(ks))
    shape = spectral_shape(w.shape, ks, basis)
    width = row_width(ks, basis)
    run: Callable[[int, int], torch.Tensor]
    if method == "separable":

        def run(i: int, j: int) -> torch.Tensor:
            return analysis_rows(flat[i:j], ks, basis)
    else:
        analysis = row_matrices(basis, ks, cdtype, w.device).analysis

        def run(i: int, j: int) -> torch.Tensor:
            return _run([(flat, analysis)], i, j)

    # rfft: planes, all the real parts then all the imaginary parts; a run's rows hold both side by side
    planes = (1, width) if basis == "rdft" else (2, width // 2)
    out: list[torch.Tensor] = []  # made when a second run comes (one run is used as it is)

    def place(result: torch.Tensor, i: int, j: int) -> None:
        if not out:
            out.append(flat.new_empty(planes[0], flat.shape[0], planes[1]))
        out[0][:, i:j] = result[:, :width].view(j - i, *planes).transpose(0, 1)

    rows = _chunked(flat.shape[0], chunk_rows(ks, method), run, _needs_grad(w), place)
    if rows is not None:
        out = [rows[:, :width].reshape(-1, *planes).transpose(0, 1).contiguous()]
    return out[0].reshape(shape).to(w.dtype)
