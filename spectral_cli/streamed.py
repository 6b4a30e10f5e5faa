"""safetensors files and sharded directories converted or baked as a stream, tensor by tensor.

The output header is laid out from the plan, then each converted tensor is read, transformed and written on its
own (:mod:`spectral_cli.slabs`), and every other tensor is copied as raw bytes, so memory stays near a few slabs
whatever the size of the file. Sharded directories are written shard by shard into a staging directory, with
the index, and renamed into place. The written headers are read back and checked before any rename.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import key_prefix
from .errors import CheckpointError, RefusedError
from .formats import INDEX_SUFFIX, SAFETENSORS, SHARDED, check_output, default_output, fsync_directory, output_format
from .layout import LayerRecord, TensorSpec, records_from_json, records_to_json
from .plan import Plan, Step
from .report import FileReport, Progress
from .slabs import Pieces, Scratch
from .stream import Entry, Header, SafetensorsInput, open_safetensors, read_header
from .surgery import METADATA_KEY, Skipped
from .writer import write_stream


def file_metadata(
    base: Mapping[str, str], records: Mapping[str, LayerRecord], keys: Iterable[str] | None
) -> dict[str, str]:
    """A safetensors file's ``__metadata__``: the input's entries, ``format: pt``, and its records."""
    meta = {k: v for k, v in base.items() if k != METADATA_KEY}
    meta.setdefault("format", "pt")
    mine = dict(records) if keys is None else {k: records[k] for k in keys if k in records}
    if mine:
        meta[METADATA_KEY] = json.dumps(records_to_json(mine, __version__), sort_keys=True)
    return meta


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


def transform_safetensors(
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
    done, total, tensors = 0, sum(spec.nbytes for spec in out_specs.values()), 0

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

        def tick(nbytes: int, tensor_done: bool) -> None:
            nonlocal done, tensors
            done += nbytes
            tensors += tensor_done
            if progress is not None:
                progress(done, total, tensors, len(out_specs))

        if dry_run:
            for step in plan.steps:
                for _ in produce(step.target_key):
                    pass
            return report
        if not sharded:
            meta = file_metadata(st.headers[0].metadata, plan.records, None)
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
    tick: Callable[[int, bool], None],
    force: bool,
) -> list[Path]:
    """Write every shard and the index into a temporary directory beside ``target``, then rename it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        base_meta = {h.path.name: h.metadata for h in st.headers}
        first = st.headers[0].metadata
        expected = {}
        for name, keys in layout.items():
            meta = file_metadata(base_meta.get(name, first), plan.records, keys)
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
