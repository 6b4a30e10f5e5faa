"""Convert and bake checkpoint files: the one pipeline behind ``spectral convert`` and ``spectral bake``.

Every input goes the same way, whatever its format::

    source (the input's format module, found in files.registry: the file read and checked)
      -> plan (statedict.plan, from names, specs and records alone)
      -> transform (statedict.surgery: slab by slab, small tensors in batches)
      -> sink (the output's format module, chosen by files.formats.writer_format: written as it is transformed)
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import NothingToDoError, SpectralError, in_file
from ..statedict.plan import Plan, Step, plan_bake, plan_convert, skip_fixes
from ..statedict.surgery import Batches, Changes, assemble
from ..transform.kernels import DEFAULT_BASIS
from ..transform.slabs import Scratch
from .atomic import Output
from .checkpoint import Io, Planned, Sink, Source, StoredStateDict, Tick, Writing
from .formats import check_output, default_output, refuse_adapter, writer_format
from .registry import format_of, open_source
from .report import FileReport, measured_on_disk, skip_summary, warn_nonfinite
from .verify import verify_output

#: ``progress(bytes_done, bytes_total, tensors_done, tensors_total)``, called as a safetensors output is written
Progress = Callable[[int, int, int, int], None]

Action = Literal["convert", "bake"]


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
    #: what becomes of optimizer state: ``"convert"`` (mapped to the new coordinates; docs/resume.md) or ``"drop"``
    optimizer: str = "convert"
    #: write safetensors shards of at most this many bytes, and an index
    max_shard_size: int | None = None
    progress: Progress | None = None


def convert_file(
    source: Path | str,
    *,
    output: Path | str | None = None,
    basis: str = DEFAULT_BASIS,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dry_run: bool = False,
    force: bool = False,
    trust_pickle: bool = False,
    optimizer: str = "convert",
    max_shard_size: int | None = None,
    progress: Progress | None = None,
) -> FileReport:
    """Convert a checkpoint's conv kernels to spectral tensors and write the result next to it (or to ``output``),
    as ``spectral convert`` does (its options by the same names). Raises
    :class:`~spectral_cli.errors.NothingToDoError` if there are none; a file already converted gives a report with
    ``message`` and writes nothing."""
    options = Options(output=output, basis=basis, include=include, exclude=exclude, dry_run=dry_run, force=force,
                      trust_pickle=trust_pickle, optimizer=optimizer, max_shard_size=max_shard_size,
                      progress=progress)  # fmt: skip
    return convert(Path(source), options)


def bake_file(
    source: Path | str,
    *,
    output: Path | str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    kernel_size: tuple[int, ...] | None = None,
    dry_run: bool = False,
    force: bool = False,
    trust_pickle: bool = False,
    optimizer: str = "convert",
    max_shard_size: int | None = None,
    progress: Progress | None = None,
) -> FileReport:
    """Bake every spectral tensor of a checkpoint back to a spatial weight in its original dtype, as ``spectral
    bake`` does; ``kernel_size`` is for record-less tensors whose shape does not tell it."""
    options = Options(output=output, include=include, exclude=exclude, kernel_size=kernel_size, dry_run=dry_run,
                      force=force, trust_pickle=trust_pickle, optimizer=optimizer, max_shard_size=max_shard_size,
                      progress=progress)  # fmt: skip
    return bake(Path(source), options)


def convert(path: Path, options: Options, io: Io | None = None) -> FileReport:
    """:func:`convert_file` with its options in one object, and ``io`` the system calls and piece sizes (the seam
    of the CLI and the tests)."""
    refuse_adapter(path)
    report = _transform("convert", path, options, io or Io())
    report.warnings += skip_fixes(skip for _, skip in report.skipped)
    if not report.changed:
        already = [s for _, s in report.skipped if s.reason == "already spectral"]
        if already:
            report.message = f"nothing to convert: {len(already)} layers are already spectral; no file written"
            return report
        raise NothingToDoError(
            f"{path}: no convertible conv kernels (float weights of rank 3 to 5 with more "
            f"than one tap){skip_summary(report)}; nothing to convert"
        )
    return report


def bake(path: Path, options: Options, io: Io | None = None) -> FileReport:
    """:func:`bake_file` with its options in one object, and ``io`` as for :func:`convert`."""
    report = _transform("bake", path, options, io or Io())
    if not report.changed:
        raise NothingToDoError(f"{path}: no spectral tensors{skip_summary(report)}; nothing to bake")
    return report


# ---- the pipeline --------------------------------------------------------------------------------------------


def _transform(action: Action, path: Path, options: Options, io: Io) -> FileReport:
    with _collector_paused():
        return _transform_file(action, path, options, io)


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


def _transform_file(action: Action, path: Path, options: Options, io: Io) -> FileReport:
    with contextlib.closing(open_source(path, trust_pickle=options.trust_pickle, syscalls=io.syscalls)) as src:
        plans = [(part, _planned(action, src.path, part, options)) for part in src.parts]
        report = FileReport(path, None, src.format, None)
        report.skipped = [(part.label, skip) for part, plan in plans for skip in plan.skipped]
        if not any(plan.steps for _, plan in plans):
            return report
        sink = _sink(src, plans, options, io, "spectral" if action == "convert" else "baked")
        report.target, report.output_format, report.dropped = sink.target, sink.format, sink.dropped
        report.optimizer = sink.optimizers
        report.warnings += [line for optimizer in sink.optimizers for line in optimizer.warnings()]
        check_output(src.inputs(), sink.target, force=options.force, directory=sink.directory)
        with Scratch(io.slab_bytes) as scratch:
            asked = sink.order if sink.order is not None and not options.dry_run else [
                (part, step) for part, plan in plans for step in plan.steps]  # fmt: skip
            tensors = [(step, functools.partial(part.tensor, step.source_key)) for part, step in asked]
            batches = Batches(scratch, tensors, measure=options.dry_run)

            def run(part: StoredStateDict, step: Step) -> Changes:  # the error of a written tensor: measured on disk
                change = yield from batches.execute(step, part.tensor(step.source_key))
                report.changed.append((part.label, change))
                return change

            if options.dry_run:
                for part, plan in plans:
                    for step in plan.steps:
                        assemble(step, run(part, step))
            else:
                with Output(sink.target, directory=sink.directory, syscalls=io.syscalls, inputs=src.inputs()) as out:
                    verify = sink.write(out, run, _ticker(options.progress, sink))

                    def check(written: Path) -> None:
                        src.check_unchanged()
                        verify(written)
                        verified = verify_output(src, written, plans, sink.target, scratch, dropped=sink.dropped,
                                                 replaced=sink.replaced, trust_pickle=options.trust_pickle,
                                                 syscalls=io.syscalls)  # fmt: skip
                        measured_on_disk(report, verified)

                    out.commit(check)
                report.written = True
    steps = [(part.label, step.source_key) for part, plan in plans for step in plan.steps]
    order = {step: i for i, step in enumerate(steps)}
    report.changed.sort(key=lambda done: order[done[0], done[1].source_key])  # in the input's order
    warn_nonfinite(report)
    return report


def _planned(action: Action, path: Path, part: StoredStateDict, options: Options) -> Plan:
    """The plan of one state dict; a rule it breaks is said of its file (and its place in the file)."""
    try:
        return _plan(action, part, options)
    except SpectralError as e:
        raise in_file(e, f"{path} ({part.label})" if part.label else path) from None


def _plan(action: Action, part: StoredStateDict, options: Options) -> Plan:
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


def _sink(src: Source, plans: Planned, options: Options, io: Io, tag: str) -> Sink:
    """The writer of the output: its format by one rule (:func:`~.formats.writer_format`), its name given or
    made from the input's, its module found in the table of formats."""
    out = None if options.output is None else Path(options.output)
    fmt = writer_format(src.path, src.format, out, sharded=options.max_shard_size is not None)
    target = out or default_output(src.path, tag, fmt)
    return format_of(fmt).sink(src, plans, target, Writing(options.max_shard_size, options.optimizer, io, format_of))


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
