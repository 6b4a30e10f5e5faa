"""The one way an output reaches its name: written unnamed or under a hidden name beside it, synced, checked, then
renamed into place at once.

A file output is written into an *unnamed* file of the target's directory where the file system can make one
(Linux ``O_TMPFILE``: ext4, xfs, btrfs, tmpfs...): it has no name until :meth:`Output.commit` links it under a
short hidden name and renames that over the target, so a process killed outright (``SIGKILL``, the OOM killer,
a power loss) leaves nothing behind. Elsewhere, and for directory outputs (shards, distributed checkpoints,
model directories), the output is a hidden temporary ``.spectral-<16 hex digits>.tmp`` beside the target, locked
(``flock``) while its writer lives; a small watcher process (:data:`_WATCHER`) removes it if the writer dies
before the rename, and the next output into the same directory removes any that a watcher could not (both check
that it is still the temporary this tool made: the watcher its device and inode; the clearing its name, its mark
(an extended attribute set when it was made), its owner, no lock, and never a path of the input).

Every write goes through an :class:`OutFile`, so a refused write is reported once, naming the target and the fix
(:class:`~spectral_cli.errors.OutputError`). :meth:`Output.commit` syncs the data, runs the caller's check on the
finished output, and renames (a directory replacing an older one is swapped in one step where Linux can,
``renameat2``), then syncs the directory so that the new name survives a power loss. On any failure, exception
or signal the temporary is removed and whatever the target held before is untouched. Imports no torch.

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
import re
import secrets
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, OutputError
from .syscalls import SYSCALLS, Buffer, Syscalls

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporaries are then never removed
    fcntl = None  # type: ignore[assignment]

#: the name of every temporary this tool makes: short (an output's name can be as long as the system allows), and
#: matched in full before anything is removed
TEMP_NAME = re.compile(r"\.spectral-[0-9a-f]{16}\.tmp")
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


#: the extended attribute that marks a named temporary as this tool's (set on creation where the file system takes
#: user attributes); a stale entry without it is never removed by :func:`clear_stale`, whatever its name
TEMP_MARK = "user.spectral_cli.temporary"


def _mark(fd: int) -> None:
    try:
        os.setxattr(fd, TEMP_MARK, b"1")
    except (OSError, AttributeError):  # no user attributes here: only the watcher will remove this one
        pass


def _marked(fd: int) -> bool:
    try:
        return os.getxattr(fd, TEMP_MARK) == b"1"
    except (OSError, AttributeError):
        return False


def temp_name() -> str:
    """A new temporary's name: ``.spectral-<16 hex digits>.tmp``."""
    return f".spectral-{secrets.token_hex(8)}.tmp"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _holds(path: str, inputs: list[str]) -> bool:
    """Whether ``path`` is, or is a directory holding, one of ``inputs`` (real paths)."""
    real = os.path.realpath(path)
    return any(p == real or p.startswith(real.rstrip(os.sep) + os.sep) for p in inputs)


def clear_stale(directory: Path, inputs: Iterable[Path] = ()) -> list[Path]:
    """Remove the temporaries in ``directory`` that a killed writer left: entries named as :data:`TEMP_NAME`
    says, marked as this tool's (:data:`TEMP_MARK`), files or directories (not symlinks) owned by this user, that
    no live writer holds locked and that are not (and do not hold) any of ``inputs``."""
    if fcntl is None:
        return []
    keep, removed = [os.path.realpath(p) for p in inputs], []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        if not TEMP_NAME.fullmatch(entry.name) or entry.is_symlink() or _holds(entry.path, keep):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            kind_ok = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
            ours = kind_ok and st.st_uid == os.geteuid() and _marked(fd)
            if ours and _lock(fd, wait=False):
                _remove(Path(entry.path))
                removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


#: the watcher of a named temporary: a process of its own that waits for its writer's end (its standard input
#: closes, whatever ended the writer, ``SIGKILL`` included) and then removes the temporary, if it is still the
#: one made (same device and inode) and the writer did not say it was done with it (by writing a byte first)
_WATCHER = """
import os, shutil, signal, sys
for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGPIPE"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
path, dev, ino = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if not sys.stdin.buffer.read(1):
    try:
        st = os.lstat(path)
    except OSError:
        sys.exit(0)
    if (st.st_dev, st.st_ino) == (dev, ino):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
"""


def _watch(path: Path) -> subprocess.Popen[bytes] | None:
    """Start the watcher of the temporary ``path``; None where no process can be started (the next output into
    the same directory then removes a temporary left behind)."""
    if not sys.executable or os.name != "posix":
        return None
    try:
        st = os.lstat(path)
        return subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHER, str(path), str(st.st_dev), str(st.st_ino)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _unwatch(watcher: subprocess.Popen[bytes] | None) -> None:
    """The writer is done with its temporary (renamed into place, or removed): its watcher leaves it alone."""
    if watcher is None:
        return
    try:
        assert watcher.stdin is not None
        watcher.stdin.write(b"x")
        watcher.stdin.close()
    except OSError:
        pass
    try:
        watcher.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watcher.kill()


def _unnamed_files() -> bool:
    """Whether this system can make unnamed files and name them later (``O_TMPFILE``, ``/proc/self/fd``)."""
    return hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


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
                if n <= 0:  # no progress: a retry would spin forever
                    raise OSError(errno.EIO, "the file system accepted none of the bytes")
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
    ``inputs``: the input's paths, which the clearing of stale temporaries never touches. The caller has checked
    the target (``files.formats.check_output``); an existing target is replaced. :attr:`path` is where the output
    can be read while it is written: the staging directory, the hidden file, or (unnamed) ``/proc/self/fd/N``.
    """

    def __init__(
        self, target: Path, *, directory: bool = False, syscalls: Syscalls = SYSCALLS, inputs: Iterable[Path] = ()
    ) -> None:
        self.target, self.directory, self.syscalls = target, directory, syscalls
        self.inputs = list(inputs)
        self.path = target.parent / temp_name()
        self.unnamed = False
        self.committed = False
        self._files: list[OutFile] = []
        self._lock_fd: int | None = None
        self._watcher: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Output:
        clear_stale(self.target.parent, self.inputs)
        cloexec = getattr(os, "O_CLOEXEC", 0)
        try:
            if self.directory:
                self.syscalls.mkdir(self.path, 0o777)  # less the umask: the mode of any new directory
                self._lock_fd = os.open(self.path, os.O_RDONLY | cloexec)
            else:
                fd = self._unnamed_file(cloexec)
                if fd is None:
                    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | cloexec
                    fd = self.syscalls.open(self.path, flags, 0o666)  # less the umask: the mode of any new file
                self._files.append(OutFile(fd, self.path, self.target, self.syscalls))
                self._lock_fd = fd
            _lock(self._lock_fd)
            if not self.unnamed:
                _mark(self._lock_fd)
        except OSError as e:
            self._close()
            if not self.unnamed:
                _remove(self.path)
            raise output_error(self.target, e) from None
        if not self.unnamed:
            self._watcher = _watch(self.path)
        return self

    def _unnamed_file(self, cloexec: int) -> int | None:
        """A new unnamed file in the target's directory, or None where the file system makes none."""
        if not _unnamed_files():
            return None
        try:
            fd = self.syscalls.open(self.target.parent, os.O_TMPFILE | os.O_RDWR | cloexec, 0o666)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS):
                return None
            raise
        self.unnamed = True
        self.path = Path(f"/proc/self/fd/{fd}")
        return fd

    def __exit__(self, *exc: object) -> None:
        self._close()
        if not self.committed and not self.unnamed:
            _remove(self.path)
        _unwatch(self._watcher)
        self._watcher = None

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
        """Sync and check (``verify(path)`` of the finished temporary may raise) side by side, then rename into
        place and sync the directory. The check reads what the system holds while the disk takes the last of it
        (the sync waits for the disk; the check for the processor)."""
        global _committing
        errors: list[BaseException] = []
        syncing = threading.Thread(target=self._sync, args=(errors,), name="spectral-sync", daemon=True)
        try:
            syncing.start()
        except RuntimeError:  # no thread to be had (address space capped): one after the other
            self._sync(errors)
        try:
            if verify is not None:
                verify(self.path)
        finally:
            if syncing.ident is not None:
                syncing.join()
        if errors:
            raise errors[0]
        _committing = True
        try:
            if self.unnamed:
                self._link_and_replace()
            elif self.directory and os.path.lexists(self.target):
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

    def _link_and_replace(self) -> None:
        """The unnamed file gets a short hidden name, which then replaces the target."""
        named = self.target.parent / temp_name()
        self.syscalls.link(self.path, named)
        try:
            self.syscalls.replace(named, self.target)
        except BaseException:
            named.unlink(missing_ok=True)
            raise

    def _sync(self, errors: list[BaseException]) -> None:
        """Sync every file of the output (and a directory output itself); an error is kept in ``errors``."""
        try:
            for out in self._files:
                if not out.closed:
                    out.sync()
            if self.directory and self._lock_fd is not None:
                try:
                    self.syscalls.fsync(self._lock_fd)
                except OSError as e:
                    raise output_error(self.target, e) from None
        except BaseException as e:
            errors.append(e)

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
        aside = self.target.parent / temp_name()
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
