"""File formats, output naming and atomic writing; imports no torch.

Formats are detected from the bytes, never from the extension:

* ``safetensors`` -- 8-byte little-endian header length, then a JSON header;
* ``safetensors-sharded`` -- a directory (or its ``*.safetensors.index.json``) of Hugging Face shards;
* ``torch`` -- ``torch.save``'s zip archive (``.pt``, ``.pth``, ``.bin``, ``.ckpt``);
* ``torch-legacy`` -- the pre-1.6 pickle stream; read, and written back as a zip archive.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import CheckpointError, RefusedError

SAFETENSORS = "safetensors"
SHARDED = "safetensors-sharded"
TORCH = "torch"
TORCH_LEGACY = "torch-legacy"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"

_MAX_SAFETENSORS_HEADER = 100_000_000


def find_index(directory: Path) -> Path:
    """The one ``*.safetensors.index.json`` of a sharded checkpoint directory."""
    found = sorted(directory.glob(f"*{INDEX_SUFFIX}"))
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise CheckpointError(f"{directory}: is a directory with {what} *{INDEX_SUFFIX}; pass a checkpoint file")
    return found[0]


def detect_format(path: Path) -> str:
    """The checkpoint format of ``path``, read from its first bytes."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        find_index(path)
        return SHARDED
    if path.name.endswith(INDEX_SUFFIX):
        return SHARDED
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if not head:
        raise CheckpointError(f"{path}: is empty; pass a checkpoint written by torch.save or safetensors")
    if head.startswith(b"PK\x03\x04"):
        return TORCH
    # safetensors before the legacy pickle: a header of 640, 896, 1152 or 1408 bytes (+ k * 65536) starts with
    # the bytes of a pickle protocol mark (0x80, 2..5). A pickle never passes this test: its bytes 2 to 7 are
    # opcodes (torch's legacy files: its magic number), which make the "length" far larger than any header.
    if len(head) == 9 and head[8:9] == b"{":
        (size,) = struct.unpack("<Q", head[:8])
        if 0 < size <= _MAX_SAFETENSORS_HEADER:
            return SAFETENSORS
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return TORCH_LEGACY
    raise CheckpointError(f"{path}: not a checkpoint spectral_cli can read (expected a torch.save file or safetensors)")


def output_format(path: Path, input_format: str) -> str:
    """The format to write: from the output's extension when it names one, else the input's."""
    if path.suffix == ".safetensors":
        return SAFETENSORS
    if path.suffix in TORCH_SUFFIXES:
        return TORCH
    return TORCH if input_format == TORCH_LEGACY else input_format


def default_output(source: Path, tag: str, fmt: str) -> Path:
    """``model.pt`` -> ``model.<tag>.pt``, ``shards/`` -> ``shards.<tag>/`` (an earlier tag is replaced)."""
    if fmt == SHARDED:
        base = source if source.is_dir() else source.parent
        name = base.name.removesuffix(".spectral").removesuffix(".baked")
        return base.with_name(f"{name}.{tag}")
    stem = source.stem
    for old in (".spectral", ".baked"):
        stem = stem.removesuffix(old)
    suffix = ".safetensors" if fmt == SAFETENSORS else (source.suffix or ".pt")
    if fmt != SAFETENSORS and suffix == ".safetensors":
        suffix = ".pt"
    return source.with_name(f"{stem}.{tag}{suffix}")


def check_output(source: Path, target: Path, *, force: bool, directory: bool = False) -> None:
    """Refuse writing over the input, into a missing directory, or over an existing output without ``force``."""
    if target.exists() and (target.resolve() == source.resolve() or os.path.samefile(target, source)):
        raise RefusedError(f"{target}: is the input; choose another output with -o")
    if source.is_dir() and target.resolve().is_relative_to(source.resolve()):
        raise RefusedError(f"{target}: is inside the input directory; choose another output with -o")
    if target.is_dir() and not directory:
        raise RefusedError(f"{target}: is a directory; give a file name with -o")
    if target.exists() and directory and not target.is_dir():
        raise RefusedError(f"{target}: is a file; sharded output needs a directory name with -o")
    if not target.parent.is_dir():
        raise RefusedError(f"{target}: its directory does not exist; create it or choose another -o")
    if target.exists() and not force:
        raise RefusedError(f"{target}: already exists; pass --force to overwrite it")


def new_file_mode() -> int:
    """``0o666`` less the process umask: the permissions ``open(path, "w")`` would give a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class atomic_file:
    """A temporary file beside ``target``, fsynced and renamed over it on success, removed on any failure.

    ``verify(path)``, when given, checks the finished temporary file before the rename: if it raises, the
    temporary file is removed and whatever ``target`` held before is untouched. The directory is fsynced after
    the rename so that the new name survives a power loss.

    Example:
        >>> import pathlib, tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.bin"
        >>> with atomic_file(target) as f:
        ...     _ = f.write(b"done")
        >>> target.read_bytes()
        b'done'
    """

    def __init__(self, target: Path, verify: Callable[[Path], None] | None = None) -> None:
        self.target = target
        self.verify = verify

    def __enter__(self) -> IO[bytes]:
        fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent)
        self.tmp = Path(name)
        try:
            # mkstemp makes the file readable by its owner only; give it the mode any new file gets.
            os.chmod(self.tmp, new_file_mode())
            self.file = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise
        return self.file

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        try:
            if kind is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if kind is None:
                if self.verify is not None:
                    self.verify(self.tmp)
                os.replace(self.tmp, self.target)
                fsync_directory(self.target.parent)
        finally:
            self.tmp.unlink(missing_ok=True)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
