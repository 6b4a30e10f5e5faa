"""Pure functions over state dicts: convert conv kernels to spectral tensors, bake them back, describe.

No model class is needed. Keys follow ``torch.nn.utils.parametrize`` exactly: the spatial ``<mod>.weight``
becomes ``<mod>.parametrizations.weight.original``, so a converted state dict loads with ``strict=True`` into
the model after :func:`~spectral_cli.register_spectral_parametrization`, and a baked one into the plain model.

What was converted is recorded (basis, kernel size, original dtype, tool version) in the state dict's
``_metadata`` attribute, under :data:`METADATA_KEY`: torch keeps that attribute through ``torch.save`` and
``torch.load(weights_only=True)``, and ``load_state_dict`` ignores entries that name no module, so strict
loading is unaffected. Nothing is ever guessed when that record is present.

Example:
    >>> import torch
    >>> from spectral_cli import convert_state_dict, bake_state_dict, register_spectral_parametrization
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1))
    >>> result = convert_state_dict(net.state_dict())
    >>> [c.target_key for c in result.changed], [(s.key, s.reason) for s in result.skipped]
    (['0.parametrizations.weight.original'], [('1.weight', '1x1 kernel')])
    >>> _ = register_spectral_parametrization(net)
    >>> net.load_state_dict(result.state_dict, strict=True)
    <All keys matched successfully>
    >>> sorted(bake_state_dict(result.state_dict).state_dict) == sorted(torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1)).state_dict())
    True
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import __version__
from .bases import DEFAULT_BASIS, Basis, check_basis, spectral_kernel_shape, to_spatial, to_spectral
from .errors import AmbiguousKernelSizeError, SpectralError
from .parametrization import glob_patterns, selected

METADATA_KEY = "spectral_cli"
SPECTRAL_SUFFIX = "parametrizations.weight.original"
COMPRESSAI_SUFFIX = "weight_transformed"

StateDict = Mapping[str, Any]


@dataclass(frozen=True)
class LayerRecord:
    """What is needed to bake a spectral tensor back without guessing."""

    basis: Basis
    kernel_size: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"basis": self.basis, "kernel_size": list(self.kernel_size), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LayerRecord:
        try:
            return cls(check_basis(data["basis"]), tuple(int(k) for k in data["kernel_size"]), str(data["dtype"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SpectralError(f"unreadable spectral_cli record {dict(data)!r}: {e}") from None


@dataclass(frozen=True)
class LayerChange:
    """One tensor converted or baked; ``max_error`` is the relative round-trip (convert) or rounding (bake) error."""

    name: str
    source_key: str
    target_key: str
    basis: Basis
    kernel_size: tuple[int, ...]
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    dtype: str
    max_error: float
    inferred: bool = False

    @property
    def params_before(self) -> int:
        return math.prod(self.shape_before)

    @property
    def params_after(self) -> int:
        return math.prod(self.shape_after)


@dataclass(frozen=True)
class Skipped:
    """A tensor left as it was, and why (``"1x1 kernel"``, ``"excluded"``, ``"already spectral"`` ...)."""

    key: str
    reason: str


@dataclass(frozen=True)
class SurgeryResult:
    """The new state dict (input untouched), what changed, what was skipped, and the records it carries."""

    state_dict: OrderedDict[str, Any]
    changed: tuple[LayerChange, ...]
    skipped: tuple[Skipped, ...]
    records: dict[str, LayerRecord]


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a state dict as :func:`describe_state_dict` sees it.

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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _module_name(key: str, suffix: str) -> str:
    return key[: -len(suffix)].removesuffix(".")


def _is_conv_kernel(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and 3 <= value.dim() <= 5


def records_of(state_dict: StateDict) -> dict[str, LayerRecord]:
    """The spectral records a state dict carries in ``_metadata`` (empty if none)."""
    meta = getattr(state_dict, "_metadata", None) or {}
    entry = meta.get(METADATA_KEY) if isinstance(meta, Mapping) else None
    if not isinstance(entry, Mapping):
        return {}
    layers = entry.get("layers", {})
    return {str(k): LayerRecord.from_json(v) for k, v in layers.items()} if isinstance(layers, Mapping) else {}


def _with_records(state_dict: OrderedDict[str, Any], source: StateDict, records: dict[str, LayerRecord]) -> None:
    meta = OrderedDict(getattr(source, "_metadata", None) or {})
    meta.pop(METADATA_KEY, None)
    if records:
        meta[METADATA_KEY] = {"version": __version__, "layers": {k: r.to_json() for k, r in records.items()}}
    if meta:
        state_dict._metadata = meta  # type: ignore[attr-defined]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected64 = expected.detach().to(torch.float64)
    diff = (actual.detach().to(torch.float64) - expected64).abs().max().item()
    scale = expected64.abs().max().item()
    return diff / scale if scale > 0 else diff


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


def convert_state_dict(
    state_dict: StateDict,
    *,
    basis: Basis = DEFAULT_BASIS,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> SurgeryResult:
    """Turn every conv kernel ``<mod>.weight`` into ``<mod>.parametrizations.weight.original``.

    A conv kernel is a floating-point ``weight`` of rank 3 to 5 with more than one spatial tap; ``include`` /
    ``exclude`` globs on module names refine that. Each converted tensor is baked back and compared
    (``max_error``). Layers already spectral are skipped, so converting twice changes nothing.
    """
    basis = check_basis(basis)
    inc, exc = glob_patterns(include, "include"), glob_patterns(exclude, "exclude")
    records = records_of(state_dict)
    out: OrderedDict[str, Any] = OrderedDict()
    changed, skipped = [], []
    for key, value in state_dict.items():
        if key.endswith(SPECTRAL_SUFFIX) and key in records:
            skipped.append(Skipped(key, "already spectral"))
        if not (key == "weight" or key.endswith(".weight")) or not _is_conv_kernel(value):
            out[key] = value
            continue
        name = _module_name(key, "weight")
        target = f"{name}.{SPECTRAL_SUFFIX}" if name else SPECTRAL_SUFFIX
        ks = tuple(value.shape[2:])
        reason = None
        if not selected(name, inc, exc):
            reason = "excluded"
        elif not value.is_floating_point():
            reason = f"not float ({dtype_name(value.dtype)})"
        elif math.prod(ks) == 1:
            reason = "1x1 kernel"
        elif target in state_dict:
            raise SpectralError(f"{key} and {target} are both present: the state dict is half converted")
        if reason is not None:
            skipped.append(Skipped(key, reason))
            out[key] = value
            continue
        spectral = to_spectral(value.detach(), ks, basis)
        out[target] = spectral
        records[target] = LayerRecord(basis, ks, dtype_name(value.dtype))
        error = _relative_error(to_spatial(spectral, ks, basis), value)
        changed.append(
            LayerChange(
                name, key, target, basis, ks, tuple(value.shape), tuple(spectral.shape), dtype_name(value.dtype), error
            )
        )
    _with_records(out, state_dict, records)
    return SurgeryResult(out, tuple(changed), tuple(skipped), records)


def _spectral_entry(
    key: str, value: Any, records: Mapping[str, LayerRecord], kernel_size: tuple[int, ...] | None
) -> tuple[str, LayerRecord, torch.Tensor, bool] | None:
    """(module name, record, real tensor, inferred) for a tensor that is spectral, else ``None``."""
    if not isinstance(value, torch.Tensor):
        return None
    if key.endswith(COMPRESSAI_SUFFIX) and value.is_complex() and 3 <= value.dim() <= 5:
        real = torch.stack((value.real, value.imag))
    elif key.endswith(SPECTRAL_SUFFIX) and (key in records or (value.is_floating_point() and value.shape[0] == 2)):
        real = value
    else:
        return None
    suffix = COMPRESSAI_SUFFIX if key.endswith(COMPRESSAI_SUFFIX) else SPECTRAL_SUFFIX
    if key in records:
        return _module_name(key, suffix), records[key], real, False
    if 4 <= real.dim() <= 6:
        # A given kernel size is used where it fits the shape; other layers are inferred (never left unbaked).
        ks = tuple(kernel_size) if kernel_size is not None else ()
        given = len(ks) == real.dim() - 3 and tuple(real.shape[-len(ks) :]) == spectral_kernel_shape(ks, "rfft")
        if not given:
            ks = infer_kernel_size(key, tuple(real.shape))
        if tuple(real.shape[-len(ks) :]) == spectral_kernel_shape(ks, "rfft"):
            return _module_name(key, suffix), LayerRecord("rfft", ks, dtype_name(real.dtype)), real, not given
    return None


def bake_state_dict(
    state_dict: StateDict,
    *,
    kernel_size: tuple[int, ...] | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> SurgeryResult:
    """Turn every spectral tensor back into a spatial ``<mod>.weight`` in its original dtype.

    Tensors recorded by :func:`convert_state_dict` are baked from their record. Without one (checkpoints of
    pytorch-parametrizations 1.0.0: ``<mod>.parametrizations.weight.original`` of shape ``(2, O, I, kh, b)``;
    CompressAI ``SpectralConv2d``: complex ``<mod>.weight_transformed``) the ``rfft`` layout is assumed and
    a square kernel inferred when the shape allows only that, else ``kernel_size`` must be given
    (:class:`~spectral_cli.AmbiguousKernelSizeError`). A given ``kernel_size`` applies to the record-less
    tensors whose shape it fits; the others are still inferred.
    """
    inc, exc = glob_patterns(include, "include"), glob_patterns(exclude, "exclude")
    records = records_of(state_dict)
    out: OrderedDict[str, Any] = OrderedDict()
    changed, skipped = [], []
    for key, value in state_dict.items():
        entry = _spectral_entry(key, value, records, kernel_size)
        if entry is None:
            out[key] = value
            continue
        name, record, real, inferred = entry
        if not selected(name, inc, exc):
            skipped.append(Skipped(key, "excluded"))
            out[key] = value
            continue
        target = f"{name}.weight" if name else "weight"
        if target in state_dict:
            raise SpectralError(f"{key} and {target} are both present: the state dict is half baked")
        dtype = getattr(torch, record.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise SpectralError(f"{key}: unknown dtype {record.dtype!r} in its record")
        exact = to_spatial(real.detach().to(torch.float64), record.kernel_size, record.basis)
        weight = to_spatial(real.detach(), record.kernel_size, record.basis).to(dtype)
        out[target] = weight
        records.pop(key, None)
        changed.append(
            LayerChange(
                name,
                key,
                target,
                record.basis,
                record.kernel_size,
                tuple(value.shape),
                tuple(weight.shape),
                record.dtype,
                _relative_error(weight, exact),
                inferred,
            )
        )
    _with_records(out, state_dict, records)
    return SurgeryResult(out, tuple(changed), tuple(skipped), records)


def describe_state_dict(state_dict: StateDict, *, include_spatial: bool = True) -> list[LayerInfo]:
    """List the parametrized layers of a state dict and, with ``include_spatial``, its convertible kernels."""
    records = records_of(state_dict)
    layers = []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        shape, dtype = tuple(value.shape), dtype_name(value.dtype)
        try:
            entry = _spectral_entry(key, value, records, None)
        except AmbiguousKernelSizeError:
            entry = None
        if entry is not None:
            name, record, _, inferred = entry
            layers.append(LayerInfo(name, key, "spectral", record.basis, record.kernel_size, shape, dtype, inferred))
        elif key.endswith("parametrizations.weight.original0") and key[:-1] + "1" in state_dict:
            layers.append(
                LayerInfo(_module_name(key, SPECTRAL_SUFFIX + "0"), key, "weight_norm", None, None, shape, dtype)
            )
        elif ".parametrizations." in f".{key}" and key.rsplit(".", 1)[-1] in ("original", "original0"):
            name = key[: key.rfind("parametrizations.")].removesuffix(".")
            layers.append(LayerInfo(name, key, "parametrized", None, None, shape, dtype))
        elif include_spatial and (key == "weight" or key.endswith(".weight")) and _is_conv_kernel(value):
            if value.is_floating_point() and math.prod(shape[2:]) > 1:
                layers.append(
                    LayerInfo(_module_name(key, "weight"), key, "spatial", None, tuple(shape[2:]), shape, dtype)
                )
    return layers
