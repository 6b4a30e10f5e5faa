"""The system calls through which the file layer reads checkpoints and writes outputs, as one object.

Every positional read, write, copy, sync and rename goes through a :class:`Syscalls`. The default is the operating
system's; a test passes one whose calls fail (a full disk, an I/O error, a signal in the middle of a write) to
check that nothing is left behind. Imports no torch.

Example:
    >>> import dataclasses, errno
    >>> def full(fd, data, offset):
    ...     raise OSError(errno.ENOSPC, "No space left on device")
    >>> faulty = dataclasses.replace(SYSCALLS, pwrite=full)
    >>> faulty.fsync is SYSCALLS.fsync
    True
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Buffer = Any  # bytes, bytearray or memoryview (collections.abc.Buffer is 3.12+)


def _pwrite(fd: int, data: Buffer, offset: int) -> int:
    """``os.pwrite``, or where the system has none (Windows) a seek and a write."""
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


def _copy_file_range(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
    return os.copy_file_range(src, dst, count, src_offset, dst_offset)


def _renameat2_exchange() -> Callable[[Path, Path], None] | None:
    """Linux's ``renameat2(RENAME_EXCHANGE)``: two paths swapped in one step (glibc 2.28+), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: Path, b: Path) -> None:
        if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(a), None, str(b))

    return exchange


def _link(existing: Path, new: Path) -> None:
    """``linkat(existing, new, AT_SYMLINK_FOLLOW)``: also names an unnamed file through ``/proc/self/fd/N`` (a plain
    ``link`` would try to link that symlink itself)."""
    directory = os.open(new.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.link(existing, new.name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


_PWRITE: Callable[[int, Buffer, int], int] = getattr(os, "pwrite", _pwrite)
_PREADV: Callable[[int, Sequence[Buffer], int], int] | None = getattr(os, "preadv", None)
_FDATASYNC: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
_EXCHANGE = _renameat2_exchange()


@dataclass(frozen=True)
class Syscalls:
    """The calls the file layer makes. ``None`` for a call the system lacks: the layer then does without it."""

    #: ``pwrite(fd, data, offset)``: bytes written (maybe fewer than given)
    pwrite: Callable[[int, Buffer, int], int] = _PWRITE
    #: ``preadv(fd, buffers, offset)``: bytes read; without it, reads seek under a lock
    preadv: Callable[[int, Sequence[Buffer], int], int] | None = _PREADV
    #: ``copy_file_range(src, dst, count, src_offset, dst_offset)``: bytes copied in the kernel
    copy_file_range: Callable[[int, int, int, int, int], int] | None = (
        _copy_file_range if hasattr(os, "copy_file_range") else None
    )
    fsync: Callable[[int], None] = os.fsync
    fdatasync: Callable[[int], None] = _FDATASYNC
    #: ``open(path, flags, mode)``: a file descriptor
    open: Callable[[Path, int, int], int] = os.open
    mkdir: Callable[[Path, int], None] = os.mkdir
    #: ``replace(src, dst)``: ``os.replace``, also onto an existing file
    replace: Callable[[Path, Path], None] = os.replace
    #: ``link(existing, new)``: a new name of a file (``/proc/self/fd/N`` of an unnamed one included)
    link: Callable[[Path, Path], None] = _link
    #: ``exchange(a, b)``: swap two existing paths in one step; without it a directory is swapped in two renames
    exchange: Callable[[Path, Path], None] | None = _EXCHANGE


#: the operating system's calls
SYSCALLS = Syscalls()
