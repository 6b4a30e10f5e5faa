"""Convert and bake checkpoint files: the one pipeline behind ``spectral convert`` and ``spectral bake``.

Every input goes the same way, whatever its format::

    source (files.sources: a torch file, a safetensors file, a shard directory)
      -> plan (statedict.plan, from names, specs and records alone)
      -> transform (statedict.surgery.execute: slab by slab, transform.slabs)
      -> sink (files.torch_file: one torch.save; files.safetensors_io / files.shards: streamed)
      -> output (files.atomic: unnamed or hidden, synced; files.verify: read back and compared with the input;
                renamed into place; removed on any failure or signal)

so a tensor gets the same bits whichever path it takes, and a safetensors output holds the same bytes whichever
format its input had. Nothing is printed here: progress is reported through a callback.

Example:
    >>> import pathlib, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> save_file({"conv.weight": torch.randn(4, 3, 3, 3)}, str(d / "m.safetensors"))
    >>> report = convert_file(d / "m.safetensors")
    >>> report.written, report.target.name, [change.target_key for _, change in report.changed]
    (True, 'm.spectral.safetensors', ['conv.parametrizations.weight.original'])
"""

from __future__ import annotations

import contextlib
import functools
import gc
import glob
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import NothingToDoError, RefusedError, SpectralError, in_file
from ..statedict.keys import TensorSpec
from ..statedict.plan import Plan, Skipped, Step, plan_bake, plan_convert, skip_fixes
from ..statedict.records import METADATA_KEY
from ..statedict.surgery import Batches, Changes, LayerChange, assemble, with_records
from ..transform.kernels import DEFAULT_BASIS
from ..transform.slabs import SLAB_BYTES, Scratch
from .atomic import Output
from .formats import (
    DCP,
    MODEL_DIR,
    SAFETENSORS,
    SHARDED,
    TORCH,
    TORCH_SUFFIXES,
    check_output,
    default_output,
    output_format,
    refuse_adapter,
)
from .safetensors_io import WRITEBACK_BYTES, file_metadata, refuse_unstorable, verify_header, write_safetensors
from .sources import Part, Source, open_source
from .syscalls import SYSCALLS, Syscalls
from .verify import Verified, verify_output

#: ``progress(bytes_done, bytes_total, tensors_done, tensors_total)``, called as a safetensors output is written
Progress = Callable[[int, int, int, int], None]

Action = Literal["convert", "bake"]


@dataclass(frozen=True)
class Io:
    """How files are read and written: the system calls (the seam where tests inject faults) and the sizes of
    the pieces: slabs of kernels transformed at once, bytes written between two background syncs."""

    syscalls: Syscalls = SYSCALLS
    slab_bytes: int = SLAB_BYTES
    writeback_bytes: int = WRITEBACK_BYTES


@dataclass(frozen=True)
class Options:
    """What ``convert`` and ``bake`` are asked to do. ``basis``, ``include`` and ``exclude`` choose what convert
    changes; ``kernel_size`` is bake's for record-less tensors whose shape does not tell it."""

    output: Path | str | None = None
    basis: str = DEFAULT_BASIS
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    kernel_size: tuple[int, ...] | None = None
    dry_run: bool = False
    force: bool = False
    trust_pickle: bool = False
    #: write safetensors shards of at most this many bytes, and an index
    max_shard_size: int | None = None
    progress: Progress | None = None
    io: Io = field(default_factory=Io)


@dataclass
class FileReport:
    """What convert or bake did to a file. Each change and skip comes with its location: the container keys of
    the state dict it belongs to (``"state_dict"``; ``""`` for a bare state dict)."""

    source: Path
    target: Path | None
    input_format: str
    output_format: str | None
    changed: list[tuple[str, LayerChange]] = field(default_factory=list)
    skipped: list[tuple[str, Skipped]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    written: bool = False
    #: tensors of the output read back and compared with the input before it was renamed into place
    verified: int = 0
    message: str = ""


def convert_file(source: Path | str, options: Options | None = None) -> FileReport:
    """Convert a checkpoint's conv kernels to spectral tensors and write the result next to it (or to
    ``options.output``). Raises :class:`~spectral_cli.errors.NothingToDoError` if there are none; a file already
    converted gives a report with ``message`` and writes nothing."""
    refuse_adapter(Path(source))
    report = _transform("convert", Path(source), options or Options())
    report.warnings += skip_fixes(skip for _, skip in report.skipped)
    if not report.changed:
        already = [s for _, s in report.skipped if s.reason == "already spectral"]
        if already:
            report.message = f"nothing to convert: {len(already)} layers are already spectral; no file written"
            return report
        raise NothingToDoError(
            f"{source}: no convertible conv kernels (float weights of rank 3 to 5 with more "
            f"than one tap){_skip_summary(report)}; nothing to convert"
        )
    return report


def bake_file(source: Path | str, options: Options | None = None) -> FileReport:
    """Bake every spectral tensor of a checkpoint back to a spatial weight in its original dtype."""
    report = _transform("bake", Path(source), options or Options())
    if not report.changed:
        raise NothingToDoError(f"{source}: no spectral tensors{_skip_summary(report)}; nothing to bake")
    return report


# ---- the pipeline --------------------------------------------------------------------------------------------

#: a step run on its part's tensor: the result in pieces, and the change made
Run = Callable[[Part, Step], Changes]
#: ``tick(nbytes, tensor_done)``: a piece of the output written
Tick = Callable[[int, bool], None]


@dataclass
class Sink:
    """Where the output goes, and how it is written: ``write(output, run, tick)`` writes it and returns the check
    of the finished temporary (run before the rename)."""

    target: Path
    format: str
    directory: bool
    write: Callable[[Output, Run, Tick], Callable[[Path], None]]
    total_bytes: int = 0
    total_tensors: int = 0
    dropped: list[str] = field(default_factory=list)
    #: the steps in the order ``write`` runs them, where it is known (small tensors are then run in batches)
    order: list[tuple[Part, Step]] | None = None


def _transform(action: Action, path: Path, options: Options) -> FileReport:
    with _collector_paused():
        return _transform_file(action, path, options)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a file is converted (restored after). A convert makes a few objects per
    tensor that live to its end (specs, steps, changes), and each full collection walks them all, which for many
    tensors costs more than the reading itself (docs/measurements.md). What it frees it frees by reference
    counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _transform_file(action: Action, path: Path, options: Options) -> FileReport:
    with contextlib.closing(open_source(path, trust_pickle=options.trust_pickle, syscalls=options.io.syscalls)) as src:
        plans = [(part, _planned(action, src.path, part, options)) for part in src.parts]
        report = FileReport(path, None, src.format, None)
        report.skipped = [(part.where, skip) for part, plan in plans for skip in plan.skipped]
        if not any(plan.steps for _, plan in plans):
            return report
        sink = _sink(src, plans, options, "spectral" if action == "convert" else "baked")
        report.target, report.output_format, report.dropped = sink.target, sink.format, sink.dropped
        if sink.dropped:
            report.warnings.append(
                f"dropped optimizer state ({', '.join(sink.dropped)}): it refers to the weights as they were; "
                "rebuild the optimizer after loading"
            )
        check_output(src.inputs(), sink.target, force=options.force, directory=sink.directory)
        with Scratch(options.io.slab_bytes) as scratch:
            asked = sink.order if sink.order is not None and not options.dry_run else [
                (part, step) for part, plan in plans for step in plan.steps]  # fmt: skip
            tensors = [(step, functools.partial(part.tensor, step.source_key)) for part, step in asked]
            batches = Batches(scratch, tensors, measure=options.dry_run)

            def run(part: Part, step: Step) -> Changes:  # a written tensor's error is measured on what was written
                change = yield from batches.execute(step, part.tensor(step.source_key))
                report.changed.append((part.where, change))
                return change

            if options.dry_run:
                for part, plan in plans:
                    for step in plan.steps:
                        assemble(step, run(part, step))
            else:
                io = options.io
                with Output(sink.target, directory=sink.directory, syscalls=io.syscalls, inputs=src.inputs()) as out:
                    verify = sink.write(out, run, _ticker(options.progress, sink))

                    def check(written: Path) -> None:
                        src.check_unchanged()
                        verify(written)
                        verified = verify_output(src, written, plans, sink.target, scratch, dropped=sink.dropped,
                                                 trust_pickle=options.trust_pickle, syscalls=io.syscalls)  # fmt: skip
                        _measured_on_disk(report, verified)

                    out.commit(check)
                report.written = True
    steps = [(part.where, step.source_key) for part, plan in plans for step in plan.steps]
    order = {step: i for i, step in enumerate(steps)}
    report.changed.sort(key=lambda done: order[done[0], done[1].source_key])  # in the input's order
    _warn_nonfinite(report)
    return report


def _measured_on_disk(report: FileReport, verified: Verified) -> None:
    """The report's errors are those measured on the written output (and it says how many tensors were read back)."""
    report.verified = verified.tensors
    report.changed = [
        (where, LayerChange.of(change, verified.errors[where, change.source_key])) for where, change in report.changed
    ]


def _planned(action: Action, path: Path, part: Part, options: Options) -> Plan:
    """The plan of one state dict; a rule it breaks is said of its file (and its place in the file)."""
    try:
        return _plan(action, part, options)
    except SpectralError as e:
        raise in_file(e, f"{path} ({part.where})" if part.where else path) from None


def _plan(action: Action, part: Part, options: Options) -> Plan:
    include, exclude = _prefixed(options.include, part.prefix), _prefixed(options.exclude, part.prefix)
    if action == "bake":
        return plan_bake(part.specs, part.records, kernel_size=options.kernel_size, include=include, exclude=exclude)
    if part.conv_modules is not None:  # a walked module: only its real conv layers
        kernels = {k.removesuffix(".weight") for k in part.specs if k.endswith(".weight")}
        exclude = [*(exclude or []), *(glob.escape(n) for n in sorted(kernels - part.conv_modules))] or None
    return plan_convert(part.specs, part.records, basis=options.basis, include=include, exclude=exclude)  # type: ignore[arg-type]


def _prefixed(patterns: Sequence[str] | None, prefix: str) -> list[str] | None:
    """Globs name layers without the wrapper prefix (``module.``): match them below it."""
    return None if patterns is None else [glob.escape(prefix) + p for p in patterns]


def _sink(src: Source, plans: list[tuple[Part, Plan]], options: Options, tag: str) -> Sink:
    """Choose the output (its name, format and layout) and check that the input can go there."""
    out = None if options.output is None else Path(options.output)
    if src.format == MODEL_DIR:
        return _directory_sink(src, plans, out or default_output(src.path, tag, MODEL_DIR), options)
    sharded_in = src.format == SHARDED
    if options.max_shard_size is not None or (sharded_in and (out is None or out.suffix != ".safetensors")):
        if src.format not in (SAFETENSORS, SHARDED):
            raise RefusedError(f"{src.path}: --max-shard-size writes safetensors shards; it needs a safetensors input")
        if out is not None and output_format(out, SAFETENSORS) != SAFETENSORS:
            raise RefusedError(f"{out}: safetensors shards are written as safetensors; give -o a directory or a "
                               ".safetensors file")  # fmt: skip
        return _shards_sink(src, plans[0], out or default_output(src.path, tag, SHARDED), options)
    if src.format == DCP and (out is None or output_format(out, DCP) == DCP):
        return _dcp_sink(src, plans, out or default_output(src.path, tag, DCP), options)
    target = out or default_output(src.path, tag, output_format(src.path, src.format))
    if output_format(target, src.format) == SAFETENSORS:
        return _safetensors_sink(src, plans, target, options)
    return _torch_sink(src, plans, target, options)


def _produce(part: Part, plan: Plan, run: Run) -> Callable[[str], Any]:
    """The output's tensor of each name: a step's pieces, or the input's tensor carried over."""
    by_target = {s.target_key: s for s in plan.steps}

    def produce(key: str) -> Any:
        step = by_target.get(key)
        return run(part, step) if step is not None else part.tensor(key)

    return produce


def _safetensors_sink(src: Source, plans: list[tuple[Part, Plan]], target: Path, options: Options) -> Sink:
    whole = plans[0][0].location == () or src.format == DCP  # a DCP model's state dict may be written alone
    if len(plans) != 1 or not whole:
        raise RefusedError(f"{target}: safetensors holds only tensors, and {src.path} is a container; write a .pt file")
    part, plan = plans[0]
    if part.values is not None:
        refuse_unstorable(part.values, target)
    specs = _by_name(plan.output_specs(part.specs))
    metadata = file_metadata(src.metadata(), plan.records)

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        header = write_safetensors(output.file(), specs, metadata, _produce(part, plan, run), tick,
                                   options.io.writeback_bytes)  # fmt: skip
        return lambda written: verify_header(written, specs, metadata, target, header)

    return Sink(target, SAFETENSORS, False, write, _total(specs), len(specs), order=_ordered(part, plan, specs))


def _ordered(part: Part, plan: Plan, keys: Iterable[str]) -> list[tuple[Part, Step]]:
    """The steps of ``plan`` in the order of their target ``keys``, as a writer of those keys runs them."""
    by_target = {s.target_key: s for s in plan.steps}
    return [(part, by_target[key]) for key in keys if key in by_target]


def _shards_sink(src: Source, planned: tuple[Part, Plan], target: Path, options: Options) -> Sink:
    from .formats import INDEX_SUFFIX
    from .shards import shard_layout, stem_of, write_shards

    part, plan = planned
    specs = _by_name(plan.output_specs(part.specs))
    source_of = {s.target_key: s.source_key for s in plan.steps}
    owner: dict[str, str] = getattr(src, "owner", {})
    stem = stem_of(src)
    layout = shard_layout(specs, options.max_shard_size, lambda key: owner.get(source_of.get(key, key)), stem)

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        return write_shards(output, layout, specs, src.metadata, plan.records, getattr(src, "index", {}),
                            stem + INDEX_SUFFIX, _produce(part, plan, run), tick,
                            options.io.writeback_bytes)  # fmt: skip

    order = _ordered(part, plan, (key for keys in layout.values() for key in keys))
    return Sink(target, SHARDED, True, write, _total(specs), len(specs), order=order)


def _torch_sink(src: Source, plans: list[tuple[Part, Plan]], target: Path, options: Options) -> Sink:
    from .torch_file import optimizer_keys, set_at, write_torch

    if src.format == SHARDED:
        raise RefusedError(f"{target}: safetensors shards are written as safetensors; give -o a directory or a "
                           ".safetensors file")  # fmt: skip
    if src.format == DCP:
        raise RefusedError(f"{target}: a distributed checkpoint is written as one (give -o a directory) or, one state "
                           "dict of it, as .safetensors")  # fmt: skip
    container = getattr(src, "obj", None)
    dropped = optimizer_keys(container)

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        obj = container
        for part, plan in plans:
            steps = {s.source_key: s for s in plan.steps}
            tensors: dict[str, Any] = {}
            for key in part.values if part.values is not None else part.specs:
                step = steps.get(key)
                if step is not None:
                    tensors[step.target_key] = assemble(step, run(part, step))[0]
                else:
                    tensors[key] = part.values[key] if part.values is not None else part.tensor(key).whole()
            obj = set_at(obj, part.location, with_records(tensors, plan.records, part.values))
        if dropped and isinstance(obj, Mapping):
            obj = {k: v for k, v in obj.items() if k not in dropped}
        write_torch(output.file(), obj)
        return lambda written: None  # read back by verify_output, as every output is

    return Sink(target, TORCH, False, write, dropped=dropped)


def _by_name(specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """A safetensors file's tensors in the order of their names, as safetensors lists them: the file then does not
    depend on the order of its input (a torch state dict's, a header's, an index's)."""
    return dict(sorted(specs.items()))


def _dcp_sink(src: Source, plans: list[tuple[Part, Plan]], target: Path, options: Options) -> Sink:
    """A distributed checkpoint in, one out: the same entries, the converted state dicts changed, optimizer state
    dropped, each tensor computed when torch's writer asks for it."""
    import torch

    from .dcp import DcpSource, DcpTensor, fsync_tree, nest, records_entry, verify_dcp, write_dcp

    assert isinstance(src, DcpSource)
    dropped = src.optimizer_groups()

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        flat = src.others([part.location for part, _ in plans], dropped)
        paths = dict(src.paths)
        produce: dict[str, Callable[[], torch.Tensor]] = {}

        for fqn, value in flat.items():
            if isinstance(value, torch.Tensor):
                spec = TensorSpec(tuple(value.shape), str(value.dtype).removeprefix("torch."))
                produce[fqn] = DcpTensor(src, fqn, spec).whole
        for part, plan in plans:
            steps = {s.source_key: s for s in plan.steps}
            for key, spec in part.specs.items():
                step = steps.get(key)
                name = step.target_key if step else key
                after = TensorSpec(step.shape_after, step.out_dtype) if step else spec
                fqn = ".".join((*part.location, name))
                flat[fqn] = torch.empty(after.shape, dtype=getattr(torch, after.dtype), device="meta")
                paths[fqn] = (*part.location, name)
                produce[fqn] = _transformed(part, step, run) if step else part.tensor(key).whole
            if plan.records:
                fqn = ".".join((*part.location, METADATA_KEY))
                flat[fqn], paths[fqn] = records_entry(plan.records), (*part.location, METADATA_KEY)
        write_dcp(output.path, nest(flat, paths), lambda fqn: produce[fqn](), target)
        fsync_tree(output.path)
        expected = {fqn: TensorSpec(tuple(v.shape), str(v.dtype).removeprefix("torch."))
                    for fqn, v in flat.items() if isinstance(v, torch.Tensor)}  # fmt: skip
        return lambda written: verify_dcp(written, expected, target)

    return Sink(target, DCP, True, write, dropped=dropped)


def _directory_sink(src: Source, plans: list[tuple[Part, Plan]], target: Path, options: Options) -> Sink:
    """A model directory: each weight unit written by the sink of its format under its own name, every other file
    copied, all in one staging directory."""
    from .model_dir import ModelDirSource, SubOutput

    assert isinstance(src, ModelDirSource)
    if target.suffix in (".safetensors", *TORCH_SUFFIXES):
        raise RefusedError(f"{target}: a model directory is written as one; give -o a directory name")
    planned = iter(plans)
    units: list[tuple[Path, Sink | None, Source]] = []
    plan_of: dict[int, Plan] = {}
    for unit, unit_src in src.units:
        local = [(part, next(planned)[1]) for part in unit_src.parts]
        plan_of.update((id(part), plan) for part, plan in local)
        if not any(plan.steps for _, plan in local):
            units.append((unit, None, unit_src))
        elif unit_src.format == SHARDED or (unit_src.format == SAFETENSORS and options.max_shard_size is not None):
            units.append((unit, _shards_sink(unit_src, local[0], target / unit.parent, options), unit_src))
        elif unit_src.format == SAFETENSORS:
            units.append((unit, _safetensors_sink(unit_src, local, target / unit, options), unit_src))
        else:
            units.append((unit, _torch_sink(unit_src, local, target / unit, options), unit_src))

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        checks: list[tuple[Path, Callable[[Path], None]]] = []
        kept = list(src.others)
        for unit, sink, unit_src in units:
            if sink is None:  # nothing to change: its files as they are
                kept += [unit.parent / p.name for p in unit_src.inputs() if p.is_file()]
                continue
            view = SubOutput(output, unit, sink.directory)

            def unit_run(part: Part, step: Step, unit: Path = unit) -> Changes:
                return run(ModelDirSource.prefixed(unit, part), step)

            check = sink.write(view, unit_run, tick)  # type: ignore[arg-type]
            checks.append((view.path.relative_to(output.path), check))
        src.copy(kept, output)

        def verify(written: Path) -> None:
            for relative, check in checks:
                check(written / relative)

        return verify

    dropped = [f"{unit}/{name}" for unit, sink, _ in units if sink is not None for name in sink.dropped]
    total = sum(sink.total_bytes for _, sink, _ in units if sink is not None)
    tensors = sum(sink.total_tensors for _, sink, _ in units if sink is not None)
    order = [entry for _, sink, unit_src in units if sink is not None
             for entry in (sink.order or [(p, s) for p in unit_src.parts for s in plan_of[id(p)].steps])]  # fmt: skip
    return Sink(target, MODEL_DIR, True, write, total, tensors, dropped, order)


def _transformed(part: Part, step: Step, run: Run) -> Callable[[], Any]:
    return lambda: assemble(step, run(part, step))[0]


def _total(specs: dict[str, TensorSpec]) -> int:
    return sum(spec.nbytes for spec in specs.values())


def _ticker(progress: Progress | None, sink: Sink) -> Tick:
    """``tick(nbytes, tensor_done)`` for the writers, as ``progress(bytes_done, bytes_total, tensors_done,
    tensors_total)``."""
    done = tensors = 0

    def tick(nbytes: int, tensor_done: bool) -> None:
        nonlocal done, tensors
        done += nbytes
        tensors += tensor_done
        if progress is not None:
            progress(done, sink.total_bytes, tensors, sink.total_tensors)

    return tick


def _skip_summary(report: FileReport) -> str:
    """``"; skipped: 1x1 kernel (3), excluded (1)"``: why the tensors that looked like kernels were left, then how
    to convert those that can be (``"; to convert the pruned (weight_orig, weight_mask) ones, make ..."``)."""
    reasons = Counter((s.reason, s.fix) for _, s in report.skipped)
    if not reasons:
        return ""
    by_fix: dict[str, list[str]] = {}
    for reason, fix in reasons:
        if fix:
            by_fix.setdefault(fix, []).append(reason)
    said = ", ".join(f"{reason} ({n})" for (reason, _), n in reasons.most_common())
    fixes = "".join(f"; to convert the {' and '.join(kinds)} ones, {fix}" for fix, kinds in by_fix.items())
    return f"; skipped: {said}{fixes}"


def _warn_nonfinite(report: FileReport) -> None:
    for _, change in report.changed:
        if not math.isfinite(change.max_error):
            report.warnings.append(
                f"{change.source_key}: holds NaN or Inf values; written anyway, and the transform spreads "
                "them over every tap of the kernels that hold them"
            )
