"""The one way an output reaches its name: written beside it, synced, checked, then renamed into place at once.

An :class:`Output` is a temporary file, or a staging directory of files (sharded output), named
``.<target name>.spectral-<random>.tmp`` beside the target: hidden, so never mistaken for output. Every write
goes through it (:class:`OutFile`), so a refused write is reported once, naming the target and the fix
(:class:`~spectral_cli.errors.OutputError`). :meth:`Output.commit` syncs the data, runs the caller's check, and
renames (a directory replacing an older one is swapped in one step where Linux can, ``renameat2``), then syncs
the directory so that the new name survives a power loss. On any failure, exception or signal the temporary is
removed and whatever the target held before is untouched.

A process killed outright (``SIGKILL``, a power loss) cannot clean up: its temporaries stay hidden, and the next
output to the same name removes them. A temporary is locked (``flock``) while its writer lives, so one still
being written by another process is never taken for a stale one. Imports no torch.

Example:
    >>> import pathlib, tempfile
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.bin"
    >>> with Output(target) as out:
    ...     out.file().write(b"done", 0)
    ...     out.commit()
    >>> target.read_bytes(), sorted(p.name for p in target.parent.iterdir())
    (b'done', ['out.bin'])
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, OutputError
from .syscalls import SYSCALLS, Buffer, Syscalls

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporaries are then never removed
    fcntl = None  # type: ignore[assignment]

#: the mark of our temporaries: ``.<target name>.spectral-<random>.tmp``
TEMP_MARK = ".spectral-"
_COPY_CHUNK = 16 << 20
#: errors of copy_file_range that mean "not here" (old kernel, other file systems, seccomp): copy by hand
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}

_committing = False


def committing() -> bool:
    """Whether an output is being renamed into place right now: a signal handler defers its signal until after."""
    return _committing


_FIXES = {
    errno.ENOSPC: "free some disk space or write elsewhere with -o",
    errno.EDQUOT: "free some of your disk quota or write elsewhere with -o",
    errno.EACCES: "check the permissions of its directory or write elsewhere with -o",
    errno.EPERM: "check the permissions of its directory or write elsewhere with -o",
    errno.EROFS: "the file system is read-only; write elsewhere with -o",
    errno.EFBIG: "it is larger than this process may write (ulimit -f); raise the limit or write elsewhere",
    errno.EIO: "the disk reported an error; check it, or write elsewhere with -o",
    errno.ENAMETOOLONG: "choose a shorter name with -o",
}


def output_error(target: Path, e: OSError) -> OutputError:
    """``e``, a refused write of the output ``target``, as one line naming the file and the fix."""
    reason = e.strerror or str(e) or type(e).__name__
    fix = _FIXES.get(e.errno or 0, "write elsewhere with -o")
    return OutputError(f"{target}: cannot be written ({reason}); no output was written; {fix}")


def _lock(fd: int, wait: bool = True) -> bool:
    """Lock ``fd`` (a file or a directory) for this process; False if another holds it (``wait=False``)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clear_stale(target: Path) -> list[Path]:
    """Remove the temporaries of ``target`` that a killed process left (those no live process holds locked)."""
    if fcntl is None:
        return []
    prefix, removed = f".{target.name}{TEMP_MARK}", []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")) or entry.is_symlink():
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            if _lock(fd, wait=False):
                _remove(Path(entry.path))
                removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


def fsync_directory(directory: Path, syscalls: Syscalls = SYSCALLS) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        syscalls.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # file systems that cannot sync a directory
            raise
    finally:
        os.close(fd)


class OutFile:
    """One file of an output, written by position. An ``OSError`` of any write is an :class:`OutputError`
    naming the target."""

    def __init__(self, fd: int, path: Path, target: Path, syscalls: Syscalls) -> None:
        self.fd, self.path, self.target, self.syscalls = fd, path, target, syscalls
        self.closed = False

    def write(self, data: Buffer, offset: int) -> None:
        """Write all of ``data`` at ``offset``."""
        view = memoryview(data).cast("B")
        try:
            while view:
                n = self.syscalls.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise output_error(self.target, e) from None

    def copy(self, source: int, start: int, count: int, offset: int) -> None:
        """Copy ``count`` bytes of the file ``source`` from ``start`` to ``offset`` of this file (in the kernel where
        it can: ``copy_file_range``)."""
        done = 0
        copy_range = self.syscalls.copy_file_range
        try:
            while copy_range is not None and done < count:
                n = copy_range(source, self.fd, count - done, start + done, offset + done)
                if n == 0:
                    raise CheckpointError(f"{self.target}: its input ended while being copied; the input is truncated")
                done += n
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise output_error(self.target, e) from None
        while done < count:
            chunk = os.pread(source, min(_COPY_CHUNK, count - done), start + done)
            if not chunk:
                raise CheckpointError(f"{self.target}: its input ended while being copied; the input is truncated")
            self.write(chunk, offset + done)
            done += len(chunk)

    def datasync(self) -> None:
        try:
            self.syscalls.fdatasync(self.fd)
        except OSError as e:
            raise output_error(self.target, e) from None

    def sync(self) -> None:
        try:
            self.syscalls.fsync(self.fd)
        except OSError as e:
            raise output_error(self.target, e) from None

    def stream(self) -> Stream:
        """A write-only file object over this file, from its start (for ``torch.save``)."""
        return Stream(self)


class Stream:
    """Sequential writes into an :class:`OutFile`. The first exception of a write is kept in ``error``: torch.save
    turns any exception of its writer (a full disk, Ctrl-C) into a RuntimeError that hides it."""

    def __init__(self, out: OutFile) -> None:
        self.out = out
        self.position = 0
        self.error: BaseException | None = None

    def write(self, data: Buffer) -> int:
        size = memoryview(data).nbytes
        try:
            self.out.write(data, self.position)
        except BaseException as e:
            self.error = self.error or e
            raise
        self.position += size
        return size

    def flush(self) -> None:
        pass


class Output:
    """An output written beside ``target`` and renamed into place by :meth:`commit`; removed if never committed.

    ``directory``: the output is a directory of files (:meth:`file` with a name); else one file (:meth:`file`).
    The caller has checked the target (``files.formats.check_output``); an existing target is replaced.
    """

    def __init__(self, target: Path, *, directory: bool = False, syscalls: Syscalls = SYSCALLS) -> None:
        self.target, self.directory, self.syscalls = target, directory, syscalls
        self.path = target.parent / f".{target.name}{TEMP_MARK}{secrets.token_hex(4)}.tmp"
        self.committed = False
        self._files: list[OutFile] = []
        self._lock_fd: int | None = None

    def __enter__(self) -> Output:
        clear_stale(self.target)
        cloexec = getattr(os, "O_CLOEXEC", 0)
        try:
            if self.directory:
                self.syscalls.mkdir(self.path, 0o777)  # less the umask: the mode of any new directory
                self._lock_fd = os.open(self.path, os.O_RDONLY | cloexec)
            else:
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | cloexec
                fd = self.syscalls.open(self.path, flags, 0o666)  # less the umask: the mode of any new file
                self._files.append(OutFile(fd, self.path, self.target, self.syscalls))
                self._lock_fd = fd
            _lock(self._lock_fd)
        except OSError as e:
            self._close()
            _remove(self.path)
            raise output_error(self.target, e) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        if not self.committed:
            _remove(self.path)

    def file(self, name: str | None = None) -> OutFile:
        """The output file (``name`` None), or a new file ``name`` in the output directory (:meth:`done` with it
        once written, so that a directory of many files does not hold them all open)."""
        if not self.directory:
            return self._files[0]
        path = self.path / (name or "")
        try:
            if path.parent != self.path:
                path.parent.mkdir(parents=True, exist_ok=True)
            fd = self.syscalls.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            raise output_error(self.target, e) from None
        self._files.append(OutFile(fd, path, self.target, self.syscalls))
        return self._files[-1]

    def done(self, out: OutFile) -> None:
        """A file of the output directory is written: synced and closed."""
        out.sync()
        out.closed = True
        os.close(out.fd)

    def commit(self, verify: Callable[[Path], Any] | None = None) -> None:
        """Sync, check (``verify(path)`` of the finished temporary may raise), rename into place, sync the directory."""
        global _committing
        for out in self._files:
            if not out.closed:
                out.sync()
        if self.directory and self._lock_fd is not None:
            try:
                self.syscalls.fsync(self._lock_fd)
            except OSError as e:
                raise output_error(self.target, e) from None
        if verify is not None:
            verify(self.path)
        _committing = True
        try:
            if self.directory and os.path.lexists(self.target):
                self._swap()
            else:
                self.syscalls.replace(self.path, self.target)
            self.committed = True
            fsync_directory(self.target.parent, self.syscalls)
        except OSError as e:
            if not self.committed:
                raise output_error(self.target, e) from None
        finally:
            _committing = False

    def _swap(self) -> None:
        """The staging directory takes the target's name; the older output is removed."""
        if self.syscalls.exchange is not None:
            try:
                self.syscalls.exchange(self.path, self.target)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
            else:  # the staging name now holds the older output
                self.committed = True
                _remove(self.path)
                return
        aside = self.target.parent / f".{self.target.name}{TEMP_MARK}{secrets.token_hex(4)}.tmp"
        self.syscalls.replace(self.target, aside)
        try:
            self.syscalls.replace(self.path, self.target)
        except BaseException:
            self.syscalls.replace(aside, self.target)
            raise
        self.committed = True
        _remove(aside)

    def _close(self) -> None:
        """Close every descriptor (the lock goes with the last one)."""
        fds = {out.fd for out in self._files if not out.closed} | ({self._lock_fd} - {None})
        for out in self._files:
            out.closed = True
        self._lock_fd = None
        for fd in fds:
            try:
                os.close(fd)  # type: ignore[arg-type]
            except OSError:
                pass
