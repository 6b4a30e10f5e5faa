"""Names, shapes and records of spectral tensors, and plans over tensor specs. Imports no torch.

A *plan* decides, from each tensor's name, shape and dtype alone, what convert or bake will do: which keys
become which, with which shapes. :mod:`spectral_cli.surgery` executes plans on tensors; streaming writers use
them to lay out an output header before any data is read; ``spectral inspect`` uses them to list a
safetensors file from its header alone.

Example:
    >>> specs = {"conv.weight": TensorSpec((8, 3, 3, 3), "float32"), "conv.bias": TensorSpec((8,), "float32")}
    >>> plan = plan_convert(specs)
    >>> [(s.source_key, s.target_key, s.shape_after) for s in plan.steps]
    [('conv.weight', 'conv.parametrizations.weight.original', (2, 8, 3, 3, 2))]
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Step:
    """One tensor to convert or bake. ``complex_source`` marks CompressAI's complex ``weight_transformed``."""

    name: str
    source_key: str
    target_key: str
    basis: Basis
    kernel_size: tuple[int, ...]
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    dtype: str
    out_dtype: str
    inferred: bool = False
    complex_source: bool = False


@dataclass(frozen=True)
class Skipped:
    """A tensor left as it was, and why (``"1x1 kernel"``, ``"excluded"``, ``"already spectral"`` ...)."""

    key: str
    reason: str


@dataclass
class Plan:
    """What convert or bake will do. ``records`` are those the output carries."""

    steps: list[Step] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    records: dict[str, LayerRecord] = field(default_factory=dict)

    def output_specs(self, specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """The output's tensors, in input order, each step's target where its source was."""
        by_source = {s.source_key: s for s in self.steps}
        out = {}
        for key, spec in specs.items():
            step = by_source.get(key)
            out[step.target_key if step else key] = TensorSpec(step.shape_after, step.out_dtype) if step else spec
        return out


def plan_convert(
    specs: Mapping[str, TensorSpec],
    records: Mapping[str, LayerRecord] | None = None,
    *,
    basis: Basis = DEFAULT_BASIS,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> Plan:
    """Every conv kernel ``<mod>.weight`` (float, rank 3 to 5, more than one tap) to its spectral key."""
    basis = check_basis(basis)
    inc, exc = glob_patterns(include, "include"), glob_patterns(exclude, "exclude")
    plan = Plan(records=dict(records or {}))
    for key, spec in specs.items():
        if key.endswith(SPECTRAL_SUFFIX) and key in plan.records:
            check_record(key, spec, plan.records[key])
            plan.skipped.append(Skipped(key, "already spectral"))
            continue
        if key.endswith((SPECTRAL_SUFFIX, COMPRESSAI_SUFFIX)) and _looks_spectral(key, spec):
            plan.skipped.append(Skipped(key, "already spectral"))
            continue
        if not is_conv_kernel_key(key, spec):
            continue
        name = module_name(key, "weight")
        target = spectral_key(name)
        ks = tuple(spec.shape[2:])
        if not selected(name, inc, exc):
            reason = "excluded"
        elif spec.kind != "dense":
            reason = f"not a dense tensor ({spec.kind})"
        elif spec.dtype not in CONVERTIBLE_DTYPES:
            reason = f"not float ({spec.dtype})"
        elif math.prod(ks) == 1:
            reason = "1x1 kernel"
        elif specs.get(f"{name}.mask" if name else "mask", None) == TensorSpec(spec.shape, spec.dtype):
            reason = MASKED_REASON
        elif target in specs:
            raise SpectralError(f"{key} and {target} are both present: the state dict is half converted")
        else:
            shape_after = spectral_shape(spec.shape, ks, basis)
            plan.steps.append(Step(name, key, target, basis, ks, spec.shape, shape_after, spec.dtype, spec.dtype))
            plan.records[target] = LayerRecord(basis, ks, spec.dtype)
            continue
        plan.skipped.append(Skipped(key, reason))
    return plan


def _looks_spectral(key: str, spec: TensorSpec) -> bool:
    """A record-less tensor in a foreign spectral layout (pytorch-parametrizations, CompressAI)."""
    try:
        return spectral_step(key, spec, {}) is not None
    except AmbiguousKernelSizeError:
        return True  # the shape of an rfft tensor, only its kernel size is unknown


def spectral_step(
    key: str,
    spec: TensorSpec,
    records: Mapping[str, LayerRecord],
    kernel_size: tuple[int, ...] | None = None,
) -> Step | None:
    """The bake step for ``key`` if it holds a spectral tensor (recorded, or in a foreign rfft layout)."""
    if spec.kind != "dense":
        return None
    complex_source = key.endswith(COMPRESSAI_SUFFIX) and spec.dtype in COMPLEX_DTYPES and 3 <= len(spec.shape) <= 5
    if complex_source:
        shape = (2, *spec.shape)
        dtype = "float32" if spec.dtype == "complex64" else "float64"
        name = module_name(key, COMPRESSAI_SUFFIX)
    elif key.endswith(SPECTRAL_SUFFIX) and (
        key in records or (spec.dtype in CONVERTIBLE_DTYPES and spec.shape[:1] == (2,))
    ):
        shape, dtype, name = spec.shape, spec.dtype, module_name(key, SPECTRAL_SUFFIX)
    else:
        return None
    record = records.get(key)
    inferred = False
    if record is not None:
        check_record(key, TensorSpec(shape, dtype), record)
    else:
        if not 4 <= len(shape) <= 6:
            return None
        ks = tuple(kernel_size) if kernel_size is not None else ()
        given = len(ks) == len(shape) - 3 and tuple(shape[-len(ks) :]) == spectral_kernel_shape(ks, "rfft")
        if not given:
            ks = infer_kernel_size(key, shape)
        if tuple(shape[-len(ks) :]) != spectral_kernel_shape(ks, "rfft"):
            return None
        record, inferred = LayerRecord("rfft", ks, dtype), not given
    after = spatial_shape(shape, record.kernel_size, record.basis)
    return Step(name, key, weight_key(name), record.basis, record.kernel_size, spec.shape, after, dtype, record.dtype,
                inferred, complex_source)  # fmt: skip


def plan_bake(
    specs: Mapping[str, TensorSpec],
    records: Mapping[str, LayerRecord] | None = None,
    *,
    kernel_size: tuple[int, ...] | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> Plan:
    """Every spectral tensor back to ``<mod>.weight`` in its original dtype."""
    inc, exc = glob_patterns(include, "include"), glob_patterns(exclude, "exclude")
    plan = Plan(records=dict(records or {}))
    for key, spec in specs.items():
        step = spectral_step(key, spec, plan.records, kernel_size)
        if step is None:
            continue
        if not selected(step.name, inc, exc):
            plan.skipped.append(Skipped(key, "excluded"))
            continue
        if step.target_key in specs:
            raise SpectralError(f"{key} and {step.target_key} are both present: the state dict is half baked")
        plan.steps.append(step)
        plan.records.pop(key, None)
    return plan


@dataclass(frozen=True)
class LayerInfo:
    """One layer as ``describe`` sees it.

    ``domain`` is ``"spectral"``, ``"spatial"`` (a convertible conv kernel), ``"weight_norm"`` or
    ``"parametrized"`` (another or unknown parametrization). ``inferred`` marks a spectral layer whose kernel
    size was read from its shape (no record): a square kernel, the only consistent guess.
    """

    name: str
    key: str
    domain: str
    basis: str | None
    kernel_size: tuple[int, ...] | None
    shape: tuple[int, ...]
    dtype: str
    inferred: bool = False

    @property
    def params(self) -> int:
        return math.prod(self.shape)


def describe(
    specs: Mapping[str, TensorSpec], records: Mapping[str, LayerRecord] | None = None, *, include_spatial: bool = True
) -> list[LayerInfo]:
    """The parametrized layers and, with ``include_spatial``, the convertible conv kernels."""
    records = records or {}
    layers = []
    for key, spec in specs.items():
        try:
            step = spectral_step(key, spec, records)
        except AmbiguousKernelSizeError:
            step = None
        if step is not None:
            layers.append(LayerInfo(step.name, key, "spectral", step.basis, step.kernel_size, spec.shape, spec.dtype,
                                    step.inferred))  # fmt: skip
        elif key.endswith(SPECTRAL_SUFFIX + "0") and key[:-1] + "1" in specs:
            name = module_name(key, SPECTRAL_SUFFIX + "0")
            layers.append(LayerInfo(name, key, "weight_norm", None, None, spec.shape, spec.dtype))
        elif ".parametrizations." in f".{key}" and key.rsplit(".", 1)[-1] in ("original", "original0"):
            name = key[: key.rfind("parametrizations.")].removesuffix(".")
            layers.append(LayerInfo(name, key, "parametrized", None, None, spec.shape, spec.dtype))
        elif include_spatial and is_conv_kernel_key(key, spec):
            if spec.kind == "dense" and spec.dtype in CONVERTIBLE_DTYPES and math.prod(spec.shape[2:]) > 1:
                name = module_name(key, "weight")
                layers.append(LayerInfo(name, key, "spatial", None, tuple(spec.shape[2:]), spec.shape, spec.dtype))
    return layers
