"""Convert and bake whole checkpoint files; the work behind ``spectral convert`` and ``spectral bake``.

Two paths, one plan (:mod:`spectral_cli.layout`):

* torch files are loaded (``weights_only=True``, ``mmap=True``), every state dict in the container goes through
  the pure surgery, everything else in the container is kept, and the result is written atomically, read back
  and compared;
* safetensors files and sharded directories are streamed: the output header is laid out from the plan, then
  each converted tensor is read, transformed and written on its own, and every other tensor is copied as raw
  bytes. Memory stays near the largest converted tensor. The written headers are read back and checked.

Where the records go: torch files carry them in each state dict's ``_metadata`` (see
:mod:`spectral_cli.surgery`); safetensors files in ``__metadata__["spectral_cli"]`` as JSON, beside the
existing entries and ``"format": "pt"``. No printing here: progress is reported through a callback.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import queue
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .bases import to_spatial, to_spectral
from .checkpoint import (
    KEY_PREFIXES,
    Checkpoint,
    get_at,
    is_optimizer_state,
    load_checkpoint,
    set_at,
    write_atomic,
)
from .errors import CheckpointError, NothingToDoError, RefusedError
from .formats import (
    INDEX_SUFFIX,
    SAFETENSORS,
    SHARDED,
    check_output,
    default_output,
    detect_format,
    fsync_directory,
    output_format,
)
from .layout import LayerRecord, Plan, Step, TensorSpec, plan_bake, plan_convert, records_from_json, records_to_json
from .stream import Entry, Header, SafetensorsInput, open_safetensors, read_header, read_rows, read_tensor, write_stream
from .surgery import (
    METADATA_KEY,
    LayerChange,
    Skipped,
    SurgeryResult,
    bake_state_dict,
    bake_tensor,
    convert_state_dict,
    convert_tensor,
    records_of,
    spec_of,
)

#: ``progress(bytes_done, bytes_total)``
Progress = Callable[[int, int], None]


@dataclass
class FileReport:
    """What convert or bake did to a file. ``location`` names the state dict inside a container."""

    source: Path
    target: Path | None
    input_format: str
    output_format: str | None
    changed: list[tuple[str, LayerChange]] = field(default_factory=list)
    skipped: list[tuple[str, Skipped]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    written: bool = False
    message: str = ""
    files: list[Path] = field(default_factory=list)


def key_prefix(keys: Iterable[str]) -> str:
    """The wrapper prefix (``module.``, ``_orig_mod.``, ...) shared by every key, possibly nested."""
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


def _prefixed(patterns: Sequence[str] | None, prefix: str) -> list[str] | None:
    return None if patterns is None else [glob.escape(prefix) + p for p in patterns]


def parse_size(text: str) -> int:
    """``"500MB"``, ``"2GiB"``, ``"1048576"`` -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    try:
        size = int(float(number) * units[cleaned[len(number) :]])
    except (ValueError, KeyError):
        raise RefusedError(f"--max-shard-size {text!r}: give a size like 500MB, 2GB or 1GiB") from None
    if size <= 0:
        raise RefusedError(f"--max-shard-size {text!r}: must be positive")
    return size


# ---- torch files: in memory -----------------------------------------------------------------------------------


def _transform_torch(
    source: Path,
    output: Path | None,
    tag: str,
    surgery: Callable[[Mapping[str, Any], str, Checkpoint], SurgeryResult],
    *,
    dry_run: bool,
    force: bool,
    trust_pickle: bool,
) -> FileReport:
    ck = load_checkpoint(source, trust_pickle=trust_pickle)
    obj = ck.obj
    report = FileReport(source, None, ck.format, None)
    for loc, sd in ck.state_dicts():
        if ck.format == SAFETENSORS:
            sd = _with_records(sd, ck.metadata)
        result = surgery(sd, key_prefix(sd), ck)
        where = "/".join(loc)
        report.changed += [(where, c) for c in result.changed]
        report.skipped += [(where, s) for s in result.skipped]
        obj = set_at(obj, loc, result.state_dict)
    if report.changed and isinstance(obj, Mapping):
        dropped = [k for k, v in obj.items() if isinstance(k, str) and is_optimizer_state(v)]
        if dropped:
            obj = {k: v for k, v in obj.items() if k not in dropped}
            report.dropped = dropped
            report.warnings.append(
                f"dropped optimizer state ({', '.join(dropped)}): it refers to the weights as they were; "
                "rebuild the optimizer after loading"
            )
    if not report.changed:
        return report
    target = output if output is not None else default_output(source, tag, output_format(source, ck.format))
    fmt = output_format(target, ck.format)
    report.target, report.output_format = target, fmt
    if fmt == SAFETENSORS and ck.locations != [()]:
        raise RefusedError(f"{target}: safetensors holds only tensors, and {source} is a container; write a .pt file")
    check_output(source, target, force=force)
    if dry_run:
        return report
    metadata = None
    if fmt == SAFETENSORS:
        records = records_of(get_at(obj, ()))
        metadata = _file_metadata(ck.metadata, records, None)
    write_atomic(target, fmt, obj, metadata, verify=lambda tmp: _verify_torch(tmp, target, obj, ck.locations))
    report.written, report.files = True, [target]
    return report


def _verify_torch(written_path: Path, target: Path, written: Any, locations: list[tuple[str, ...]]) -> None:
    """Read the written file back (before it replaces ``target``) and compare every tensor with ``written``."""
    back = load_checkpoint(written_path)
    for loc in locations:
        expected, actual = get_at(written, loc), get_at(back.obj, loc)
        if back.format == SAFETENSORS:
            actual = _with_records(actual, back.metadata)
        bad = [k for k, v in expected.items() if isinstance(v, torch.Tensor) and not _same(v, actual.get(k))]
        if bad or set(expected) != set(actual):
            raise CheckpointError(f"{target}: read back differently from what was written ({bad[:3]}); not written")
        if records_of(expected) != records_of(actual):
            raise CheckpointError(f"{target}: lost its spectral records on writing; not written")


def _with_records(sd: Mapping[str, Any], metadata: Mapping[str, str]) -> Mapping[str, Any]:
    from collections import OrderedDict

    out = OrderedDict(sd)
    raw = metadata.get(METADATA_KEY)
    if raw:
        out._metadata = OrderedDict({METADATA_KEY: json.loads(raw)})  # type: ignore[attr-defined]
    return out


def _same(a: torch.Tensor, b: Any) -> bool:
    """Same dtype, shape and values; NaN equals NaN (a checkpoint's NaNs are carried over, not an error).

    Sparse, nested and meta tensors (carried over, never transformed) are compared by what they hold.
    """
    if not (isinstance(b, torch.Tensor) and spec_of(a) == spec_of(b)):
        return False
    kind = spec_of(a).kind
    if kind == "meta":  # no data
        return True
    if kind == "nested":
        parts_a, parts_b = a.unbind(), b.unbind()
        return len(parts_a) == len(parts_b) and all(_same(x, y) for x, y in zip(parts_a, parts_b, strict=True))
    if kind != "dense":
        return _same(a.to_dense(), b.to_dense())
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _file_metadata(
    base: Mapping[str, str], records: Mapping[str, LayerRecord], keys: Iterable[str] | None
) -> dict[str, str]:
    """A safetensors file's ``__metadata__``: the input's entries, ``format: pt``, and its records."""
    meta = {k: v for k, v in base.items() if k != METADATA_KEY}
    meta.setdefault("format", "pt")
    mine = dict(records) if keys is None else {k: records[k] for k in keys if k in records}
    if mine:
        meta[METADATA_KEY] = json.dumps(records_to_json(mine, __version__), sort_keys=True)
    return meta


# ---- safetensors: streamed ------------------------------------------------------------------------------------


#: input bytes of one slab of rows in the streamed rfft convert: slabs are transformed side by side on threads
#: and written as they are done, so memory stays near a few slabs, whatever the size of the tensor
#: (torch.fft.rfftn gives the same bits on any split of the rows; the tests check it against the in-memory path)
SLAB_BYTES = 1 << 20


class Scratch:
    """Threads and slab buffers reused from tensor to tensor while streaming a file (fresh memory costs page
    faults: measured 10x the time of filling memory already touched; threads of their own keep malloc arenas).
    ``close()`` (or the end of a ``with`` block) stops the threads.
    """

    def __init__(self) -> None:
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._pool: ThreadPoolExecutor | None = None
        self.workers = 1

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    @contextmanager
    def threads(self) -> Iterator[ThreadPoolExecutor]:
        """``torch.get_num_threads()`` threads, each running torch single-threaded: the slabs run side by side
        instead of splitting each small operation (measured: faster, and far less hurt by other processes on
        the machine). torch's thread count is 1 inside the block and restored after it, also on errors."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self._pool is None:
                self.workers = max(1, threads)
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="spectral")
            yield self._pool
        finally:
            torch.set_num_threads(threads)

    @contextmanager
    def rows(self, nbytes: int) -> Iterator[torch.Tensor]:
        """A buffer of ``nbytes`` for one slab, taken back for another slab when the block ends (thread-safe)."""
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            buffer = torch.empty(0, dtype=torch.uint8)
        if buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        try:
            yield buffer[:nbytes]
        finally:
            self._free.put(buffer)


#: what ``convert_streamed`` and ``bake_streamed`` give: the output tensor in pieces ``(byte offset in the
#: tensor, piece)``, each valid until the next is asked for, then (as the generator's return value) the change
Pieces = Generator[tuple[int, torch.Tensor], None, LayerChange]


def convert_streamed(step: Step, f: BufferedReader, entry: Entry, scratch: Scratch | None = None) -> Pieces:
    """:func:`~spectral_cli.surgery.convert_tensor` on a tensor of a file: the same bits, in bounded memory.

    ``rfft``: the kernels are read, transformed and checked a slab of rows at a time, the slabs side by side on
    ``torch.get_num_threads()`` threads (torch's own intra-op threads are set to 1 meanwhile, then restored);
    each slab's real and imaginary rows are handed out as soon as the slab is done, so that writing overlaps
    the transform and memory holds a few slabs, never the tensor. ``rdft`` (a matrix product, whose last bits
    depend on how the rows are split) is transformed whole. The round-trip check is that of
    ``convert_tensor``, computed slab by slab.
    """
    if entry.spec.numel == 0:
        tensor, change = convert_tensor(step, read_tensor(f, entry))
        yield 0, tensor
        return change
    if scratch is None:
        with Scratch() as own:
            return (yield from convert_streamed(step, f, entry, own))
    ks, basis = step.kernel_size, step.basis
    rows = entry.spec.numel // math.prod(ks)
    if basis != "rfft":
        weight = read_tensor(f, entry).reshape(rows, *ks)
        spectral = to_spectral(weight, ks, basis)  # whole, on torch's own threads

        def check(i: int, j: int) -> torch.Tensor:
            return _slab_error(to_spatial(spectral[i:j], ks, basis), weight[i:j])

        errors = _check_slabs(scratch, weight, check)
        yield 0, spectral.reshape(step.shape_after)
        return _streamed_change(step, _relative_error(errors))
    dtype = getattr(torch, entry.spec.dtype)
    row_bytes = entry.spec.nbytes // rows
    plane_bytes = math.prod(step.shape_after[1:]) * dtype.itemsize
    out_row_bytes = plane_bytes // rows

    def slab(bounds: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = bounds
        with scratch.rows((j - i) * row_bytes) as buffer:
            weight = read_rows(f, entry, (rows, *ks), i, j, buffer.view(dtype))
            spectral = to_spectral(weight, ks, basis)
            return spectral, _slab_error(to_spatial(spectral, ks, basis), weight)

    per_slab = max(1, SLAB_BYTES // row_bytes)
    bounds = iter([(i, min(rows, i + per_slab)) for i in range(0, rows, per_slab)])
    errors = []
    with scratch.threads() as pool:
        ahead = 2 * scratch.workers  # slabs in flight: enough to keep every thread busy while one is written
        pending = deque((b, pool.submit(slab, b)) for b in itertools.islice(bounds, ahead))
        try:
            while pending:
                (i, _), result = pending.popleft()
                spectral, error = result.result()
                following = next(bounds, None)
                if following is not None:
                    pending.append((following, pool.submit(slab, following)))
                errors.append(error)
                yield i * out_row_bytes, spectral[0]  # the real plane's rows i:j
                yield plane_bytes + i * out_row_bytes, spectral[1]  # the imaginary plane's
                del spectral
        finally:
            for _, result in pending:  # stopped early (a failed write): drop the slabs not started
                result.cancel()
            wait([result for _, result in pending])
    return _streamed_change(step, _relative_error(errors))


def bake_streamed(step: Step, f: BufferedReader, entry: Entry, scratch: Scratch | None = None) -> Pieces:
    """:func:`~spectral_cli.surgery.bake_tensor` on a tensor of a file: the same bits (the weight is computed
    whole: a matrix product's last bits depend on how the rows are split); the float64 rounding check slab by
    slab, so memory stays near the input and output tensors."""
    if scratch is None:
        with Scratch() as own:
            return (yield from bake_streamed(step, f, entry, own))
    stored = read_tensor(f, entry)
    if stored.numel() == 0:
        tensor, change = bake_tensor(step, stored)
        yield 0, tensor
        return change
    ks, basis = step.kernel_size, step.basis
    real = torch.stack((stored.real, stored.imag)) if step.complex_source else stored
    del stored
    weight = to_spatial(real, ks, basis).to(getattr(torch, step.out_dtype))
    rows = weight.numel() // math.prod(ks)
    flat = weight.view(rows, *ks)
    coefficients = real.view(2, rows, *real.shape[real.dim() - len(ks) :]) if basis == "rfft" else real.view(rows, -1)

    def check(i: int, j: int) -> torch.Tensor:
        part = coefficients[:, i:j] if basis == "rfft" else coefficients[i:j].view(j - i, *ks)
        return _slab_error(flat[i:j], to_spatial(part.to(torch.float64), ks, basis))

    errors = _check_slabs(scratch, flat, check)
    yield 0, weight
    return _streamed_change(step, _relative_error(errors))


def _check_slabs(scratch: Scratch, rows: torch.Tensor, check: Callable[[int, int], torch.Tensor]) -> list[torch.Tensor]:
    """``check(start, end)`` over slabs of about :data:`SLAB_BYTES` of ``rows`` (first dim), on the threads."""
    n = rows.shape[0]
    per_slab = max(1, SLAB_BYTES // max(1, rows[0].numel() * rows.element_size())) if n else 1
    with scratch.threads() as pool:
        return list(pool.map(lambda i: check(i, min(n, i + per_slab)), range(0, n, per_slab)))


def _slab_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``[max |actual - expected|, max |expected|]`` of one slab (NaN if either holds NaN).

    Computed in float32, or float64 for float64 tensors: the difference of two close floats is exact
    (Sterbenz), so this is the float64 figure of :func:`~spectral_cli.surgery.convert_tensor` at a third of the
    cost and memory.
    """
    dtype = torch.promote_types(torch.promote_types(actual.dtype, expected.dtype), torch.float32)
    expected = expected.detach().to(dtype)
    diff = torch.aminmax(actual.detach().to(dtype) - expected)
    scale = torch.aminmax(expected)
    return torch.stack((torch.maximum(-diff.min, diff.max), torch.maximum(-scale.min, scale.max))).double()


def _relative_error(slabs: Sequence[torch.Tensor]) -> float:
    """``max diff / max scale`` over the slabs, as :func:`~spectral_cli.surgery.convert_tensor` reports it."""
    diff, scale = torch.stack(list(slabs)).max(dim=0).values.tolist()
    return float(diff / scale if scale > 0 else diff)


def _streamed_change(step: Step, error: float) -> LayerChange:
    return LayerChange(step.name, step.source_key, step.target_key, step.basis, step.kernel_size, step.shape_before,
                       step.shape_after, step.dtype, error, step.inferred)  # fmt: skip


def _merged_records(st: SafetensorsInput) -> dict[str, LayerRecord]:
    records: dict[str, LayerRecord] = {}
    for doc in st.records_json:
        records.update(records_from_json(doc))
    return records


def _shard_layout(
    st: SafetensorsInput,
    plan: Plan,
    out_specs: Mapping[str, TensorSpec],
    max_shard_size: int | None,
    one_file: bool = False,
) -> dict[str, list[str]]:
    """Output file name -> its keys. One file (a single input, or ``one_file``: shards merged); the input's shards;
    or new shards of at most ``max_shard_size``."""
    if max_shard_size is None:
        if st.index_path is None or one_file:
            return {"": list(out_specs)}
        source_of = {s.target_key: s.source_key for s in plan.steps}
        layout: dict[str, list[str]] = {h.path.name: [] for h in st.headers}
        for key in out_specs:
            layout[st.owner[source_of.get(key, key)].path.name].append(key)
        return layout
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in out_specs.items():
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += spec.nbytes
    n = len(shards)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": keys for i, keys in enumerate(shards)}


def _transform_safetensors(
    source: Path,
    output: Path | None,
    tag: str,
    planner: Callable[[dict[str, TensorSpec], dict[str, LayerRecord], str], Plan],
    execute: Callable[[Step, BufferedReader, Entry, Scratch], Pieces],
    *,
    dry_run: bool,
    force: bool,
    max_shard_size: int | None,
    progress: Progress | None,
) -> FileReport:
    st = open_safetensors(source)
    specs = st.specs
    plan = planner(specs, _merged_records(st), key_prefix(specs))
    fmt_in = SHARDED if st.index_path is not None else SAFETENSORS
    report = FileReport(source, None, fmt_in, None)
    report.skipped = [("", Skipped(s.key, s.reason)) for s in plan.skipped]
    if not plan.steps:
        return report
    out_specs = plan.output_specs(specs)
    # shards given -o NAME.safetensors: merged into that one file (still streamed), not a directory of that name
    one_file = output is not None and output.suffix == ".safetensors"
    layout = _shard_layout(st, plan, out_specs, max_shard_size, one_file)
    sharded = list(layout) != [""]
    fmt_out = SHARDED if sharded else SAFETENSORS
    if output is not None and output_format(output, SAFETENSORS) != SAFETENSORS:
        raise RefusedError(f"{output}: safetensors shards are written as safetensors; give -o a directory or a "
                           ".safetensors file")  # fmt: skip
    target = output if output is not None else default_output(source, tag, fmt_out)
    report.target, report.output_format = target, fmt_out
    check_output(source if st.index_path is None else st.index_path.parent, target, force=force, directory=sharded)
    by_target = {s.target_key: s for s in plan.steps}
    scratch = Scratch()  # closed at the end
    done, total = 0, sum(spec.nbytes for spec in out_specs.values())

    with ExitStack() as stack:
        stack.enter_context(scratch)
        handles: dict[Path, BufferedReader] = {}

        def handle(header: Header) -> BufferedReader:
            if header.path not in handles:
                handles[header.path] = stack.enter_context(header.path.open("rb"))
            return handles[header.path]

        def produce(key: str) -> Any:
            step = by_target.get(key)
            if step is None:
                entry = st.owner[key].entries[key]
                return handle(st.owner[key]), entry.start, entry.end
            header = st.owner[step.source_key]
            chunks = execute(step, handle(header), header.entries[step.source_key], scratch)

            def record() -> Iterator[tuple[int, torch.Tensor]]:
                report.changed.append(("", (yield from chunks)))

            return record()

        def tick(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            if progress is not None:
                progress(done, total)

        if dry_run:
            for step in plan.steps:
                for _ in produce(step.target_key):
                    pass
            return report
        if not sharded:
            meta = _file_metadata(st.headers[0].metadata, plan.records, None)
            write_stream(target, out_specs, meta, produce, tick,
                         verify=lambda tmp: _verify_headers({tmp: (out_specs, meta)}, target))  # fmt: skip
            report.files = [target]
        else:
            report.files = _write_sharded(st, target, layout, out_specs, plan, produce, tick, force)
    report.written = True
    return report


def _write_sharded(
    st: SafetensorsInput,
    target: Path,
    layout: Mapping[str, list[str]],
    out_specs: Mapping[str, TensorSpec],
    plan: Plan,
    produce: Callable[[str], Any],
    tick: Callable[[int], None],
    force: bool,
) -> list[Path]:
    """Write every shard and the index into a temporary directory beside ``target``, then rename it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        base_meta = {h.path.name: h.metadata for h in st.headers}
        first = st.headers[0].metadata
        expected = {}
        for name, keys in layout.items():
            meta = _file_metadata(base_meta.get(name, first), plan.records, keys)
            specs = {k: out_specs[k] for k in keys}
            write_stream(staging / name, specs, meta, produce, tick)
            expected[staging / name] = (specs, meta)
        _verify_headers(expected)
        index_meta = dict(st.index.get("metadata") or {}) if isinstance(st.index.get("metadata"), dict) else {}
        index_meta["total_size"] = sum(spec.nbytes for spec in out_specs.values())
        weight_map = {k: name for name, keys in layout.items() for k in keys}
        index_name = st.index_path.name if st.index_path is not None else f"model{INDEX_SUFFIX}"
        (staging / index_name).write_text(json.dumps({"metadata": index_meta, "weight_map": weight_map}, indent=2))
        os.chmod(staging, 0o777 & ~_umask())
        if target.exists() and force:
            # Two renames: the old output steps aside, the new one takes its name; if the second fails the
            # old one is put back, so a failure never leaves the target name empty.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "previous")
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old / "previous", target)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
        fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [target / name for name in layout] + [target / index_name]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _verify_headers(
    expected: Mapping[Path, tuple[Mapping[str, TensorSpec], Mapping[str, str]]], target: Path | None = None
) -> None:
    """Read each written header back (before it is renamed into place): every tensor and record as planned."""
    for path, (specs, meta) in expected.items():
        header = read_header(path)
        if header.specs != dict(specs) or header.metadata != dict(meta):
            raise CheckpointError(f"{target or path}: read back differently from what was written; not written")


# ---- the two operations ---------------------------------------------------------------------------------------


def convert_file(
    source: Path | str,
    output: Path | str | None = None,
    *,
    basis: str = "rfft",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dry_run: bool = False,
    force: bool = False,
    trust_pickle: bool = False,
    max_shard_size: int | None = None,
    progress: Progress | None = None,
) -> FileReport:
    """Convert a checkpoint's conv kernels to spectral tensors and write the result next to it."""
    source = Path(source)
    out = None if output is None else Path(output)
    if _streams(source, out, max_shard_size):

        def planner(specs: dict[str, TensorSpec], records: dict[str, LayerRecord], prefix: str) -> Plan:
            return plan_convert(specs, records, basis=basis, include=_prefixed(include, prefix),  # type: ignore[arg-type]
                                exclude=_prefixed(exclude, prefix))  # fmt: skip

        report = _transform_safetensors(source, out, "spectral", planner, convert_streamed, dry_run=dry_run,
                                        force=force, max_shard_size=max_shard_size, progress=progress)  # fmt: skip
    else:
        _no_sharding(max_shard_size, source)

        def surgery(sd: Mapping[str, Any], prefix: str, ck: Checkpoint) -> SurgeryResult:
            excl = list(_prefixed(exclude, prefix) or [])
            if ck.conv_modules is not None:  # a walked module: only its real conv layers
                kernels = {k.removesuffix(".weight") for k in sd if k.endswith(".weight")}
                excl += [glob.escape(n) for n in sorted(kernels - ck.conv_modules)]
            return convert_state_dict(sd, basis=basis, include=_prefixed(include, prefix), exclude=excl or None)  # type: ignore[arg-type]

        report = _transform_torch(source, out, "spectral", surgery, dry_run=dry_run, force=force,
                                  trust_pickle=trust_pickle)  # fmt: skip
    _warn_nonfinite(report)
    if not report.changed:
        already = [s for _, s in report.skipped if s.reason == "already spectral"]
        if already:
            report.message = f"nothing to convert: {len(already)} layers are already spectral; no file written"
            return report
        raise NothingToDoError(
            f"{source}: no convertible conv kernels (float weights of rank 3 to 5 with more "
            "than one tap); nothing to convert"
        )
    return report


def bake_file(
    source: Path | str,
    output: Path | str | None = None,
    *,
    kernel_size: tuple[int, ...] | None = None,
    dry_run: bool = False,
    force: bool = False,
    trust_pickle: bool = False,
    max_shard_size: int | None = None,
    progress: Progress | None = None,
) -> FileReport:
    """Bake every spectral tensor of a checkpoint back to a spatial weight in its original dtype."""
    source = Path(source)
    out = None if output is None else Path(output)
    if _streams(source, out, max_shard_size):

        def planner(specs: dict[str, TensorSpec], records: dict[str, LayerRecord], prefix: str) -> Plan:
            return plan_bake(specs, records, kernel_size=kernel_size)

        report = _transform_safetensors(source, out, "baked", planner, bake_streamed, dry_run=dry_run, force=force,
                                        max_shard_size=max_shard_size, progress=progress)  # fmt: skip
    else:
        _no_sharding(max_shard_size, source)

        def surgery(sd: Mapping[str, Any], prefix: str, ck: Checkpoint) -> SurgeryResult:
            return bake_state_dict(sd, kernel_size=kernel_size)

        report = _transform_torch(source, out, "baked", surgery, dry_run=dry_run, force=force,
                                  trust_pickle=trust_pickle)  # fmt: skip
    _warn_nonfinite(report)
    if not report.changed:
        raise NothingToDoError(f"{source}: no spectral tensors; nothing to bake")
    return report


def _streams(source: Path, output: Path | None, max_shard_size: int | None) -> bool:
    """safetensors in and out (or shards): streamed. Anything involving a torch file goes through memory."""
    fmt = detect_format(source)
    if fmt == SHARDED or max_shard_size is not None:
        return fmt in (SAFETENSORS, SHARDED)
    return fmt == SAFETENSORS and (output is None or output_format(output, SAFETENSORS) == SAFETENSORS)


def _no_sharding(max_shard_size: int | None, source: Path) -> None:
    if max_shard_size is not None:
        raise RefusedError(f"{source}: --max-shard-size writes safetensors shards; it needs a safetensors input")


def _warn_nonfinite(report: FileReport) -> None:
    for _, change in report.changed:
        if not math.isfinite(change.max_error):
            report.warnings.append(
                f"{change.source_key}: holds NaN or Inf values; written anyway, and the transform spreads "
                "them over every tap of the kernels that hold them"
            )
