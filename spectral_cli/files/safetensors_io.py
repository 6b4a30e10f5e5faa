"""safetensors files: the validating header parser, the source (tensors read on demand), and the one writer of
every safetensors output (a ``.pt`` converted to ``.safetensors`` included). Imports no torch at module level.

The header is parsed and checked before anything else is read, as strictly as safetensors itself reads it:
valid UTF-8, no duplicate or unencodable names, known dtypes, shapes of non-negative JSON integers whose size
fits, offsets inside the file, no overlap, no gap. A lying header is reported (exit 3) instead of read past.

The writer lays out the whole header first (from a plan), then writes each tensor as it comes: untouched ones
copied as raw bytes (``copy_file_range`` where the kernel can), converted ones in pieces as they are made, so
memory stays near a few slabs whatever the size of the file. A thread of its own ``fdatasync``\\ s the file
every ``writeback_bytes``, so that the final sync finds little left to do.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import threading
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import CheckpointError, RefusedError
from ..statedict.keys import ITEMSIZE, TensorSpec
from ..statedict.records import METADATA_KEY, LayerRecord, parse_records, records_document
from ..transform.kernels import dtype_name
from .atomic import OutFile, Output
from .checkpoint import (
    WRITEBACK_BYTES,
    Fingerprint,
    Planned,
    Reading,
    Run,
    Sink,
    Source,
    StoredStateDict,
    Tick,
    Writing,
    by_name,
    ordered,
    produce,
    read_back_differs,
    total_bytes,
)
from .formats import DCP, MAX_SAFETENSORS_HEADER, SAFETENSORS, open_regular
from .syscalls import SYSCALLS, Syscalls

if TYPE_CHECKING:
    import torch

    from ..statedict.surgery import Changes

#: safetensors dtype codes -> torch dtype names
DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
CODES = {name: code for code, name in DTYPES.items()}

#: bytes written between two background fdatasyncs of the file being written
_LARGEST = (1 << 63) - 1
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_SEEK_LOCK = threading.Lock()


# ---- the header ----------------------------------------------------------------------------------------------


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

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return {k: e.spec for k, e in self.entries.items()}

    @property
    def records(self) -> dict[str, LayerRecord]:
        return parse_records(self.metadata.get(METADATA_KEY), str(self.path))


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object without duplicate names (Python would keep the last; a reader may take the first)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        name = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the name {name!r} appears twice")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON can spell (\\ud800) and UTF-8 cannot
        return False
    return True


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _LARGEST


def read_header(path: Path, fd: int | None = None) -> Header:
    """Parse and validate a safetensors header; :class:`CheckpointError` names what is wrong."""
    own = fd is None
    fd = open_regular(path) if fd is None else fd
    try:
        size_on_disk = os.fstat(fd).st_size
        raw = os.pread(fd, 8, 0)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size_on_disk:
            raise CheckpointError(f"{path}: truncated or damaged safetensors header (declares {n} bytes)")
        data = os.pread(fd, n, 8)
    finally:
        if own:
            os.close(fd)
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_unique, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: damaged safetensors header (not valid UTF-8)") from None
    except (ValueError, RecursionError) as e:  # RecursionError: hostile nesting depth
        detail = f": {e}" if "twice" in str(e) else ""
        raise CheckpointError(f"{path}: damaged safetensors header (not JSON{detail})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: damaged safetensors header (__metadata__ must map str to str)")
    bad = next((t for t in (*doc, *meta, *meta.values()) if not _encodable(t)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: damaged safetensors header ({bad!r} is not valid UTF-8)")
    entries = {name: _entry(path, name, info, 8 + n) for name, info in doc.items()}
    _check_layout(path, entries, 8 + n, size_on_disk)
    return Header(path, entries, meta)


def _entry(path: Path, name: str, info: Any, data_start: int) -> Entry:
    def damaged(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: damaged safetensors header entry for {name!r} ({problem}): {info!r}"[:300])

    # one pass per number, no generator: a header can list hundreds of thousands of tensors
    if not isinstance(info, dict) or info.keys() != _ENTRY_KEYS:
        raise damaged("not {dtype, shape, data_offsets}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise damaged(f"unknown dtype {code!r}")
    if not isinstance(shape, list):
        raise damaged("its shape is not a list of non-negative integers")
    numel, nonzero = 1, 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= _LARGEST:
            raise damaged("its shape is not a list of non-negative integers")
        numel *= d
        nonzero *= d or 1
    if not (isinstance(offsets, list) and len(offsets) == 2 and _is_count(offsets[0]) and _is_count(offsets[1])):
        raise damaged("its data_offsets are not two non-negative integers")
    itemsize = ITEMSIZE[dtype]
    if nonzero * itemsize > _LARGEST:
        raise damaged("its shape holds more bytes than any file")
    spec = TensorSpec(tuple(shape), dtype)
    begin, end = offsets
    if end - begin != numel * itemsize:
        raise CheckpointError(
            f"{path}: safetensors header lies about {name!r}: offsets {begin}..{end} do not hold {spec.dtype} "
            f"{spec.shape}"
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


def header_bytes(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and JSON header of a file holding ``specs`` in this order (padded to 8 bytes)."""
    doc: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, spec in specs.items():
        doc[name] = {"dtype": CODES[spec.dtype], "shape": list(spec.shape),
                     "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def unstorable(values: Mapping[str, Any]) -> list[str]:
    """What of a state dict safetensors cannot hold, as ``"<key> (<why>)"``: non-tensors (``_extra_state``
    objects), sparse, nested, meta and quantized tensors, dtypes it has no code for, names that are not UTF-8."""
    import torch

    from ..statedict.surgery import spec_of

    problems = []
    for key, value in values.items():
        if not _encodable(key):
            problems.append(f"{key!r} (a name that is not valid UTF-8)")
        elif not isinstance(value, torch.Tensor):
            problems.append(f"{key} (a {type(value).__name__}, not a tensor)")
        elif spec_of(value).kind != "dense":
            problems.append(f"{key} ({spec_of(value).kind})")
        elif spec_of(value).dtype not in CODES:
            problems.append(f"{key} ({spec_of(value).dtype})")
    return problems


def refuse_unstorable(values: Mapping[str, Any], target: Path) -> None:
    problems = unstorable(values)
    if problems:
        shown = ", ".join(problems[:4]) + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise RefusedError(f"{target}: safetensors cannot hold {shown}; write a .pt file instead (-o NAME.pt)")


# ---- reading -------------------------------------------------------------------------------------------------


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy and without numpy (torch does not need it).

    The view keeps the tensor alive: ``tensor_bytes(t.contiguous())`` stays valid after the copy's last name is
    gone. A tensor whose bytes are not its values (a lazy conjugate or negation) is refused, as a non-contiguous
    one is; :func:`value_bytes` gives the bytes of any tensor.
    """
    if not tensor.is_contiguous() or not tensor.is_cpu or tensor.is_conj() or tensor.is_neg():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor whose bytes are its values")
    nbytes = tensor.nbytes
    if not nbytes:
        return memoryview(b"")
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    array._tensor = tensor  # type: ignore[attr-defined]  # the memory stays the tensor's while the view lives
    return memoryview(array).cast("B")


def value_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor``'s values in row-major order, as a file holds them: a view of its memory when that
    is laid out so, else of a copy (transposed, sliced, expanded, channels-last, conjugated tensors; another
    device), which the view keeps alive."""
    try:
        return tensor_bytes(tensor)  # laid out as a file holds it (a piece of a convert): no call more
    except ValueError:
        pass
    plain = tensor.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
    return tensor_bytes(plain)


def pread_into(fd: int, view: memoryview, offset: int, path: Path, syscalls: Syscalls = SYSCALLS) -> None:
    """Fill ``view`` from ``offset`` of ``fd``: ``preadv`` (no file position, so threads may share ``fd``), or
    where the system has none a seek and a read under a lock."""
    done = 0
    while done < len(view):
        try:
            if syscalls.preadv is not None:
                n = syscalls.preadv(fd, [view[done:]], offset + done)
            else:
                with _SEEK_LOCK:
                    os.lseek(fd, offset + done, os.SEEK_SET)
                    chunk = os.read(fd, len(view) - done)
                view[done : done + len(chunk)] = chunk
                n = len(chunk)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check the disk") from None
        if not n:
            raise CheckpointError(f"{path}: ended while reading a tensor; the file is truncated")
        done += n


class FileTensor:
    """A tensor of a safetensors file, read when needed (:class:`~spectral_cli.statedict.surgery.ReadableTensor`)."""

    def __init__(self, fd: int | Callable[[], int], path: Path, entry: Entry, syscalls: Syscalls) -> None:
        self._fd, self.path, self.entry, self.syscalls = fd, path, entry, syscalls

    @property
    def fd(self) -> int:
        """The file's descriptor (``fd``, or opened when first needed: shards are opened as they are read)."""
        return self._fd if isinstance(self._fd, int) else self._fd()

    def read(self, offset: int, out: torch.Tensor) -> None:
        view = tensor_bytes(out)
        if offset < 0 or self.entry.start + offset + len(view) > self.entry.end:
            raise ValueError(f"read of {len(view)} bytes at {offset} is outside the tensor")
        pread_into(self.fd, view, self.entry.start + offset, self.path, self.syscalls)

    def whole(self) -> torch.Tensor:
        import torch

        tensor = torch.empty(self.entry.spec.shape, dtype=getattr(torch, self.entry.spec.dtype))
        self.read(0, tensor)
        return tensor


class SafetensorsSource:
    """A safetensors file as a source: its header, checked, and its tensors read on demand."""

    format = SAFETENSORS

    def __init__(self, path: Path, syscalls: Syscalls = SYSCALLS) -> None:
        self.path, self.syscalls = path, syscalls
        self.fd = open_regular(path)
        try:
            self.header = read_header(path, self.fd)
            self.parts = [StoredStateDict((), self.header.specs, self.header.records, self.tensor)]
        except BaseException:
            os.close(self.fd)
            raise
        self.fingerprint = Fingerprint([self.fd])

    def tensor(self, key: str) -> FileTensor:
        return FileTensor(self.fd, self.path, self.header.entries[key], self.syscalls)

    def metadata(self, name: str | None = None) -> dict[str, str]:
        """The ``__metadata__`` an output file of this input starts from."""
        return self.header.metadata

    def inputs(self) -> list[Path]:
        return [self.path]

    def check_unchanged(self) -> None:
        self.fingerprint.check(self.path)

    def close(self) -> None:
        os.close(self.fd)


# ---- writing -------------------------------------------------------------------------------------------------


def write_safetensors(
    out: OutFile,
    specs: Mapping[str, TensorSpec],
    metadata: Mapping[str, str],
    produce: Callable[[str], Any],
    progress: Callable[[int, bool], None] | None = None,
    writeback_bytes: int = WRITEBACK_BYTES,
) -> bytes:
    """Write a safetensors file into ``out``: the header from ``specs``, then each tensor from ``produce(name)``;
    returns the header written (for :func:`verify_header`).

    ``produce`` returns a tensor carried over unchanged (a :class:`FileTensor`'s bytes are copied file to file,
    another's values written), or the pieces of a
    transformed one (:data:`~spectral_cli.statedict.surgery.Changes`: ``(byte offset, piece)`` in any order
    that together cover it once; each piece is written before the next is asked for). ``progress(nbytes,
    tensor_done)`` is called for each piece written and once more when a tensor is done.
    """
    header = header_bytes(specs, metadata)
    out.write(header, 0)
    position = len(header)
    with _EarlyWriteback(out, writeback_bytes) as writeback:

        def wrote(nbytes: int) -> None:  # one piece of a tensor
            writeback.wrote(nbytes)
            if progress is not None:
                progress(nbytes, False)

        for name, spec in specs.items():
            source = produce(name)
            if isinstance(source, Generator):
                _write_pieces(out, position, name, spec, source, wrote)
                written = 0  # counted piece by piece
            else:
                _carry(source, out, position)
                writeback.wrote(spec.nbytes)
                written = spec.nbytes
            position += spec.nbytes
            if progress is not None:
                progress(written, True)
    return header


def _carry(tensor: Any, out: OutFile, offset: int) -> None:
    """A tensor carried over unchanged, written at ``offset``: a file's bytes copied, another's values written."""
    if isinstance(tensor, FileTensor):
        out.copy(tensor.fd, tensor.entry.start, tensor.entry.end - tensor.entry.start, offset)
    else:
        out.write(value_bytes(tensor.whole()), offset)


class _EarlyWriteback:
    """Has the kernel write a file's data to disk while more is being written: ``fdatasync`` on a thread of its
    own every ``writeback_bytes``, so that the fsync before the rename finds little left to do (otherwise it is a
    large part of a convert: docs/measurements.md). An error of a background fdatasync is raised by
    ``wrote`` or at the end of the block (the kernel reports it once, to that call)."""

    def __init__(self, out: OutFile, every: int) -> None:
        self._out, self._every = out, every
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> _EarlyWriteback:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self._join()
        if kind is None:
            self._raise()

    def wrote(self, nbytes: int) -> None:
        self._pending += nbytes
        self._raise()
        if self._pending < self._every or (self._thread is not None and self._thread.is_alive()):
            return
        self._join()
        self._pending = 0
        thread = threading.Thread(target=self._sync, name="spectral-writeback", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (e.g. address space capped): the final fsync does it all
            self._pending = -(1 << 62)
            return
        self._thread = thread

    def _sync(self) -> None:
        try:
            self._out.datasync()
        except BaseException as e:  # kept for the writing thread to raise
            self._error = e

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _write_pieces(
    out: OutFile,
    position: int,
    name: str,
    spec: TensorSpec,
    pieces: Changes,
    wrote: Callable[[int], None],
) -> None:
    """Write each ``(offset, piece)`` at ``position + offset``, then ``wrote(its size)``; the pieces must cover the
    tensor exactly once."""
    covered: list[tuple[int, int]] = []
    try:
        for offset, piece in pieces:
            size = piece.numel() * piece.element_size()
            if offset < 0 or offset + size > spec.nbytes or dtype_name(piece.dtype) != spec.dtype:
                raise ValueError(f"{name}: produced a {piece.dtype} piece at {offset}..{offset + size}, outside {spec}")
            out.write(value_bytes(piece), position + offset)
            covered.append((offset, offset + size))
            wrote(size)
    finally:
        pieces.close()  # a generator stops its work (threads) now, also when writing failed
    end = 0
    for start, stop in sorted(covered):
        if start != end:
            raise ValueError(f"{name}: the pieces produced do not cover {spec} exactly once")
        end = stop
    if end != spec.nbytes:
        raise ValueError(f"{name}: the pieces produced do not cover {spec} exactly once")


def verify_header(
    path: Path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str], target: Path, header: bytes | None = None
) -> None:
    """Read a written header back (before it is renamed into place): byte for byte the header of every tensor and
    record as planned (``header``, if given: what :func:`write_safetensors` wrote for them), in a file of the size
    it promises. The values are read back by the strict reader in :func:`~spectral_cli.files.verify.verify_output`
    (parsing the header here as well would parse it a second time, which is slow for many tensors)."""
    expected = header_bytes(specs, metadata) if header is None else header
    size = len(expected) + sum(spec.nbytes for spec in specs.values())
    fd = open_regular(path)
    try:
        same = os.fstat(fd).st_size == size and os.pread(fd, len(expected), 0) == expected
    finally:
        os.close(fd)
    if not same:
        raise read_back_differs(target)


def file_metadata(
    base: Mapping[str, str], records: Mapping[str, LayerRecord], keys: Iterable[str] | None = None
) -> dict[str, str]:
    """A safetensors file's ``__metadata__``: the input's entries, ``format: pt``, and the records of its tensors
    (``keys``: those of one shard)."""
    meta = {k: v for k, v in base.items() if k != METADATA_KEY}
    meta.setdefault("format", "pt")
    mine = dict(records) if keys is None else {k: records[k] for k in keys if k in records}
    if mine:
        meta[METADATA_KEY] = json.dumps(records_document(mine, __version__), sort_keys=True)
    return meta


# ---- the format: its reader and its writer --------------------------------------------------------------------


def source(path: Path, fmt: str, reading: Reading) -> SafetensorsSource:
    """A safetensors file as a source."""
    return SafetensorsSource(path, reading.syscalls)


def sink(src: Source, plans: Planned, target: Path, writing: Writing) -> Sink:
    """One safetensors file of the input's one state dict, its tensors in the order of their names, each streamed
    as it is transformed (or copied as it is)."""
    whole = plans[0][0].container_keys == () or src.format == DCP  # a DCP model's state dict may be written alone
    if len(plans) != 1 or not whole:
        raise RefusedError(f"{target}: safetensors holds only tensors, and {src.path} is a container; write a .pt file")
    part, plan = plans[0]
    if part.values is not None:
        refuse_unstorable(part.values, target)
    specs = by_name(plan.output_specs(part.specs))
    metadata = file_metadata(src.metadata(), plan.records)

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        header = write_safetensors(output.file(), specs, metadata, produce(part, plan, run), tick,
                                   writing.io.writeback_bytes)  # fmt: skip
        return lambda written: verify_header(written, specs, metadata, target, header)

    return Sink(target, SAFETENSORS, False, write, total_bytes(specs), len(specs), order=ordered(part, plan, specs))
