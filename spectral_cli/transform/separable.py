"""The two bases applied axis by axis with FFTs: the method for large kernels (see
:func:`~spectral_cli.transform.kernels.transform_method`).

The DFT is separable, so neither basis needs its dense (taps x taps) matrix: ``rfft`` is ``torch.fft.rfftn``
itself (``norm="ortho"``, as pytorch-parametrizations computes it), ``rdft`` is the packed real DFT of
:mod:`spectral_cli.transform.matrices` taken along one axis at a time (an ``rfft`` along the axis, its
interior bins scaled by sqrt(2) and interleaved as ``[y0, Re y1, Im y1, ...]``). Memory grows with the
kernels' numbers, time with taps x log(taps); the numbers are those of the dense product to float rounding.

Functions take and give rows (one flattened kernel per row) in a float32 or float64 dtype, in the layout of
:func:`~spectral_cli.transform.bases.spectral_rows`: ``rdft`` one coefficient per tap, ``rfft`` the real
parts of the bins then their imaginary parts. A row's bits depend on that row alone (not on how many rows are
given, nor on the threads), so no padding or runs are needed for reproducible bits. Differentiable.

Example:
    >>> import torch
    >>> from spectral_cli.transform.bases import to_spectral
    >>> w = torch.randn(6, 12, 10, dtype=torch.float64)
    >>> rows = analysis_rows(w.reshape(6, -1), (12, 10), "rfft")
    >>> dense = to_spectral(w, (12, 10), "rfft", method="dense")  # (2, 6, 12, 6): the planes
    >>> torch.allclose(rows, dense.reshape(2, 6, -1).transpose(0, 1).reshape(6, -1))
    True
    >>> torch.allclose(synthesis_rows(rows, (12, 10), "rfft"), w.reshape(6, -1))
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .kernels import Basis, spectral_kernel_shape

__all__ = ["analysis_rows", "synthesis_planes", "synthesis_rows"]


def _dims(ks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(range(1, len(ks) + 1))


def _pack_axis(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """The packed real DFT of ``x`` along ``dim`` (length ``n``): ``[y0, Re y1, Im y1, ..., (y_n/2)]``."""
    y = torch.view_as_real(torch.fft.rfft(x, dim=dim, norm="ortho")).movedim(dim, -2)  # (..., n // 2 + 1, 2)
    interior = (y[..., 1 : (n - 1) // 2 + 1, :] * math.sqrt(2.0)).flatten(-2)
    parts = [y[..., :1, 0], interior]
    if n % 2 == 0 and n > 1:
        parts.append(y[..., n // 2 :, 0])
    return torch.cat(parts, dim=-1).movedim(-1, dim)


def _unpack_axis(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """The inverse of :func:`_pack_axis` along ``dim``."""
    x = x.movedim(dim, -1)
    dc = torch.complex(x[..., :1], torch.zeros_like(x[..., :1]))
    interior = x[..., 1 : 1 + 2 * ((n - 1) // 2)]
    pairs = interior.reshape(*interior.shape[:-1], -1, 2) / math.sqrt(2.0)
    parts = [dc, torch.view_as_complex(pairs.contiguous())]
    if n % 2 == 0 and n > 1:
        parts.append(torch.complex(x[..., -1:], torch.zeros_like(x[..., -1:])))
    spectrum = torch.cat(parts, dim=-1)
    kernels: torch.Tensor = torch.fft.irfft(spectrum, n=n, dim=-1, norm="ortho")
    return kernels.movedim(-1, dim)


def analysis_rows(rows: torch.Tensor, ks: tuple[int, ...], basis: Basis) -> torch.Tensor:
    """The coefficients of ``rows`` (``(R, taps)``): ``(R, taps)`` for ``rdft``, ``(R, 2 * bins)`` for ``rfft``."""
    r = rows.shape[0]
    kernels = rows.reshape(r, *ks)
    if basis == "rfft":
        bins = torch.view_as_real(torch.fft.rfftn(kernels, dim=_dims(ks), norm="ortho"))  # (R, *half, 2)
        return bins.reshape(r, -1, 2).transpose(1, 2).reshape(r, -1)
    for dim, n in enumerate(ks, start=1):
        kernels = _pack_axis(kernels, dim, n)
    return kernels.reshape(r, -1)


def synthesis_rows(rows: torch.Tensor, ks: tuple[int, ...], basis: Basis) -> torch.Tensor:
    """The kernels (``(R, taps)``) of coefficient rows as :func:`analysis_rows` gives them."""
    if basis == "rfft":
        planes = rows.reshape(rows.shape[0], 2, -1)
        return synthesis_planes((planes[:, 0], planes[:, 1]), ks, basis)
    return synthesis_planes((rows,), ks, basis)


def synthesis_planes(planes: Sequence[torch.Tensor], ks: tuple[int, ...], basis: Basis) -> torch.Tensor:
    """The kernels (``(R, taps)``) of coefficients given as planes of rows: for ``rfft`` the real and the
    imaginary plane (``(R, bins)`` each), for ``rdft`` one (``(R, taps)``)."""
    r = planes[0].shape[0]
    if basis == "rfft":
        half = spectral_kernel_shape(ks, "rfft")
        spectrum = torch.complex(planes[0].reshape(r, *half), planes[1].reshape(r, *half))
        kernels: torch.Tensor = torch.fft.irfftn(spectrum, s=ks, dim=_dims(ks), norm="ortho")
        return kernels.reshape(r, -1)
    kernels = planes[0].reshape(r, *ks)
    for dim, n in enumerate(ks, start=1):
        kernels = _unpack_axis(kernels, dim, n)
    return kernels.reshape(r, -1)
