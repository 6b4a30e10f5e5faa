"""Which conv kernels are converted: the one rule (used by the registrar, the plans, ``inspect`` and every
message) and the include/exclude globs that select them. Imports no torch.

Example:
    >>> why_not_convertible((3, 3), "float32"), why_not_convertible((3, 3), "float32", selected=False)
    (None, 'excluded')
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence

from ..errors import SpectralError
from ..transform.kernels import CONVERTIBLE_DTYPES

MASKED_REASON = "masked conv (its forward writes weight.data, which a parametrization ignores)"


def why_not_convertible(
    kernel_size: Sequence[int], dtype: str, *, kind: str = "dense", masked: bool = False, selected: bool = True
) -> str | None:
    """``None`` if a conv kernel is converted, else why it is left as it is (the reason every listing shows).

    A kernel is converted when it is selected (``include``/``exclude``), a dense tensor of a float dtype, has more
    than one tap (and no zero-size kernel dimension), and is not masked (CompressAI's ``MaskedConv2d`` writes
    ``weight.data`` in its forward, which a parametrized weight ignores). ``dtype`` is torch's name without
    ``torch.`` (``"float32"``).

    Example:
        >>> why_not_convertible((3, 3), "float32"), why_not_convertible((1, 1), "float32")
        (None, '1x1 kernel')
        >>> why_not_convertible((3, 3), "int8"), why_not_convertible((3, 3), "float32", kind="sparse_coo")
        ('not float (int8)', 'not a dense tensor (sparse_coo)')
        >>> why_not_convertible((3, 3), "float8_e4m3fn")
        'float8 (float8_e4m3fn)'
    """
    if not selected:
        return "excluded"
    if kind != "dense":
        return f"not a dense tensor ({kind})"
    if dtype.startswith("float8"):  # a float, but not one torch computes in: named apart, as a cast fixes it
        return f"float8 ({dtype})"
    if dtype not in CONVERTIBLE_DTYPES:
        return f"not float ({dtype})"
    if math.prod(kernel_size) == 0:
        return "empty kernel (a zero-size kernel dimension)"
    if math.prod(kernel_size) == 1:
        return "1x1 kernel"
    if masked:
        return MASKED_REASON
    return None


def glob_patterns(value: str | Iterable[str] | None, what: str) -> tuple[str, ...] | None:
    """``include``/``exclude`` as a tuple of glob patterns (a single string is one pattern)."""
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Iterable) else (value,)
    if not all(isinstance(p, str) for p in items):
        raise SpectralError(f"{what} takes glob patterns (str), got {value!r}")
    return items


def selected(name: str, include: tuple[str, ...] | None, exclude: tuple[str, ...] | None) -> bool:
    """Whether a qualified name passes the include/exclude globs (``fnmatch`` rules)."""
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))
