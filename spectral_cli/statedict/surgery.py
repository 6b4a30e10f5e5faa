"""Plans executed on tensors: one implementation, for state dicts in memory and for checkpoint files alike.

:func:`execute` runs one :class:`~spectral_cli.statedict.plan.Step` on a stored tensor (in memory, or in a file:
anything that can :meth:`ReadableTensor.read` its bytes) a slab at a time and gives the result in pieces, which a file
writer writes as they come and :func:`assemble` joins into a tensor. The pure functions below (no model class,
nothing printed, the input untouched) are built on it:

Keys follow ``torch.nn.utils.parametrize`` exactly: the spatial ``<mod>.weight`` becomes
``<mod>.parametrizations.weight.original``, so a converted state dict loads with ``strict=True`` into the model
after :func:`~spectral_cli.register_spectral_parametrization`, and a baked one into the plain model.

What was converted is recorded (basis, kernel size, original dtype, tool version) in the state dict's
``_metadata`` attribute, under :data:`~spectral_cli.statedict.records.METADATA_KEY`: torch keeps that attribute
through ``torch.save`` and ``torch.load(weights_only=True)``, and ``load_state_dict`` ignores entries that name
no module, so strict loading is unaffected. Nothing is ever guessed when that record is present.

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

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .. import __version__
from ..transform.kernels import DEFAULT_BASIS, Basis, dtype_name
from ..transform.slabs import (
    BATCH_BYTES,
    Scratch,
    batch_rows,
    spatial_batch,
    spatial_pieces,
    spectral_batch,
    spectral_pieces,
)
from .keys import TensorSpec
from .plan import LayerInfo, Plan, Skipped, Step, describe, plan_bake, plan_convert
from .records import METADATA_KEY, LayerRecord, parse_records, records_document

StateDict = Mapping[str, Any]

#: what :func:`execute` gives: the result in pieces ``(byte offset, piece)``, then (returned) the change made
Changes = Generator[tuple[int, torch.Tensor], None, "LayerChange"]


@dataclass(frozen=True)
class LayerChange(Step):
    """A :class:`~spectral_cli.statedict.plan.Step` done: the tensor converted or baked, with ``max_error`` the
    relative round-trip (convert) or rounding (bake) error measured."""

    max_error: float = field(kw_only=True)

    @classmethod
    def of(cls, step: Step, max_error: float) -> LayerChange:
        """The change that executing ``step`` made, with its measured error."""
        change = object.__new__(cls)  # made per tensor: a frozen __init__ sets each field through object.__setattr__
        change.__dict__.update(step.__dict__, max_error=max_error)
        return change

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


class ReadableTensor(Protocol):
    """A tensor of a checkpoint, read when it is needed."""

    def read(self, offset: int, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor ``out`` with the tensor's bytes from byte ``offset``."""

    def whole(self) -> torch.Tensor:
        """The whole tensor."""


class MemoryTensor:
    """A tensor already in memory, as :class:`ReadableTensor`."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self._bytes: torch.Tensor | None = None

    def read(self, offset: int, out: torch.Tensor) -> None:
        if self._bytes is None:
            if self.tensor.is_quantized:  # torch crashes (SIGSEGV) viewing its bytes
                raise ValueError("a quantized tensor has no bytes to read")
            plain = self.tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
            if plain.numel() == 1 and plain.stride(0) != 1:  # contiguous whatever its stride: view it as such
                plain = plain.as_strided((1,), (1,))
            self._bytes = plain.view(torch.uint8)
        view = out.view(-1).view(torch.uint8)
        view.copy_(self._bytes[offset : offset + view.numel()])

    def whole(self) -> torch.Tensor:
        return self.tensor


def spec_of(tensor: torch.Tensor) -> TensorSpec:
    """Shape, dtype name and kind of a tensor: sparse, nested and meta tensors are marked (carried over, never
    transformed)."""
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


def records_of(state_dict: StateDict, where: str = "state dict") -> dict[str, LayerRecord]:
    """The spectral records a state dict carries in ``_metadata`` (empty if none)."""
    return parse_records(_metadata_of(state_dict).get(METADATA_KEY), where)


def with_records(
    tensors: Mapping[str, Any], records: Mapping[str, LayerRecord], like: StateDict | None = None
) -> OrderedDict[str, Any]:
    """``tensors`` as a state dict carrying ``records`` in ``_metadata`` (besides the other ``_metadata`` of
    ``like``, the state dict it was made from)."""
    out: OrderedDict[str, Any] = OrderedDict(tensors)
    meta = OrderedDict(_metadata_of(like) if like is not None else {})
    meta.pop(METADATA_KEY, None)
    if records:
        meta[METADATA_KEY] = records_document(records, __version__)
    if meta:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def step_input(step: Step, stored: ReadableTensor) -> ReadableTensor:
    """What ``step`` reads: ``stored``, or for CompressAI's complex coefficients their real and imaginary parts,
    as rfft planes."""
    if not step.complex_source:
        return stored
    return MemoryTensor(rfft_planes(stored.whole()))


def rfft_planes(coefficients: torch.Tensor) -> torch.Tensor:
    """Complex rfft coefficients (CompressAI's layout) as this package stores them: real and imaginary planes
    stacked on a new first dim."""
    return torch.stack((coefficients.real, coefficients.imag))


def execute(step: Step, stored: ReadableTensor, scratch: Scratch, *, measure: bool = True) -> Changes:
    """Run ``step`` on ``stored``: the result in pieces (in order; each valid until the next is asked for), then
    the change made, with its error measured as the pieces were made (NaN if not ``measure``: a file's writer
    measures it on what it wrote, :func:`~spectral_cli.files.verify.verify_output`)."""
    stored = step_input(step, stored)
    dtype = getattr(torch, step.dtype)
    if step.action == "convert":
        pieces = spectral_pieces(stored.read, step.shape_before, dtype, step.kernel_size, step.basis, scratch,
                                 measure)  # fmt: skip
    else:
        shape = (2, *step.shape_before) if step.complex_source else step.shape_before
        out_dtype = getattr(torch, step.out_dtype)
        pieces = spatial_pieces(stored.read, shape, dtype, step.kernel_size, step.basis, out_dtype, scratch,
                                measure)  # fmt: skip
    error = yield from pieces
    return LayerChange.of(step, error)


#: steps skipped over while gathering a batch (steps of other kinds between those of its kind) before it stops
_LOOKAHEAD = 256


def _kernels(step: Step) -> int:
    """The kernels of a step's tensor."""
    shape = step.shape_before if step.action == "convert" else step.shape_after
    return math.prod(shape) // math.prod(step.kernel_size)


def batch_key(step: Step) -> tuple[Any, ...] | None:
    """What the steps run in one batch share, or None for a step run alone (:func:`execute`)."""
    if step.complex_source or not batch_rows(_kernels(step), step.kernel_size, getattr(torch, step.dtype)):
        return None
    return step.action, step.kernel_size, step.basis, step.dtype, step.out_dtype


def batch_bytes(step: Step) -> int:
    """What a step of :func:`batch_key` takes of a batch's :data:`~spectral_cli.transform.slabs.BATCH_BYTES`: its
    padded rows of kernels, at 8 bytes a number (the widest buffers of a batch hold about that)."""
    return batch_rows(_kernels(step), step.kernel_size, getattr(torch, step.dtype)) * math.prod(step.kernel_size) * 8


class Batches:
    """Steps executed as a writer asks for them, those on small tensors several at once: a tensor of a few kernels
    costs far more in Python and torch calls than in arithmetic, so the small tensors of the same kind that
    ``order`` lists next (``(step, its tensor)``, the order the writer will ask for them) are read and transformed
    in one product when the first of them is asked for (with the bits of each alone; see
    :func:`~spectral_cli.transform.slabs.spectral_batch`), and handed out as asked. Larger tensors run on their own,
    slab by slab (:func:`execute`). Memory holds a few batches: results not asked for in time are dropped, and
    made again if asked for later.
    """

    def __init__(
        self, scratch: Scratch, order: Iterable[tuple[Step, Callable[[], ReadableTensor]]] = (), *, measure: bool = True
    ) -> None:
        self.scratch, self.measure = scratch, measure
        self._order = list(order)
        self._index = {id(step): i for i, (step, _) in enumerate(self._order)}
        self._done: dict[int, tuple[torch.Tensor, float]] = {}
        self._held = 0

    def execute(self, step: Step, stored: ReadableTensor) -> Changes:
        """:func:`execute` of ``step`` on ``stored``, from a batch where it has one."""
        done = self._done.pop(id(step), None)
        if done is None:
            index = self._index.get(id(step))
            key = batch_key(step) if index is not None else None
            if index is None or key is None:
                return (yield from execute(step, stored, self.scratch, measure=self.measure))
            self._batch(index, key, stored)
            done = self._done.pop(id(step))
        result, error = done
        self._held -= result.numel() * result.element_size()
        if result.numel():
            yield 0, result
        return LayerChange.of(step, error)

    def _batch(self, first: int, key: tuple[Any, ...], stored: ReadableTensor) -> None:
        """Run the step at ``first`` of the order with the next steps of the same ``key`` not yet run."""
        if self._held > 4 * BATCH_BYTES:  # results a writer did not ask for in the order given: made again if asked
            self._done.clear()
            self._held = 0
        action, ks, basis, in_dtype, out_dtype_name = key
        dtype = getattr(torch, in_dtype)
        steps: list[Step] = []
        reads: list[Callable[[int, torch.Tensor], None]] = []
        rows: list[int] = []
        used = skipped = 0
        for i in range(first, len(self._order)):
            step, tensor = self._order[i]
            if i != first and (id(step) in self._done or batch_key(step) != key):
                skipped += 1
                if skipped > _LOOKAHEAD:
                    break
                continue
            size = batch_bytes(step)
            if steps and used + size > BATCH_BYTES:
                break
            used += size
            steps.append(step)
            reads.append((stored if i == first else tensor()).read)
            rows.append(_kernels(step))
        if action == "convert":
            flat, errors = spectral_batch(reads, rows, dtype, ks, basis, self.scratch, self.measure)
        else:
            out_dtype = getattr(torch, out_dtype_name)
            flat, errors = spatial_batch(reads, rows, dtype, ks, basis, out_dtype, self.scratch, self.measure)
        self._held += flat.numel() * flat.element_size()
        per_kernel = flat.numel() // sum(rows)
        offset = 0
        for step, m, error in zip(steps, rows, errors, strict=True):
            self._done[id(step)] = (flat[offset : offset + m * per_kernel], error)
            offset += m * per_kernel


def assemble(step: Step, changes: Changes) -> tuple[torch.Tensor, LayerChange]:
    """The result of :func:`execute` as one tensor, and the change made."""
    result = torch.empty(step.shape_after, dtype=getattr(torch, step.out_dtype))
    flat = result.view(-1).view(torch.uint8) if result.numel() else result
    while True:
        try:
            offset, piece = next(changes)
        except StopIteration as done:
            return result, done.value
        piece_bytes = piece.reshape(-1).view(torch.uint8)
        flat[offset : offset + piece_bytes.numel()] = piece_bytes


def _run(state_dict: StateDict, plan: Plan) -> SurgeryResult:
    steps = {s.source_key: s for s in plan.steps}
    out: OrderedDict[str, Any] = OrderedDict()
    changed = []
    with Scratch() as scratch:
        stored_of = {id(step): MemoryTensor(state_dict[step.source_key]) for step in plan.steps}
        batches = Batches(scratch, [(step, functools.partial(stored_of.__getitem__, id(step))) for step in plan.steps])
        for key, value in state_dict.items():
            step = steps.get(key)
            if step is None:
                out[key] = value
                continue
            tensor, change = assemble(step, batches.execute(step, stored_of[id(step)]))
            out[step.target_key] = tensor.to(value.device)
            changed.append(change)
    return SurgeryResult(with_records(out, plan.records, state_dict), tuple(changed), tuple(plan.skipped), plan.records)


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
    return _run(state_dict, plan)


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
    return _run(state_dict, plan)


def describe_state_dict(state_dict: StateDict, *, include_spatial: bool = True) -> list[LayerInfo]:
    """List the parametrized layers of a state dict and, with ``include_spatial``, its convertible kernels."""
    return describe(specs_of(state_dict), records_of(state_dict), include_spatial=include_spatial)
