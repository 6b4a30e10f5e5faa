"""Names, shapes and records of spectral tensors, from tensor specs alone. Imports no torch.

The vocabulary of :mod:`spectral_cli.plan`: tensor specs (shape and dtype, as a safetensors header gives
them), the records a converted file keeps of each layer, the shapes of each basis, key names and globs.

Example:
    >>> spectral_shape((8, 3, 3, 3), (3, 3), "rfft")
    (2, 8, 3, 3, 2)
    >>> spectral_key("conv")
    'conv.parametrizations.weight.original'
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import AmbiguousKernelSizeError, CheckpointError, SpectralError

Basis = Literal["rfft", "rdft"]
BASES: tuple[str, ...] = ("rfft", "rdft")
DEFAULT_BASIS: Basis = "rfft"

METADATA_KEY = "spectral_cli"
SPECTRAL_SUFFIX = "parametrizations.weight.original"
COMPRESSAI_SUFFIX = "weight_transformed"

#: dtypes whose kernels are converted (computed in float32 at least, stored back in the same dtype)
MASKED_REASON = "masked conv (its forward writes weight.data, which a parametrization ignores)"
CONVERTIBLE_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
COMPLEX_DTYPES = frozenset({"complex64", "complex128"})
#: safetensors dtype codes -> torch dtype names
SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
ITEMSIZE = {"bool": 1, "uint8": 1, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint16": 2, "int16": 2,
            "float16": 2, "bfloat16": 2, "uint32": 4, "int32": 4, "float32": 4, "uint64": 8, "int64": 8,
            "float64": 8, "complex64": 8, "complex128": 16}  # fmt: skip


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


@dataclass(frozen=True)
class LayerRecord:
    """What is needed to bake a spectral tensor back without guessing."""

    basis: Basis
    kernel_size: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"basis": self.basis, "kernel_size": list(self.kernel_size), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Any) -> LayerRecord:
        try:
            record = cls(check_basis(data["basis"]), check_kernel_size(data["kernel_size"]), str(data["dtype"]))
        except (KeyError, TypeError, SpectralError) as e:
            raise CheckpointError(f"unreadable spectral_cli record {data!r}: {e}"[:300]) from None
        if record.dtype not in CONVERTIBLE_DTYPES:
            raise CheckpointError(f"unreadable spectral_cli record {data!r}: dtype {record.dtype!r}"[:300])
        return record

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a stored tensor of ``shape`` can be a conv kernel's coefficients in this record's layout."""
        k = len(self.kernel_size)
        lead = 3 if self.basis == "rfft" else 2  # (2,) for rfft, then (out, in)
        return (
            len(shape) == k + lead
            and (self.basis != "rfft" or shape[0] == 2)
            and tuple(shape[-k:]) == spectral_kernel_shape(self.kernel_size, self.basis)
        )


def check_record(key: str, spec: TensorSpec, record: LayerRecord) -> None:
    """Refuse a record that does not fit its tensor (a damaged or edited checkpoint): nothing is guessed."""
    if not record.fits(spec.shape):
        raise CheckpointError(
            f"{key}: its spectral_cli record ({record.basis}, kernel size {record.kernel_size}) does not fit its "
            f"shape {spec.shape}; the record is damaged"
        )


def records_from_json(entry: Any) -> dict[str, LayerRecord]:
    """Records from the ``{"version": ..., "layers": {key: record}}`` document."""
    layers = entry.get("layers") if isinstance(entry, Mapping) else None
    if not isinstance(layers, Mapping):
        return {}
    records = {}
    for key, value in layers.items():
        try:
            records[str(key)] = LayerRecord.from_json(value)
        except CheckpointError as e:
            raise CheckpointError(f"{key}: {e}") from None
    return records


def records_to_json(records: Mapping[str, LayerRecord], version: str) -> dict[str, Any]:
    return {"version": version, "layers": {k: r.to_json() for k, r in records.items()}}


def check_basis(basis: str) -> Basis:
    """Return ``basis`` if it names a basis, else raise :class:`SpectralError`."""
    if basis not in BASES:
        raise SpectralError(f"unknown basis {basis!r}: use one of {', '.join(repr(b) for b in BASES)}")
    return basis  # type: ignore[return-value]


def check_kernel_size(kernel_size: Any) -> tuple[int, ...]:
    """Return ``kernel_size`` as a tuple of 1 to 3 positive ints, else raise :class:`SpectralError`."""
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


def module_name(key: str, suffix: str) -> str:
    return key[: -len(suffix)].removesuffix(".")


def weight_key(name: str) -> str:
    return f"{name}.weight" if name else "weight"


def spectral_key(name: str) -> str:
    return f"{name}.{SPECTRAL_SUFFIX}" if name else SPECTRAL_SUFFIX


def is_conv_kernel_key(key: str, spec: TensorSpec) -> bool:
    """A ``weight`` of rank 3 to 5: the shape of a 1-D to 3-D conv kernel."""
    return (key == "weight" or key.endswith(".weight")) and 3 <= len(spec.shape) <= 5


def infer_kernel_size(key: str, shape: tuple[int, ...], basis: Basis = "rfft") -> tuple[int, ...]:
    """Kernel size of a spectral tensor without a record: exact for ``rdft``; a square kernel for ``rfft``.

    An ``rfft`` tensor's last dim ``b`` stands for a kernel width of ``2b - 2`` or ``2b - 1``; only a square
    (or cubic) kernel consistent with the other dims is accepted, otherwise the caller must say.
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
