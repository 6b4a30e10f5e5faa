"""State-dict keys and tensor specs: what a plan knows of a tensor without its data. Imports no torch.

Keys follow ``torch.nn.utils.parametrize``: the spatial ``<mod>.weight`` of a registered conv is stored as
``<mod>.parametrizations.weight.original``. CompressAI's ``SpectralConv2d`` stores a complex
``<mod>.weight_transformed``.

Example:
    >>> spectral_key("enc.0"), weight_key("")
    ('enc.0.parametrizations.weight.original', 'weight')
    >>> TensorSpec((8, 3, 3, 3), "float32").nbytes
    864
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import AmbiguousKernelSizeError, SpectralError
from ..transform.kernels import Basis

SPECTRAL_SUFFIX = "parametrizations.weight.original"
COMPRESSAI_SUFFIX = "weight_transformed"
COMPLEX_DTYPES = frozenset({"complex64", "complex128"})

#: bytes per element of each dtype a checkpoint may hold (torch's names); others count as 0 bytes
ITEMSIZE = {"bool": 1, "uint8": 1, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1,
            "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "uint16": 2, "int16": 2, "float16": 2, "bfloat16": 2,
            "uint32": 4, "int32": 4, "float32": 4, "uint64": 8, "int64": 8, "float64": 8, "complex64": 8,
            "complex128": 16, "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape and dtype name (``"float32"``), without its data.

    ``kind`` is ``"dense"`` for an ordinary tensor; otherwise what makes it one that is carried over unchanged,
    never transformed: ``"sparse_coo"`` (or another sparse layout), ``"nested"``, ``"meta"`` (no data).
    """

    shape: tuple[int, ...]
    dtype: str
    kind: str = "dense"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE.get(self.dtype, 0)


def module_name(key: str, suffix: str) -> str:
    return key[: -len(suffix)].removesuffix(".")


def module_of(key: str, suffix: str) -> str | None:
    """The module that ``key`` names ``suffix`` of: ``key`` is ``<module>.<suffix>`` (or ``suffix`` itself, the
    model's own), else None. Names the other keys of this module can be built from, so that a key such as
    ``.weight`` (an empty module name) is never taken for ``weight``.

    Example:
        >>> module_of("enc.0.weight", "weight"), module_of("weight", "weight"), module_of(".weight", "weight")
        ('enc.0', '', None)
    """
    if key == suffix:
        return ""
    if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
        return key[: -len(suffix) - 1]
    return None


def weight_key(name: str) -> str:
    return f"{name}.weight" if name else "weight"


#: the last parts of a kernel's key after its module's name: a plain weight, a parametrized one (spectral,
#: weight_norm's original0/original1), the old hooks' (weight_norm's weight_g/weight_v, spectral_norm's and prune's
#: weight_orig) and the seed package's ``weight_transformed``
_KERNEL_SUFFIXES = (
    "parametrizations.weight.original", "parametrizations.weight.original0", "parametrizations.weight.original1",
    "weight_transformed", "weight_orig", "weight_g", "weight_v", "weight",
)  # fmt: skip


def layer_of(key: str) -> str:
    """The layer a kernel's key belongs to.

    Example:
        >>> [layer_of(k) for k in ("enc.weight", "enc.parametrizations.weight.original1", "1.weight_orig", "w")]
        ['enc', 'enc', '1', 'w']
    """
    for suffix in _KERNEL_SUFFIXES:
        if key == suffix or key.endswith("." + suffix):
            return key.removesuffix(suffix).removesuffix(".") or key
    return key


def spectral_key(name: str) -> str:
    return f"{name}.{SPECTRAL_SUFFIX}" if name else SPECTRAL_SUFFIX


def mask_key(name: str) -> str:
    return f"{name}.mask" if name else "mask"


def is_conv_kernel_key(key: str, spec: TensorSpec) -> bool:
    """A ``weight`` of rank 3 to 5: the shape of a 1-D to 3-D conv kernel."""
    return (key == "weight" or key.endswith(".weight")) and 3 <= len(spec.shape) <= 5


def infer_kernel_size(key: str, shape: tuple[int, ...], basis: Basis = "rfft") -> tuple[int, ...]:
    """Kernel size of a spectral tensor without a record: exact for ``rdft``; a square kernel for ``rfft``.

    An ``rfft`` tensor's last dim ``b`` stands for a kernel width of ``2b - 2`` or ``2b - 1``; only a square
    (or cubic) kernel consistent with the other dims is accepted, otherwise the caller must say.

    Example:
        >>> infer_kernel_size("conv", (2, 8, 4, 5, 3))
        (5, 5)
    """
    k = len(shape) - (3 if basis == "rfft" else 2)
    if not 1 <= k <= 3:
        raise SpectralError(f"{key}: shape {shape} is not a spectral conv kernel of rank 1 to 3")
    if basis == "rdft":
        return shape[-k:]
    *full, half = shape[-k:]
    if k >= 2 and len(set(full)) == 1 and full[0] in (2 * half - 2, 2 * half - 1):
        return (full[0],) * k
    if k == 1 and half == 1:
        return (1,)
    raise AmbiguousKernelSizeError(
        f"{key}: the kernel size of an rfft tensor of shape {shape} cannot be read from its shape "
        f"(the last dim {half} means a width of {2 * half - 2} or {2 * half - 1}); pass the kernel size"
    )


#: prefixes that wrappers add to every key (DDP/DataParallel, torch.compile, Lightning's ``self.model``)
KEY_PREFIXES = ("module.", "_orig_mod.", "model.")


def key_prefix(keys: Iterable[str]) -> str:
    """The wrapper prefix (``module.``, ``_orig_mod.``, ...) shared by every key, possibly nested.

    Example:
        >>> key_prefix(["module._orig_mod.conv.weight", "module._orig_mod.conv.bias"])
        'module._orig_mod.'
    """
    keys = list(keys)
    prefix = ""
    while keys:
        for p in KEY_PREFIXES:
            if all(k.startswith(prefix + p) for k in keys):
                prefix += p
                break
        else:
            return prefix
    return prefix
