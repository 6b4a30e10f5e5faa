"""Distributed checkpoints (``torch.distributed.checkpoint``, as FSDP2, torchtitan and Lightning's FSDP strategy
save them): the source and the writer, through torch's own DCP API in one process, without a process group.

A DCP directory holds a ``.metadata`` file (a pickle) and the tensors' chunks, written by every rank. torch's
reader unpickles the metadata and the non-tensor entries with no restriction: here the metadata is read with an
unpickler that only builds DCP's own metadata classes, and other entries with ``weights_only=True`` (unless
``--trust-pickle``), so a hostile directory runs no code. Tensors are read one at a time, each assembled whole
from its chunks by torch; the output is written one tensor per file, each computed when the writer asks for it:
memory holds the largest tensor, never the checkpoint.

Each top-level entry whose tensors form a model state dict (``{"model": ..., "optim": ...}``) is a state dict of
its own; an optimizer's entries are converted with them (by parameter name, or aligned by position:
:mod:`.optimizer_state`), or left out with ``--optimizer drop``. The records (with the torch version: DCP promises
nothing across versions) are a non-tensor entry ``spectral_cli`` beside the converted tensors, which
``dcp.load(model.state_dict())`` ignores.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import CheckpointError, RefusedError
from ..statedict.keys import TensorSpec
from ..statedict.plan import Step
from ..statedict.records import METADATA_KEY, LayerRecord, parse_records, records_document
from ..statedict.surgery import MemoryTensor, assemble
from ..transform.kernels import dtype_name
from .atomic import Output
from .checkpoint import (
    Fingerprint,
    Planned,
    Reading,
    Run,
    Sink,
    Source,
    StoredStateDict,
    Tick,
    Writing,
    read_back_differs,
)
from .formats import DCP
from .optimizer_state import DROP_ASKED, OptimizerReport, convert_dcp_entries, parsed_path, removed_report

METADATA_FILE = ".metadata"

#: the classes DCP's metadata pickle may build (torch 2.10 to 2.14), and nothing else
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):  # fmt: skip
            return super().find_class(module, name)
        raise CheckpointError(f"{self.path}: its DCP metadata asks for {module}.{name}, which DCP metadata never "
                              "holds; the checkpoint is damaged or hostile")  # fmt: skip


def _reader(path: Path, trust_pickle: bool) -> Any:
    """torch's FileSystemReader with the metadata read safely, once."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class Reader(FileSystemReader):  # type: ignore[misc]
        cached: Any = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if Reader.cached is None:
                metadata_path = path / METADATA_FILE
                try:
                    with metadata_path.open("rb") as f:
                        Reader.cached = (pickle.Unpickler if trust_pickle else _MetadataUnpickler)(
                            f, *(() if trust_pickle else (metadata_path,))
                        ).load()
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{metadata_path}: not DCP metadata ({type(e).__name__}: "
                                          f"{str(e)[:80]})") from None  # fmt: skip
                from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

                if not isinstance(Reader.cached, Metadata):
                    raise CheckpointError(f"{metadata_path}: not DCP metadata")
                if getattr(Reader.cached, "storage_meta", None) is None:
                    Reader.cached.storage_meta = StorageMeta()
            return Reader.cached

    return Reader(path)


def _planner(trust_pickle: bool) -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):  # type: ignore[misc]
        """torch's planner for flat names, with non-tensor entries loaded weights-only (torch's: unrestricted)."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                self.original_state_dict[fqn] = torch.load(value, weights_only=not trust_pickle)
            except pickle.UnpicklingError:
                raise RefusedError(f"DCP entry {fqn!r} holds pickled Python objects whose loading runs code; if "
                                   "you trust it, rerun with --trust-pickle") from None  # fmt: skip

    return Planner(flatten_state_dict=False)


class DcpTensor:
    """A tensor of a DCP checkpoint, read whole (from all its chunks) when first needed."""

    def __init__(self, source: DcpSource, fqn: str, spec: TensorSpec) -> None:
        self.source, self.fqn, self.spec = source, fqn, spec
        self._loaded: MemoryTensor | None = None

    def whole(self) -> torch.Tensor:
        tensor = torch.empty(self.spec.shape, dtype=getattr(torch, self.spec.dtype))
        self.source.load({self.fqn: tensor})
        return tensor

    def read(self, offset: int, out: torch.Tensor) -> None:
        if self._loaded is None:
            self._loaded = MemoryTensor(self.whole())
        self._loaded.read(offset, out)


class DcpSource:
    """A DCP directory as a source: one state dict per top-level entry that holds a model's tensors."""

    format = DCP

    def __init__(self, path: Path, trust_pickle: bool = False) -> None:
        self.path, self.trust_pickle = path, trust_pickle
        self.reader = _reader(path, trust_pickle)
        metadata = self.reader.read_metadata()
        self.entries: dict[str, Any] = dict(metadata.state_dict_metadata)
        planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
        self.paths: dict[str, tuple[Any, ...]] = {fqn: tuple(planner_data.get(fqn, (fqn,))) for fqn in self.entries}
        self.files = sorted({str(info.relative_path) for info in metadata.storage_data.values()})
        for name in self.files:
            if Path(name).name != name or not (path / name).is_file():
                raise CheckpointError(f"{path}: its metadata names the file {name!r}, which is not in it")
        self.fingerprint = Fingerprint([path / METADATA_FILE, *(path / name for name in self.files)])
        self.parts = [self._part(location) for location in self._locations()]
        if not self.parts:
            raise CheckpointError(f"{path}: a DCP checkpoint without tensors; nothing to read")

    def _locations(self) -> list[tuple[str, ...]]:
        """``()`` for a flat state dict; else each top-level entry holding tensors, but optimizer state."""
        tensors = [p for fqn, p in self.paths.items() if self._is_tensor(fqn)]
        if all(len(p) == 1 for p in tensors):
            return [()] if tensors else []
        groups = dict.fromkeys(str(p[0]) for p in tensors if len(p) == 2 and isinstance(p[1], str))
        return [(g,) for g in groups if g not in self.optimizer_groups()]

    def optimizer_groups(self) -> list[str]:
        """Top-level entries that are an optimizer's state (``state`` and ``param_groups`` below them)."""
        below: dict[str, set[Any]] = {}
        for p in self.paths.values():
            if len(p) > 1:  # nested (``state``), or flattened (``state.conv.weight.exp_avg``)
                below.setdefault(str(p[0]), set()).add(str(p[1]).split(".", 1)[0])
        return [g for g, keys in below.items() if {"state", "param_groups"} <= keys]

    def group(self, name: str, tensors: bool = True) -> dict[tuple[Any, ...], Any]:
        """The entries below the top-level entry ``name``, loaded, by their path below it (tensors left out
        unless ``tensors``)."""
        holder: dict[str, Any] = {}
        for fqn, p in self.paths.items():
            if str(p[0]) != name:
                continue
            if self._is_tensor(fqn):
                if tensors:
                    meta = self.entries[fqn]
                    holder[fqn] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            else:
                holder[fqn] = None
        if holder:
            self.load(holder)
        return {tuple(self.paths[fqn][1:]): value for fqn, value in holder.items()}

    def _is_tensor(self, fqn: str) -> bool:
        return type(self.entries[fqn]).__name__ == "TensorStorageMetadata"

    def _part(self, location: tuple[str, ...]) -> StoredStateDict:
        specs: dict[str, TensorSpec] = {}
        fqns: dict[str, str] = {}
        records_fqn = None
        for fqn, p in self.paths.items():
            if tuple(p[: len(location)]) != location or len(p) != len(location) + 1:
                continue
            key = str(p[-1])
            if key == METADATA_KEY and not self._is_tensor(fqn):
                records_fqn = fqn
            elif self._is_tensor(fqn):
                meta = self.entries[fqn]
                specs[key] = TensorSpec(tuple(meta.size), dtype_name(meta.properties.dtype))
                fqns[key] = fqn
        records: dict[str, LayerRecord] = {}
        if records_fqn is not None:
            holder: dict[str, Any] = {records_fqn: None}
            self.load(holder)
            records = parse_records(holder[records_fqn], str(self.path))
        return StoredStateDict(location, specs, records, lambda key: DcpTensor(self, fqns[key], specs[key]))

    def load(self, state_dict: dict[str, Any]) -> None:
        """torch's ``dcp.load`` of these entries (flat names), in this process."""
        from torch.distributed.checkpoint.state_dict_loader import load

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _unwrapped(load, state_dict, storage_reader=self.reader, planner=_planner(self.trust_pickle),
                           no_dist=True)  # fmt: skip
            except (CheckpointError, RefusedError):
                raise
            except Exception as e:
                detail = (str(e).strip().splitlines() or [""])[0][:120]
                raise CheckpointError(
                    f"{self.path}: a DCP entry cannot be read ({type(e).__name__}: {detail})"
                ) from None

    def others(self, locations: list[tuple[str, ...]], dropped: list[str]) -> dict[str, Any]:
        """Every entry outside the converted state dicts and the dropped groups, loaded (flat name -> value), and
        the tensors among them as meta tensors of their shape (written as they are read)."""
        out: dict[str, Any] = {}
        objects: dict[str, Any] = {}
        for fqn, p in self.paths.items():
            inside = any(tuple(p[: len(loc)]) == loc and len(p) == len(loc) + 1 for loc in locations)
            if inside or str(p[0]) in dropped:
                continue
            if self._is_tensor(fqn):
                meta = self.entries[fqn]
                out[fqn] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device="meta")
            else:
                objects[fqn] = None
        if objects:
            self.load(objects)
        return out | objects

    def inputs(self) -> list[Path]:
        return [self.path, self.path / METADATA_FILE, *(self.path / name for name in self.files)]

    def metadata(self, name: str | None = None) -> dict[str, str]:
        return {}

    def check_unchanged(self) -> None:
        self.fingerprint.check(self.path)

    def close(self) -> None:
        pass


def nest(flat: Mapping[str, Any], paths: Mapping[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Flat DCP names back into the nested state dict they came from (``paths``: DCP's planner data)."""
    out: dict[Any, Any] = {}
    for fqn, value in flat.items():
        path = paths.get(fqn, (fqn,))
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    nested: dict[str, Any] = _lists(out)
    return nested


def _lists(node: Any) -> Any:
    """Nodes whose keys are list indices (DCP's path of a list item is its int index) back into lists."""
    if not isinstance(node, dict):
        return node
    items = {k: _lists(v) for k, v in node.items()}
    if items and all(type(k) is int for k in items) and sorted(items) == list(range(len(items))):
        return [items[i] for i in range(len(items))]
    return items


def _unwrapped(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(...)``, raising what failed inside it: DCP wraps every exception of its steps, a signal's
    KeyboardInterrupt and a full disk's OSError included, in a CheckpointException (a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return call(*args, **kwargs)
    except CheckpointException as e:
        inner = next(iter(e.failures.values()), (None, None))[0]
        if isinstance(inner, BaseException):
            raise inner from None
        raise


def write_dcp(directory: Path, state: Mapping[str, Any], produce: Callable[[str], torch.Tensor], target: Path) -> None:
    """``dcp.save`` of the nested ``state`` into ``directory``, one tensor per file: meta tensors in ``state`` are
    computed by ``produce(flat name)`` when the writer comes to them."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    class Lazy(DefaultSavePlanner):  # type: ignore[misc]
        def resolve_data(self, write_item: Any) -> Any:
            value = super().resolve_data(write_item)
            if isinstance(value, torch.Tensor) and value.is_meta:
                return produce(write_item.index.fqn)
            return value

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = FileSystemWriter(str(directory), single_file_per_rank=False, sync_files=True, thread_count=1)
        try:
            _unwrapped(save, dict(state), storage_writer=writer, planner=Lazy(), no_dist=True)
        except OSError as e:  # a refused write of torch's writer: said as ours are
            from .atomic import output_error

            raise output_error(target, e) from None


def records_entry(records: Mapping[str, LayerRecord]) -> str:
    """The records of a converted state dict in a DCP checkpoint, with the torch version that wrote it (JSON text:
    DCP would spread a dict over entries of its own)."""
    return json.dumps({**records_document(records, __version__), "torch": str(torch.__version__)}, sort_keys=True)


def verify_dcp(directory: Path, expected: Mapping[str, TensorSpec], target: Path) -> None:
    """Read the written metadata back (safely): every tensor as planned."""
    metadata = _reader(directory, False).read_metadata()
    entries = metadata.state_dict_metadata.items()
    got = {fqn: TensorSpec(tuple(m.size), dtype_name(m.properties.dtype))
           for fqn, m in entries if type(m).__name__ == "TensorStorageMetadata"}  # fmt: skip
    if got != dict(expected):
        raise read_back_differs(target)


def fsync_tree(directory: Path) -> None:
    """Sync every file in ``directory`` (written by torch's writer, not by us)."""
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ---- the format: its reader and its writer --------------------------------------------------------------------


def source(path: Path, fmt: str, reading: Reading) -> DcpSource:
    """A distributed checkpoint's directory as a source."""
    return DcpSource(path, reading.trust_pickle)


def sink(src: Source, plans: Planned, target: Path, writing: Writing) -> Sink:
    """A distributed checkpoint in, one out: the same entries, the converted state dicts changed, optimizer entries
    converted with them (or left out), each tensor computed when torch's writer asks for it."""
    assert isinstance(src, DcpSource)  # only a DCP input is written as one (formats.writer_format)
    groups, dropped = src.optimizer_groups(), []
    optimizers: list[OptimizerReport] = []
    converted: dict[str, dict[tuple[Any, ...], Any]] = {}
    for group in groups:
        if writing.optimizer == "drop":
            entries = src.group(group, tensors=False)
            report = removed_report(group, _dcp_options(entries), DROP_ASKED)
        else:
            entries, report = convert_dcp_entries(src.group(group), plans[0][0].specs, plans[0][1].steps, group)
        if writing.optimizer == "drop" or report.removed:
            dropped.append(group)
        else:
            converted[group] = entries
        optimizers.append(report)

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        flat = src.others([part.container_keys for part, _ in plans], groups)
        paths = dict(src.paths)
        produce: dict[str, Callable[[], torch.Tensor]] = {}
        for group, entries in converted.items():
            for tail, value in entries.items():
                fqn = ".".join(map(str, (group, *tail)))
                flat[fqn], paths[fqn] = value, (group, *tail)

        for fqn, value in flat.items():
            if isinstance(value, torch.Tensor):
                spec = TensorSpec(tuple(value.shape), dtype_name(value.dtype))
                produce[fqn] = DcpTensor(src, fqn, spec).whole if value.is_meta else _constant(value)
        for part, plan in plans:
            by_target = {s.target_key: s for s in plan.steps}
            for name, after in plan.output_specs(part.specs).items():
                fqn = ".".join((*part.container_keys, name))
                flat[fqn] = torch.empty(after.shape, dtype=getattr(torch, after.dtype), device="meta")
                paths[fqn] = (*part.container_keys, name)
                step = by_target.get(name)
                produce[fqn] = _transformed(part, step, run) if step else part.tensor(name).whole
            if plan.records:
                fqn = ".".join((*part.container_keys, METADATA_KEY))
                flat[fqn], paths[fqn] = records_entry(plan.records), (*part.container_keys, METADATA_KEY)
        write_dcp(output.path, nest(flat, paths), lambda fqn: produce[fqn](), target)
        fsync_tree(output.path)
        expected = {fqn: TensorSpec(tuple(v.shape), dtype_name(v.dtype))
                    for fqn, v in flat.items() if isinstance(v, torch.Tensor)}  # fmt: skip
        return lambda written: verify_dcp(written, expected, target)

    return Sink(target, DCP, True, write, dropped=dropped, optimizers=optimizers)


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def _dcp_options(entries: Mapping[tuple[Any, ...], Any]) -> dict[str, Any]:
    """An optimizer state dict of a DCP optimizer entry's parameter-group options (enough to name its class)."""
    options: dict[str, Any] = {}
    for tail, value in entries.items():
        p = parsed_path(tail)
        if p is not None and p[0] == "param_groups":
            options[p[2]] = value
    return {"state": {}, "param_groups": [options]}


def _transformed(part: StoredStateDict, step: Step, run: Run) -> Callable[[], torch.Tensor]:
    return lambda: assemble(step, run(part, step))[0]
