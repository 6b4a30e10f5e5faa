"""safetensors read tensor by tensor: a validating header parser, and reads of whole tensors or rows of them.

The header is parsed and checked before anything else is read (dtype known, sizes agree with shapes, offsets
inside the file, no overlap, no gap), so a lying header is reported instead of read past. Files and sharded
directories (with their index) open the same way. Writing is :mod:`spectral_cli.writer`. Imports no torch at
module level.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError
from .formats import INDEX_SUFFIX, find_index
from .layout import ITEMSIZE, METADATA_KEY, SAFETENSORS_DTYPES, TensorSpec

if TYPE_CHECKING:
    import torch

_MAX_HEADER = 100_000_000
_PREADV = getattr(os, "preadv", None)
_SEEK_LOCK = threading.Lock()


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: its spec and absolute byte range."""

    spec: TensorSpec
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return {k: e.spec for k, e in self.entries.items()}


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; :class:`CheckpointError` names what is wrong."""
    size_on_disk = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size_on_disk:
            raise CheckpointError(f"{path}: truncated or damaged safetensors header (declares {n} bytes)")
        text = f.read(n)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: hostile nesting depth
        raise CheckpointError(f"{path}: damaged safetensors header (not JSON)") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: damaged safetensors header (__metadata__ must map str to str)")
    data_start = 8 + n
    entries = {name: _entry(path, name, info, data_start) for name, info in doc.items()}
    _check_layout(path, entries, data_start, size_on_disk)
    return Header(path, entries, {str(k): v for k, v in meta.items()}, data_start)


def _entry(path: Path, name: str, info: Any, data_start: int) -> Entry:
    try:
        code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[code]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: 1e400 read as an offset
        raise CheckpointError(f"{path}: damaged safetensors header entry for {name!r}: {info!r}"[:300]) from None
    spec = TensorSpec(shape, dtype)
    if min(shape, default=0) < 0 or begin < 0 or end - begin != spec.numel * ITEMSIZE[dtype]:
        raise CheckpointError(
            f"{path}: safetensors header lies about {name!r}: offsets {begin}..{end} do not hold {dtype} {shape}"
        )
    return Entry(spec, data_start + begin, data_start + end)


def _check_layout(path: Path, entries: Mapping[str, Entry], data_start: int, size: int) -> None:
    position = data_start
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            problem = "overlaps the previous tensor" if entry.start < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: safetensors header lies: {name!r} {problem}")
        position = entry.end
    if position != size:
        what = "truncated" if position > size else "has trailing bytes"
        raise CheckpointError(f"{path}: safetensors data is {what} ({size - data_start} bytes, header says "
                              f"{position - data_start})")  # fmt: skip


def read_tensor(f: BufferedReader, entry: Entry) -> torch.Tensor:
    """One tensor, read into memory of its own (no mmap, so resident memory is only what is in use; no zero fill
    before the read). Reads with ``pread``: the file position is not used."""
    import torch

    tensor = torch.empty(entry.spec.shape, dtype=getattr(torch, entry.spec.dtype))
    _pread_into(f, tensor_bytes(tensor), entry.start)
    return tensor


def _pread_into(f: BufferedReader, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset`` of ``f``: ``preadv`` (no file position, so threads may share ``f``), or where
    the system has none (Windows) seek and read under a lock."""
    done = 0
    while done < len(view):
        if _PREADV is not None:
            n = _PREADV(f.fileno(), [view[done:]], offset + done)
        else:
            with _SEEK_LOCK:
                f.seek(offset + done)
                n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{f.name}: ended while reading a tensor; the file is truncated")
        done += n


def read_rows(
    f: BufferedReader, entry: Entry, shape: tuple[int, ...], start: int, end: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``start:end`` of the tensor of ``entry`` viewed as ``shape`` (rows first), read into memory of their own
    (``out``, flat and of the right size and dtype, when given).

    Reads with ``pread``, so threads may read different rows of one file at once.
    """
    import torch

    dtype = getattr(torch, entry.spec.dtype)
    rows = torch.empty((end - start, *shape[1:]), dtype=dtype) if out is None else out.view(end - start, *shape[1:])
    row_bytes = (entry.end - entry.start) // shape[0] if shape[0] else 0
    _pread_into(f, tensor_bytes(rows), entry.start + start * row_bytes)
    return rows


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy and without numpy (torch does not need it).

    The view does not keep the tensor alive: use it while holding the tensor.
    """
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if not nbytes:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


@dataclass
class SafetensorsInput:
    """A safetensors checkpoint: one file, or the shards named by a ``*.safetensors.index.json``."""

    source: Path
    headers: list[Header]
    #: key -> the header (file) holding it
    owner: dict[str, Header]
    index_path: Path | None = None
    index: dict[str, Any] = field(default_factory=dict)

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return {k: h.entries[k].spec for k, h in self.owner.items()}

    @property
    def records_json(self) -> list[Any]:
        """The ``spectral_cli`` metadata document of every file that has one."""
        docs = []
        for header in self.headers:
            raw = header.metadata.get(METADATA_KEY)
            if raw:
                try:
                    docs.append(json.loads(raw))
                except (ValueError, RecursionError):
                    raise CheckpointError(f"{header.path}: unreadable {METADATA_KEY} metadata: {raw[:80]!r}") from None
        return docs


def open_safetensors(source: Path) -> SafetensorsInput:
    """Read (and validate) the header of a safetensors file, or of every shard of a sharded checkpoint."""
    if not source.is_dir() and not source.name.endswith(INDEX_SUFFIX):
        header = read_header(source)
        return SafetensorsInput(source, [header], dict.fromkeys(header.entries, header))
    index_path = source if not source.is_dir() else find_index(source)
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError):
        raise CheckpointError(f"{index_path}: not a safetensors index (a JSON object with a weight_map)") from None
    headers: dict[str, Header] = {}
    for shard in dict.fromkeys(str(v) for v in weight_map.values()):
        path = index_path.parent / shard
        if Path(shard).name != shard or not path.is_file():
            raise CheckpointError(f"{index_path}: names shard {shard!r}, which is not a file beside it")
        headers[shard] = read_header(path)
    owner: dict[str, Header] = {}
    for shard, header in headers.items():
        for key in header.entries:
            if key in owner:
                raise CheckpointError(f"{header.path}: tensor {key!r} is also in {owner[key].path.name}")
            if weight_map.get(key) != shard:
                raise CheckpointError(f"{index_path}: does not map {key!r} to {shard}, which holds it")
            owner[key] = header
    missing = [k for k in weight_map if k not in owner]
    if missing:
        raise CheckpointError(f"{index_path}: maps {missing[0]!r} to a shard that does not hold it")
    return SafetensorsInput(index_path, list(headers.values()), owner, index_path, index)
