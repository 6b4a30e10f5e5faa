"""Every written value checked before the rename: the output read back from the file system by the strict reader
of its format (the one every input goes through) and compared with the input it was made from.

* names, shapes, dtypes and spectral records: exactly the plan's (and, in a torch file, the order of the keys
  and every other entry of the container);
* a tensor carried over: the same bytes, compared slab by slab;
* a converted tensor: the written coefficients baked back (``to_spatial``, rounded to the kernel's dtype) against
  the input kernel. This is the round-trip error the report shows: measured on what was written;
* a baked tensor: the written kernel against the float64 synthesis of the input's coefficients (its rounding);
* the other files of a model directory: the same bytes.

An error above :data:`ROUND_TRIP_BOUND` of its dtype, or NaN where the input holds none, is a value that was not
written as computed. Any difference is a :class:`~spectral_cli.errors.CheckpointError` naming the target, and
nothing is renamed into place. Memory stays near a few slabs (a torch file is loaded whole, as it was read).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import CheckpointError
from ..statedict.keys import ITEMSIZE, TensorSpec
from ..statedict.plan import Plan, Step
from ..statedict.surgery import ReadableTensor, batch_bytes, batch_key, step_input
from ..transform.slabs import BATCH_BYTES, Scratch, synthesis_error, synthesis_errors
from .checkpoint import Source, StoredStateDict, read_back_differs
from .formats import INDEX_SUFFIX, MODEL_DIR
from .registry import open_source
from .syscalls import SYSCALLS, Syscalls

#: the largest relative error a written tensor may show, per dtype: 64 units of its rounding. Far above what the
#: transforms lose (a few units, see docs/kernels.md), far below what a wrong byte does
ROUND_TRIP_BOUND: dict[str, float] = {
    name: 64 * torch.finfo(getattr(torch, name)).eps for name in ("float16", "bfloat16", "float32", "float64")
}
#: bytes of each side compared at once
_CHUNK = 8 << 20
#: tensors of the output looked at together (small ones among them compared in batches), and the largest tensor
#: carried over that is compared with others in one comparison
_GROUP = 4096
_SMALL = 1 << 16


@dataclass
class Verified:
    """What was read back: the number of tensors compared, and each transformed tensor's error measured on the
    written values, by ``(location, source key)``."""

    tensors: int = 0
    errors: dict[tuple[str, str], float] = field(default_factory=dict)


def verify_output(
    src: Source,
    written: Path,
    plans: Sequence[tuple[StoredStateDict, Plan]],
    target: Path,
    scratch: Scratch,
    *,
    dropped: Sequence[str] = (),
    replaced: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    syscalls: Syscalls = SYSCALLS,
) -> Verified:
    """Read the output at ``written`` (the finished temporary of ``target``) back and compare it with ``src``,
    from which it was made by ``plans``; ``dropped``: container entries left out on purpose; ``replaced``: those
    written with other values on purpose (converted optimizer state), as they were written."""
    verified = Verified()
    scratch.release()  # the writer's buffers: those of this pass have other sizes

    def differs(what: str) -> CheckpointError:
        return read_back_differs(target, what)

    # a bake's float64 reference slabs are 2-4x the writer's: a quarter of its slab size keeps fewer in flight
    wide = Scratch(max(1, scratch.slab_bytes // 4), scratch.workers)
    with wide, contextlib.closing(open_source(written, trust_pickle=trust_pickle, syscalls=syscalls)) as out:
        for (part, plan), back in _pairs(plans, out.parts, differs):
            _check_names(part, plan, back, differs)
            steps = {s.target_key: s for s in plan.steps}
            items = list(back.specs.items())
            for begin in range(0, len(items), _GROUP):
                failure = _check_tensors(part, back, steps, items[begin : begin + _GROUP], scratch, wide, verified)
                if failure is not None:
                    raise differs(failure)
                verified.tensors += len(items[begin : begin + _GROUP])
        _check_container(getattr(src, "obj", None), getattr(out, "obj", None), plans, dropped, differs, replaced or {})
        if src.format == MODEL_DIR:
            _check_files(src.path, written, getattr(src, "others", []), getattr(out, "others", []), differs)
    return verified


def _check_tensors(
    part: StoredStateDict,
    back: StoredStateDict,
    steps: Mapping[str, Step],
    items: Sequence[tuple[str, TensorSpec]],
    scratch: Scratch,
    wide: Scratch,
    verified: Verified,
) -> str | None:
    """Compare the written tensors ``items`` (in the output's order) with the input: the first that differs (what
    to say of it), or None, with the errors of those transformed in ``verified``. Small tensors are compared
    several at once (tensors of a few kernels cost far more in calls than in arithmetic): transformed ones of the
    same kind in one product, with the figures each would get alone; carried ones in one comparison of bytes."""
    failures: dict[int, str] = {}
    batches: dict[tuple[Any, ...], list[int]] = {}
    carried: list[int] = []
    for i, (key, spec) in enumerate(items):
        step = steps.get(key)
        kind = batch_key(step) if step is not None else None
        if kind is not None:
            batches.setdefault(kind, []).append(i)
        elif step is None and spec.kind == "dense" and spec.dtype in ITEMSIZE and not spec.dtype.startswith("q") \
                and spec.nbytes <= _SMALL:  # fmt: skip
            carried.append(i)
        elif step is None:
            if not _same(part.tensor(key), back.tensor(key), spec, scratch):
                failures[i] = key
        else:
            error = _measured(step, part.tensor(step.source_key), back.tensor(key), scratch, wide)
            if not _within_bound(step, error, part.tensor(step.source_key)):
                failures[i] = f"{key}: error {error:.1e}"
            verified.errors[part.label, step.source_key] = error
    for indices in batches.values():
        for group in _budgeted(indices, lambda i: batch_bytes(steps[items[i][0]])):
            group_steps = [steps[items[i][0]] for i in group]
            errors = _measured_batch(group_steps, part, [back.tensor(items[i][0]) for i in group])
            for i, step, error in zip(group, group_steps, errors, strict=True):
                if not _within_bound(step, error, part.tensor(step.source_key)):
                    failures[i] = f"{items[i][0]}: error {error:.1e}"
                verified.errors[part.label, step.source_key] = error
    for group in _budgeted(carried, lambda i: items[i][1].nbytes):
        failures.update((i, items[i][0]) for i in _carried_differ(part, back, [items[i] for i in group], group))
    return failures[min(failures)] if failures else None


def _budgeted(indices: list[int], size: Any) -> Iterator[list[int]]:
    """``indices`` in runs of at most :data:`BATCH_BYTES` by ``size(i)`` (at least one each)."""
    group: list[int] = []
    used = 0
    for i in indices:
        n = size(i)
        if group and used + n > BATCH_BYTES:
            yield group
            group, used = [], 0
        group.append(i)
        used += n
    if group:
        yield group


def _measured_batch(steps: Sequence[Step], part: StoredStateDict, written: Sequence[ReadableTensor]) -> list[float]:
    """:func:`_measured` of several small tensors of one kind at once, with the same figures."""
    first = steps[0]
    ks, basis = first.kernel_size, first.basis
    sources = [part.tensor(step.source_key).read for step in steps]
    back = [stored.read for stored in written]
    if first.action == "convert":
        rows = [math.prod(step.shape_before) // math.prod(ks) for step in steps]
        return synthesis_errors(back, rows, getattr(torch, first.out_dtype), ks, basis, sources,
                                getattr(torch, first.dtype), exact=False)  # fmt: skip
    rows = [math.prod(step.shape_after) // math.prod(ks) for step in steps]
    return synthesis_errors(sources, rows, getattr(torch, first.dtype), ks, basis, back,
                            getattr(torch, first.out_dtype), exact=True)  # fmt: skip


def _carried_differ(
    part: StoredStateDict, back: StoredStateDict, items: Sequence[tuple[str, TensorSpec]], indices: Sequence[int]
) -> list[int]:
    """Of small tensors carried over (``items``, at ``indices``), those whose written bytes differ: all read into
    two buffers and compared at once, one by one only when they differ."""
    sizes = [spec.nbytes for _, spec in items]
    offsets = list(itertools.accumulate(sizes, initial=0))
    x, y = torch.empty(offsets[-1], dtype=torch.uint8), torch.empty(offsets[-1], dtype=torch.uint8)
    for (key, _), (start, end) in zip(items, itertools.pairwise(offsets), strict=True):
        if end > start:
            part.tensor(key).read(0, x[start:end])
            back.tensor(key).read(0, y[start:end])
    if torch.equal(x, y):
        return []
    bounds = zip(indices, itertools.pairwise(offsets), strict=True)
    return [i for i, (start, end) in bounds if not torch.equal(x[start:end], y[start:end])]


def _pairs(
    plans: Sequence[tuple[StoredStateDict, Plan]], parts: Sequence[StoredStateDict], differs: Any
) -> list[tuple[Any, StoredStateDict]]:
    """Each input state dict with its written one: by location, or the only one with the only one (a state dict of
    a container written alone, as safetensors)."""
    if len(plans) == 1 and len(parts) == 1:
        return [(plans[0], parts[0])]
    written = {_unit(p.container_keys): p for p in parts}
    if sorted(written) != sorted(_unit(part.container_keys) for part, _ in plans):
        raise differs(f"state dicts at {sorted(written)}")
    return [(planned, written[_unit(planned[0].container_keys)]) for planned in plans]


def _unit(location: tuple[str, ...]) -> tuple[str, ...]:
    """A location with a model directory's unit named by its stem: ``model.safetensors`` written as shards is
    ``model.safetensors.index.json``."""
    if not location:
        return location
    return (location[0].removesuffix(INDEX_SUFFIX).removesuffix(".safetensors"), *location[1:])


def _check_names(part: StoredStateDict, plan: Plan, back: StoredStateDict, differs: Any) -> None:
    expected = plan.output_specs(part.specs)
    if back.specs != expected:
        wrong = sorted(set(back.specs) ^ set(expected)) or [k for k in expected if back.specs.get(k) != expected[k]]
        raise differs(f"tensors {wrong[:3]}")
    if back.records != plan.records:
        raise differs("its spectral records")
    if part.values is not None and back.values is not None:  # a torch file keeps its keys in order
        renamed = {s.source_key: s.target_key for s in plan.steps}
        if list(back.values) != [renamed.get(k, k) for k in part.values]:
            raise differs("the order or the set of its keys")
        for key, value in part.values.items():
            if key not in part.specs and not _equal(value, back.values.get(key)):
                raise differs(key)


def _same(a: ReadableTensor, b: ReadableTensor, spec: TensorSpec, scratch: Scratch) -> bool:
    """The same bytes (a sparse, nested, meta or quantized tensor of a torch file: the same values; torch crashes
    viewing a quantized tensor's bytes)."""
    if spec.kind != "dense" or spec.dtype not in ITEMSIZE or spec.dtype.startswith("q"):  # no bytes to view
        return _equal(a.whole(), b.whole())
    size = spec.nbytes
    with scratch.rows(min(size, _CHUNK), "verify-a") as x, scratch.rows(min(size, _CHUNK), "verify-b") as y:
        for offset in range(0, size, _CHUNK):
            n = min(_CHUNK, size - offset)
            a.read(offset, x[:n])
            b.read(offset, y[:n])
            if not torch.equal(x[:n], y[:n]):
                return False
    return True


def _measured(step: Step, source: ReadableTensor, written: ReadableTensor, scratch: Scratch, wide: Scratch) -> float:
    """The error of a transformed tensor, measured on the written values (see the module's docstring); ``wide``:
    the scratch of a bake's float64 slabs."""
    ks, basis = step.kernel_size, step.basis
    if step.action == "convert":  # the written coefficients baked back, against the input kernel
        return synthesis_error(written.read, step.shape_after, getattr(torch, step.out_dtype), ks, basis,
                               source.read, getattr(torch, step.dtype), scratch, exact=False)  # fmt: skip
    shape = (2, *step.shape_before) if step.complex_source else step.shape_before
    return synthesis_error(step_input(step, source).read, shape, getattr(torch, step.dtype), ks, basis,
                           written.read, getattr(torch, step.out_dtype), wide, exact=True)  # fmt: skip


def _within_bound(step: Step, error: float, source: ReadableTensor) -> bool:
    """Within the bound of the kernel's dtype; NaN only from an input that holds NaN or Inf."""
    dtype = step.dtype if step.action == "convert" else step.out_dtype
    if math.isnan(error):
        return not bool(torch.isfinite(step_input(step, source).whole()).all())
    return error <= ROUND_TRIP_BOUND.get(dtype, ROUND_TRIP_BOUND["float16"])


def _check_container(
    obj: Any,
    back: Any,
    plans: Sequence[tuple[StoredStateDict, Plan]],
    dropped: Sequence[str],
    differs: Any,
    replaced: Mapping[str, Any],
) -> None:
    """A torch file's container: every entry but its state dicts (checked above) and ``dropped``, as it was (or as
    ``replaced`` says)."""
    parts = {part.container_keys for part, _ in plans}
    if not isinstance(obj, Mapping) or not isinstance(back, Mapping) or () in parts:  # a bare state dict
        return
    expected = [k for k in obj if k not in dropped]
    if list(back) != expected:
        raise differs("the entries of its container")
    for key in expected:
        if not any(loc[:1] == (key,) for loc in parts) and not _equal(replaced.get(key, obj[key]), back[key]):
            raise differs(f"the container's {key!r}")


def _check_files(source: Path, written: Path, files: list[Path], back: list[Path], differs: Any) -> None:
    """A model directory's other files: all there, with the same bytes."""
    if sorted(map(str, files)) != sorted(map(str, back)):
        raise differs(f"the files {sorted(set(map(str, files)) ^ set(map(str, back)))[:3]}")
    for relative in files:
        with open(source / relative, "rb") as a, open(written / relative, "rb") as b:
            while True:
                x, y = a.read(_CHUNK), b.read(_CHUNK)
                if x != y:
                    raise differs(str(relative))
                if not x:
                    break


def _equal(a: Any, b: Any) -> bool:
    """The same value, tensors by their values (NaN equal to NaN), containers entry by entry."""
    if isinstance(a, torch.Tensor):
        from .torch_file import same

        return same(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.nn.Module):  # a trusted pickle's module: equal by its class and its state
        return type(a) is type(b) and _equal(a.state_dict(), b.state_dict())
    if type(a).__eq__ is cast(Any, object.__eq__) and hasattr(a, "__dict__"):  # == is identity: compare attributes
        return type(a) is type(b) and hasattr(b, "__dict__") and _equal(vars(a), vars(b))
    try:
        return a is b or bool(a == b) or (a != a and b != b)  # NaN floats
    except Exception:  # values that cannot say (a numpy array's ambiguous truth): not ours to judge
        return True
