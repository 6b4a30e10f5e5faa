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
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import __version__
from .bases import DEFAULT_BASIS, Basis, to_spatial, to_spectral
from .layout import (
    COMPRESSAI_SUFFIX,
    METADATA_KEY,
    SPECTRAL_SUFFIX,
    LayerRecord,
    TensorSpec,
    infer_kernel_size,
    records_from_json,
    records_to_json,
)
from .plan import LayerInfo, Plan, Skipped, Step, describe, plan_bake, plan_convert

__all__ = [
    "COMPRESSAI_SUFFIX",
    "METADATA_KEY",
    "SPECTRAL_SUFFIX",
    "LayerChange",
    "LayerInfo",
    "LayerRecord",
    "Skipped",
    "SurgeryResult",
    "bake_state_dict",
    "bake_tensor",
    "convert_state_dict",
    "convert_tensor",
    "describe_state_dict",
    "dtype_name",
    "infer_kernel_size",
    "records_of",
    "spec_of",
    "specs_of",
]

StateDict = Mapping[str, Any]


@dataclass(frozen=True)
class LayerChange(Step):
    """A :class:`~spectral_cli.plan.Step` done: the tensor converted or baked, with ``max_error`` the relative
    round-trip (convert) or rounding (bake) error measured."""

    max_error: float = field(kw_only=True)

    @classmethod
    def of(cls, step: Step, max_error: float) -> LayerChange:
        """The change that executing ``step`` made, with its measured error."""
        return cls(**{f.name: getattr(step, f.name) for f in fields(step)}, max_error=max_error)

    @property
    def params_before(self) -> int:
        return math.prod(self.shape_before)

    @property
    def params_after(self) -> int:
        return math.prod(self.shape_after)


@dataclass(frozen=True)
class SurgeryResult:
    """The new state dict (input untouched), what changed, what was skipped, and the records it carries."""

    state_dict: OrderedDict[str, Any]
    changed: tuple[LayerChange, ...]
    skipped: tuple[Skipped, ...]
    records: dict[str, LayerRecord]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def spec_of(tensor: torch.Tensor) -> TensorSpec:
    """Shape, dtype name and kind of a tensor: sparse, nested and meta tensors are marked, never transformed."""
    if tensor.is_nested:  # no single shape
        return TensorSpec((), dtype_name(tensor.dtype), "nested")
    if tensor.is_meta:
        kind = "meta"
    elif tensor.layout != torch.strided:
        kind = str(tensor.layout).removeprefix("torch.")
    else:
        kind = "dense"
    return TensorSpec(tuple(tensor.shape), dtype_name(tensor.dtype), kind)


def specs_of(state_dict: StateDict) -> dict[str, TensorSpec]:
    """Shape, dtype name and kind of every tensor in a state dict."""
    return {k: spec_of(v) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def _metadata_of(state_dict: StateDict) -> Mapping[str, Any]:
    """torch's ``_metadata`` of a state dict; empty when absent or not a mapping (a damaged or hostile file)."""
    meta = getattr(state_dict, "_metadata", None)
    return meta if isinstance(meta, Mapping) else {}


def records_of(state_dict: StateDict) -> dict[str, LayerRecord]:
    """The spectral records a state dict carries in ``_metadata`` (empty if none)."""
    return records_from_json(_metadata_of(state_dict).get(METADATA_KEY))


def _with_records(state_dict: OrderedDict[str, Any], source: StateDict, records: dict[str, LayerRecord]) -> None:
    meta = OrderedDict(_metadata_of(source))
    meta.pop(METADATA_KEY, None)
    if records:
        meta[METADATA_KEY] = records_to_json(records, __version__)
    if meta:
        state_dict._metadata = meta  # type: ignore[attr-defined]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected64 = expected.detach().to(torch.float64)
    diff = (actual.detach().to(torch.float64) - expected64).abs().max().item()
    scale = expected64.abs().max().item()
    return diff / scale if scale > 0 else diff


def convert_tensor(step: Step, weight: torch.Tensor) -> tuple[torch.Tensor, LayerChange]:
    """Execute one convert step: the spectral tensor, and the change with its round-trip error."""
    if weight.numel() == 0:  # a conv with no channels: nothing to transform (and torch.fft refuses empty input)
        return weight.new_zeros(step.shape_after), LayerChange.of(step, 0.0)
    spectral = to_spectral(weight.detach(), step.kernel_size, step.basis)
    error = _relative_error(to_spatial(spectral, step.kernel_size, step.basis), weight)
    return spectral, LayerChange.of(step, error)


def bake_tensor(step: Step, stored: torch.Tensor) -> tuple[torch.Tensor, LayerChange]:
    """Execute one bake step: the spatial weight in its original dtype, and the change with its rounding error."""
    real = torch.stack((stored.real, stored.imag)) if step.complex_source else stored.detach()
    if real.numel() == 0:
        return real.new_zeros(step.shape_after, dtype=getattr(torch, step.out_dtype)), LayerChange.of(step, 0.0)
    exact = to_spatial(real.to(torch.float64), step.kernel_size, step.basis)
    weight = to_spatial(real, step.kernel_size, step.basis).to(getattr(torch, step.out_dtype))
    return weight, LayerChange.of(step, _relative_error(weight, exact))


def _execute(state_dict: StateDict, plan: Plan, kind: str) -> SurgeryResult:
    steps = {s.source_key: s for s in plan.steps}
    out: OrderedDict[str, Any] = OrderedDict()
    changed = []
    for key, value in state_dict.items():
        step = steps.get(key)
        if step is None:
            out[key] = value
            continue
        tensor, change = (convert_tensor if kind == "convert" else bake_tensor)(step, value)
        out[step.target_key] = tensor
        changed.append(change)
    _with_records(out, state_dict, plan.records)
    skipped = tuple(plan.skipped)
    return SurgeryResult(out, tuple(changed), skipped, plan.records)


def convert_state_dict(
    state_dict: StateDict,
    *,
    basis: Basis = DEFAULT_BASIS,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> SurgeryResult:
    """Turn every conv kernel ``<mod>.weight`` into ``<mod>.parametrizations.weight.original``.

    A conv kernel is a floating-point ``weight`` of rank 3 to 5 with more than one spatial tap; ``include`` /
    ``exclude`` globs on module names refine that. Masked convs (a ``<mod>.mask`` of the weight's shape, as in
    CompressAI's ``MaskedConv2d``) are skipped: their forward writes ``weight.data``, which a parametrized
    weight ignores. Each converted tensor is baked back and compared (``max_error``). Layers already spectral
    are skipped, so converting twice changes nothing.
    """
    plan = plan_convert(specs_of(state_dict), records_of(state_dict), basis=basis, include=include, exclude=exclude)
    return _execute(state_dict, plan, "convert")


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
    a square kernel inferred when the shape allows only that. A given ``kernel_size`` is used for the layers
    whose shape it fits; any other layer must still be inferable, else
    :class:`~spectral_cli.AmbiguousKernelSizeError` names it.
    """
    plan = plan_bake(specs_of(state_dict), records_of(state_dict), kernel_size=kernel_size, include=include,
                     exclude=exclude)  # fmt: skip
    return _execute(state_dict, plan, "bake")


def describe_state_dict(state_dict: StateDict, *, include_spatial: bool = True) -> list[LayerInfo]:
    """List the parametrized layers of a state dict and, with ``include_spatial``, its convertible kernels."""
    return describe(specs_of(state_dict), records_of(state_dict), include_spatial=include_spatial)
