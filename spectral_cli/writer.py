"""safetensors written as a stream: the whole header first (laid out from a plan), then each tensor as it is
produced.

Untouched tensors are copied as raw bytes (``copy_file_range`` where the kernel can), never materialised;
converted ones arrive in pieces from :mod:`spectral_cli.slabs`. So memory stays near a few slabs, not the file.
The file is written atomically (:func:`~spectral_cli.formats.atomic_file`), with an ``fdatasync`` on a thread
of its own every :data:`WRITEBACK_BYTES`. Imports no torch at module level.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import CheckpointError
from .formats import atomic_file
from .layout import SAFETENSORS_DTYPES, TensorSpec
from .stream import tensor_bytes

if TYPE_CHECKING:
    import torch

_COPY_CHUNK = 16 << 20
_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
_COPY_FILE_RANGE = getattr(os, "copy_file_range", None)
_DATASYNC = getattr(os, "fdatasync", os.fsync)
#: bytes written between two background fdatasyncs of the file being written
WRITEBACK_BYTES = 64 << 20
#: errors of copy_file_range that mean "not here" (old kernel, other file systems, seccomp): copy by hand
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}


def header_bytes(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and JSON header of a file holding ``specs`` in this order (padded to 8 bytes)."""
    doc: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, spec in specs.items():
        if spec.dtype not in _CODES:
            raise CheckpointError(f"{name}: dtype {spec.dtype} cannot be stored in safetensors")
        doc[name] = {
            "dtype": _CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_stream(
    target: Path,
    specs: Mapping[str, TensorSpec],
    metadata: Mapping[str, str],
    produce: Callable[[str], Any],
    progress: Callable[[int, bool], None] | None = None,
    verify: Callable[[Path], None] | None = None,
) -> None:
    """Write a safetensors file atomically: header from ``specs``, then each tensor from ``produce(name)``.

    ``produce`` returns a tensor of the planned spec; or an iterator of ``(byte offset, tensor)``, the planned
    tensor in pieces of its dtype, in any order, that together cover it (each piece is written before the next
    is asked for); or ``(file, start, end)`` to copy bytes unchanged (in the kernel where it can:
    ``copy_file_range``). Tensors are written from their own memory, without copies. ``progress(nbytes,
    tensor_done)`` is called for each piece written and once more when a tensor is done.
    """
    with atomic_file(target, verify) as out, _EarlyWriteback(out) as writeback:

        def wrote(nbytes: int) -> None:  # one piece of a tensor
            writeback.wrote(nbytes)
            if progress is not None:
                progress(nbytes, False)

        header = header_bytes(specs, metadata)
        out.write(header)
        position = len(header)
        for name, spec in specs.items():
            source = produce(name)
            out.seek(position)
            if isinstance(source, tuple):
                handle, start, end = source
                written = _copy_range(handle, start, end, out)
                writeback.wrote(written)
            elif isinstance(source, Iterator):
                _write_pieces(out, position, name, spec, source, wrote)
                written = 0  # counted piece by piece
            else:
                written = _write_tensor(out, name, spec, source)
                writeback.wrote(written)
            position += spec.nbytes
            if progress is not None:
                progress(written, True)


class _EarlyWriteback:
    """Has the kernel write a file's data to disk while more is being written: ``fdatasync`` on a thread of its
    own every :data:`WRITEBACK_BYTES`, so that the fsync before the rename finds little left to do (measured
    here: that fsync took 0.45 s of a 1.7 s convert of 1 GiB). An error of a background fdatasync is raised by
    ``wrote`` or at the end of the block (the kernel reports it once, to that call)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
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
        if self._pending < WRITEBACK_BYTES or (self._thread is not None and self._thread.is_alive()):
            return
        self._join()
        self._pending = 0
        self._out.flush()
        thread = threading.Thread(target=self._sync, name="spectral-writeback", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (e.g. address space capped): the final fsync does it all
            self._pending = -(1 << 62)
            return
        self._thread = thread

    def _sync(self) -> None:
        try:
            _DATASYNC(self._out.fileno())
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
    out: IO[bytes],
    position: int,
    name: str,
    spec: TensorSpec,
    pieces: Iterator[tuple[int, torch.Tensor]],
    wrote: Callable[[int], None],
) -> None:
    """Write each ``(offset, piece)`` at ``position + offset``, then ``wrote(its size)``; the pieces must cover the
    tensor exactly once."""
    covered: list[tuple[int, int]] = []
    try:
        for offset, piece in pieces:
            size = piece.numel() * piece.element_size()
            if offset < 0 or offset + size > spec.nbytes:
                raise CheckpointError(f"{name}: produced a piece at {offset}..{offset + size}, outside {spec}")
            out.seek(position + offset)
            _write_tensor(out, name, TensorSpec(tuple(piece.shape), spec.dtype), piece)
            covered.append((offset, offset + size))
            wrote(size)
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # a generator stops its work (threads) now, also when writing failed
    end = 0
    for start, stop in sorted(covered):
        if start != end:
            raise CheckpointError(f"{name}: the pieces produced do not cover {spec} exactly once")
        end = stop
    if end != spec.nbytes:
        raise CheckpointError(f"{name}: the pieces produced do not cover {spec} exactly once")


def _copy_range(f: IO[bytes], start: int, end: int, out: IO[bytes]) -> int:
    remaining = end - start
    if remaining and _COPY_FILE_RANGE is not None:
        out.flush()
        try:
            while remaining:
                n = _COPY_FILE_RANGE(f.fileno(), out.fileno(), remaining, start + (end - start - remaining))
                if n == 0:
                    raise CheckpointError(f"{f.name}: ended while copying a tensor; the file is truncated")
                remaining -= n
            return end - start
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
    f.seek(start + (end - start - remaining))
    while remaining:
        chunk = f.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise CheckpointError(f"{f.name}: ended while copying a tensor; the file is truncated")
        out.write(chunk)
        remaining -= len(chunk)
    return end - start


def _write_tensor(out: IO[bytes], name: str, spec: TensorSpec, tensor: torch.Tensor) -> int:
    if tuple(tensor.shape) != spec.shape or str(tensor.dtype).removeprefix("torch.") != spec.dtype:
        raise CheckpointError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {spec}")
    flat = tensor.detach().cpu().contiguous()
    out.write(tensor_bytes(flat))  # the tensor's own bytes, no copy
    return spec.nbytes
