"""Kernels as the transform sees them: the two bases by name, the shapes of their tensors, the dtypes it computes
in, and how each kernel size is transformed. Imports no torch.

``rfft`` stores a weight of shape ``(*lead, *kernel_size)`` as ``(2, *lead, *kernel_size[:-1], kw // 2 + 1)``
(real plane, imaginary plane); ``rdft`` keeps the weight's shape.

Example:
    >>> spectral_shape((8, 3, 3, 3), (3, 3), "rfft")
    (2, 8, 3, 3, 2)
    >>> spatial_shape((2, 8, 3, 3, 2), (3, 3), "rfft")
    (8, 3, 3, 3)
    >>> spectral_shape((8, 3, 5), (5,), "rdft")
    (8, 3, 5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from ..errors import SpectralError

Basis = Literal["rfft", "rdft"]
BASES: tuple[Basis, ...] = ("rfft", "rdft")
DEFAULT_BASIS: Basis = "rfft"

#: how a basis is applied: one product with its dense (taps x taps) matrix, or FFTs axis by axis
Method = Literal["dense", "separable"]
METHODS: tuple[str, ...] = ("dense", "separable")

#: the largest kernel (in taps) transformed by the dense product; larger ones are separable. The dense product is
#: faster for small kernels, about even around this size, and ever slower above it, where its matrix also grows as
#: taps^2 (figures: docs/kernels.md, docs/measurements.md).
DENSE_MAX_TAPS = 512

#: dtypes whose kernels are converted (computed in float32 at least, stored back in the same dtype)
CONVERTIBLE_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


def dtype_name(dtype: object) -> str:
    """torch's name of a dtype without ``torch.`` (``"float32"``), as specs, records and messages write it.

    Example:
        >>> import torch
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def transform_method(kernel_size: Sequence[int]) -> Method:
    """How the bases are applied to kernels of ``kernel_size``: the one rule, so that registration, convert and
    bake give the same numbers.

    Example:
        >>> transform_method((3, 3)), transform_method((31, 31)), transform_method((4096,))
        ('dense', 'separable', 'separable')
    """
    return "dense" if math.prod(kernel_size) <= DENSE_MAX_TAPS else "separable"


def check_method(method: Any, kernel_size: Sequence[int]) -> Method:
    """``method``, or :func:`transform_method`'s when it is ``None``; else raise
    :class:`~spectral_cli.SpectralError`."""
    if method is None:
        return transform_method(kernel_size)
    if method not in METHODS:
        raise SpectralError(f"unknown method {method!r}: use one of {', '.join(repr(m) for m in METHODS)}, or None")
    return method  # type: ignore[no-any-return]


def check_basis(basis: Any) -> Basis:
    """Return ``basis`` if it names a basis, else raise :class:`~spectral_cli.SpectralError`.

    Example:
        >>> check_basis("dct")
        Traceback (most recent call last):
        ...
        spectral_cli.errors.SpectralError: unknown basis 'dct': use one of 'rfft', 'rdft'
    """
    if basis not in BASES:
        raise SpectralError(f"unknown basis {basis!r}: use one of {', '.join(repr(b) for b in BASES)}")
    return basis  # type: ignore[no-any-return]


def check_kernel_size(kernel_size: Any) -> tuple[int, ...]:
    """Return ``kernel_size`` as a tuple of 1 to 3 positive ints, else raise :class:`~spectral_cli.SpectralError`."""
    if isinstance(kernel_size, int) or not isinstance(kernel_size, Sequence) or isinstance(kernel_size, str):
        raise SpectralError(f"kernel_size must be a tuple of 1 to 3 ints such as conv.kernel_size, got {kernel_size!r}")
    ks = tuple(kernel_size)
    if not 1 <= len(ks) <= 3 or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks):
        raise SpectralError(f"kernel_size must be 1 to 3 positive ints, got {kernel_size!r}")
    return ks


def spectral_kernel_shape(kernel_size: tuple[int, ...], basis: Basis) -> tuple[int, ...]:
    """The trailing dims a spectral tensor has for ``kernel_size``."""
    if basis == "rfft":
        return (*kernel_size[:-1], kernel_size[-1] // 2 + 1)
    return kernel_size


def spectral_shape(weight_shape: Sequence[int], kernel_size: tuple[int, ...], basis: Basis) -> tuple[int, ...]:
    """Shape of the spectral tensor that stores a weight of ``weight_shape``."""
    lead = tuple(weight_shape[: len(weight_shape) - len(kernel_size)])
    if basis == "rfft":
        return (2, *lead, *spectral_kernel_shape(kernel_size, basis))
    return (*lead, *kernel_size)


def spatial_shape(stored_shape: Sequence[int], kernel_size: tuple[int, ...], basis: Basis) -> tuple[int, ...]:
    """Shape of the weight a spectral tensor of ``stored_shape`` stands for."""
    lead = tuple(stored_shape[1 if basis == "rfft" else 0 : len(stored_shape) - len(kernel_size)])
    return (*lead, *kernel_size)
