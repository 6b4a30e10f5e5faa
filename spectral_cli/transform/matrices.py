"""The matrices of the two bases (see :mod:`spectral_cli.transform.bases` for the layouts they give).

Built in float64 from closed-form cosines and sines (independent of ``torch.fft``; the tests compare the two),
then cached per basis, kernel size, dtype and device. Conventions (row vectors, one flattened kernel per row):
``spatial = spectral @ synthesis`` and ``spectral = spatial @ analysis``. Half-precision tensors are computed
in float32 (:func:`compute_dtype`). A matrix holds taps x taps numbers, so the transforms use them only for
the ``dense`` method (:func:`~spectral_cli.transform.kernels.transform_method`); built for a 128x128 kernel
they take gigabytes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.amp.autocast_mode import is_autocast_available

from .kernels import DEFAULT_BASIS, Basis, Method, check_basis, check_kernel_size, spectral_kernel_shape

_EXACT_DTYPES = (torch.float32, torch.float64)


class Matrices(NamedTuple):
    """``synthesis`` maps spectral rows to spatial rows, ``analysis`` the reverse.

    For ``rfft`` both carry a leading dimension of 2 (real plane, imaginary plane).
    """

    synthesis: torch.Tensor
    analysis: torch.Tensor


def _packed_rdft_1d(n: int) -> torch.Tensor:
    """Orthonormal n-by-n analysis matrix of the packed real DFT (rows are frequencies)."""
    t = torch.arange(n, dtype=torch.float64)
    rows = [torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)]
    for k in range(1, (n - 1) // 2 + 1):
        angle = 2 * math.pi * k * t / n
        rows.append(math.sqrt(2.0 / n) * torch.cos(angle))
        rows.append(-math.sqrt(2.0 / n) * torch.sin(angle))
    if n % 2 == 0 and n > 1:
        rows.append(torch.cos(math.pi * t) / math.sqrt(n))
    return torch.stack(rows)


def _rfft_phases(kernel_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase θ[f, s] between half-spectrum bin f and spatial tap s, and the Hermitian weight of each bin."""
    half = spectral_kernel_shape(kernel_size, "rfft")
    freq = torch.cartesian_prod(*[torch.arange(m, dtype=torch.float64) for m in half]).reshape(-1, len(half))
    taps = torch.cartesian_prod(*[torch.arange(m, dtype=torch.float64) for m in kernel_size])
    taps = taps.reshape(-1, len(kernel_size))
    scale = torch.tensor([2 * math.pi / m for m in kernel_size], dtype=torch.float64)
    theta = (freq * scale) @ taps.T
    last, n_last = freq[:, -1], kernel_size[-1]
    # irfft counts each interior bin of the halved axis twice (it and its conjugate twin); DC and Nyquist once.
    self_conjugate = (last == 0) | ((n_last % 2 == 0) & (last == n_last // 2))
    weight = torch.where(self_conjugate, 1.0, 2.0).to(torch.float64)
    return theta, weight


@functools.cache
def _float64_matrices(basis: Basis, kernel_size: tuple[int, ...]) -> Matrices:
    n = math.prod(kernel_size)
    if basis == "rdft":
        d = functools.reduce(torch.kron, [_packed_rdft_1d(m) for m in kernel_size])
        return Matrices(synthesis=d, analysis=d.T.contiguous())
    theta, weight = _rfft_phases(kernel_size)
    norm = 1.0 / math.sqrt(n)
    # Exact zeros where the closed form has them (sin 0, sin pi, cos pi/2 come out as ~1e-16): the imaginary
    # parts of self-conjugate bins are then exactly 0, as torch.fft.rfftn gives them.
    cos, sin = (torch.where(v.abs() < 1e-12, 0.0, v) * norm for v in (torch.cos(theta), torch.sin(theta)))
    synthesis = torch.stack((cos * weight[:, None], -sin * weight[:, None]))
    analysis = torch.stack((cos.T, -sin.T)).contiguous()
    return Matrices(synthesis=synthesis.contiguous(), analysis=analysis)


@functools.cache
def _matrices(basis: Basis, kernel_size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Matrices:
    return Matrices(*(t.to(device=device, dtype=dtype) for t in _float64_matrices(basis, kernel_size)))


def matrices(
    basis: Basis, kernel_size: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Matrices:
    """The basis matrices for ``kernel_size`` in ``dtype`` on ``device``, built once and cached.

    Example:
        >>> import torch
        >>> m = matrices("rdft", (3, 3), torch.float64)
        >>> torch.allclose(m.synthesis @ m.analysis, torch.eye(9, dtype=torch.float64))
        True
        >>> m is matrices("rdft", [3, 3], torch.float64, "cpu")
        True
    """
    return _matrices(check_basis(basis), check_kernel_size(kernel_size), dtype, torch.device(device))


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """A context that turns ``torch.autocast`` off on ``device`` (where it is on): the bases are computed in
    :func:`compute_dtype` under autocast too, so a kernel has the numbers it has without it (a conv casts its
    weight as it casts any other), and autograd never meets a half-precision gradient of a float32 product."""
    if is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 and float64 are computed as they are; half precisions in float32."""
    return dtype if dtype in _EXACT_DTYPES else torch.float32


def row_matrices(
    basis: Basis, kernel_size: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Matrices:
    """The matrices for rows as :func:`spectral_rows` gives them: those of :func:`matrices`, with rfft's two planes
    joined (analysis ``(taps, 2 * bins)``, synthesis ``(2 * bins, taps)``), the analysis padded with zero columns
    (its first :func:`row_width` columns are the coefficients)."""
    return _row_matrices(check_basis(basis), check_kernel_size(kernel_size), dtype, torch.device(device))


@functools.cache
def _row_matrices(basis: Basis, kernel_size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Matrices:
    m = _matrices(basis, kernel_size, dtype, device)
    synthesis, analysis = (m.synthesis, m.analysis) if basis == "rdft" else (
        torch.cat(tuple(m.synthesis), dim=0), torch.cat(tuple(m.analysis), dim=1))  # fmt: skip
    width = analysis.shape[1]
    padding = analysis.new_zeros(analysis.shape[0], _padded_width(width) - width)
    return Matrices(synthesis=synthesis.contiguous(), analysis=torch.cat((analysis, padding), dim=1).contiguous())


def _padded_width(width: int) -> int:
    # Zero columns up to a width MKL handles well: odd narrow widths are much slower (docs/measurements.md).
    return -width % 16 + width if width < 32 else -width % 8 + width


def product_width(kernel_size: Sequence[int], basis: Basis, method: Method) -> int:
    """Columns of the rows :func:`~spectral_cli.transform.bases.spectral_rows` computes (its ``out``): those of
    :func:`row_matrices`'s analysis for the dense product, :func:`row_width` for the separable one.

    Example:
        >>> product_width((3, 3), "rfft", "dense"), product_width((3, 3), "rfft", "separable")
        (16, 12)
    """
    width = row_width(kernel_size, basis)
    return _padded_width(width) if method == "dense" else width


def row_width(kernel_size: Sequence[int], basis: Basis = DEFAULT_BASIS) -> int:
    """Numbers per kernel in the rows of :func:`spectral_rows`: the taps (``rdft``), or twice the bins (``rfft``).

    Example:
        >>> row_width((3, 3), "rdft"), row_width((3, 3), "rfft"), row_width((5, 5), "rfft")
        (9, 12, 30)
    """
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    return math.prod(ks) if basis == "rdft" else 2 * math.prod(spectral_kernel_shape(ks, basis))
