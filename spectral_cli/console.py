"""How a command of the ``spectral`` line talks and ends: its consoles, its errors as one line and an exit code,
the signals that stop it, its progress bar. The command line (:mod:`spectral_cli.cli`) runs each command body
through :func:`run`.

A :class:`~spectral_cli.errors.SpectralError` prints ``error: <its message>`` and exits with its code (the table
is :data:`spectral_cli.errors.EXIT_CODES`); a refused write exits 1; an allocation refused anywhere is said as out
of memory (exit 1); anything else is an internal error (exit 1, ``SPECTRAL_DEBUG=1`` shows the traceback).

Every catchable signal that would end the process (Ctrl-C, ``SIGTERM``, ``SIGHUP``, ``SIGQUIT``...) is turned
into an exception while a command runs, so that its temporary files are removed on the way out; it then exits
``128 + signal``. A signal that comes while the output is being renamed into place waits until that is done. A
signal the process was started ignoring (``nohup``, a background job's Ctrl-C) stays ignored. (Python itself
ignores ``SIGXFSZ``: a write past ``ulimit -f`` fails as a write, exit 1.) Everything printed from a file goes
through :func:`~spectral_cli.render.printable`.

Results go to stdout through :func:`emit`, laid out for :func:`width` (a positive ``COLUMNS``, else the terminal's,
else 80: ``COLUMNS`` of 0, negative or not a number is ignored), in what stdout's encoding can say: under an
ASCII or latin-1 locale, tables are drawn in ASCII and other characters are written as Python escapes, never a
``UnicodeEncodeError``. Errors and warnings go to stderr, whole lines whatever the width.

When the reader of stdout goes away (``spectral inspect X | head -1``) the command stops quietly: no message, no
traceback. A command whose output file was already written and verified (convert, bake) exits with its own code
(0: the file is whole; the exit code says the file's fate); anything else (inspect, dry runs, their JSON) exits
141, 128 + ``SIGPIPE``, as other tools do. The output file is the same with or without the pipe. Any other failure
to print a report after its output was written (stdout's disk full) is a warning, never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import typer
from rich.console import Console
from rich.markup import escape

from .render import Glyphs, glyphs_for, printable

#: the width of a stream that is no terminal, when ``COLUMNS`` does not say: a pipe's, as other tools assume
DEFAULT_WIDTH = 80
#: no layout is wider than this, whatever ``COLUMNS`` says
MAX_WIDTH = 1000
#: the exit code of a listing whose reader went away: 128 + SIGPIPE, as for a process that SIGPIPE ends
SIGPIPE_EXIT = 128 + 13


def width(stream: TextIO | None = None) -> int:
    """The width in cells to lay ``stream`` (stdout) out for: a positive ``COLUMNS`` (at most :data:`MAX_WIDTH`),
    else its terminal's, else :data:`DEFAULT_WIDTH`."""
    text = os.environ.get("COLUMNS", "").strip()
    try:
        columns = MAX_WIDTH if text.isdigit() and len(text) > 6 else int(text)
    except ValueError:  # unset, empty, not a number
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size((sys.stdout if stream is None else stream).fileno()).columns
        except (AttributeError, ValueError, OSError):  # not a terminal, or no file descriptor (a test's buffer)
            columns = 0
    return min(columns, MAX_WIDTH) if columns > 0 else DEFAULT_WIDTH


def glyphs() -> Glyphs:
    """The characters tables are drawn with: Unicode, or ASCII where stdout's encoding cannot say it."""
    return glyphs_for(getattr(sys.stdout, "encoding", None))


def _discard(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at /dev/null: what Python still holds for it is flushed into nothing."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)


def _write(text: str) -> bool:
    """``text`` and a newline on stdout, flushed, in what its encoding can say; False if its reader went away."""
    stream = sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        data = (text + "\n").encode(encoding, "backslashreplace")
    except LookupError:
        encoding, data = "ascii", (text + "\n").encode("ascii", "backslashreplace")
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):  # a test's buffer
        fd = -1
    try:
        stream.flush()
        if fd < 0:
            stream.write(data.decode(encoding))
            stream.flush()
        # to the descriptor itself: an unbuffered stdout (python -u, PYTHONUNBUFFERED) drops what a partial write
        # to a pipe leaves, and never sees the reader go away
        view = memoryview(data)
        while fd >= 0 and view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        _discard(stream)
        return False
    except OSError as e:  # a full disk under "> file": said as stdout's, not as an output's
        _discard(stream)  # else Python's flush at exit fails again, and says so
        raise OSError(e.errno, e.strerror, "stdout") from None
    return True


def emit(text: str, *, written: bool = False) -> None:
    """Print a result on stdout. If its reader went away, stop quietly: exit 0 when the command's output file was
    ``written`` (the exit code says the file's fate), else :data:`SIGPIPE_EXIT`."""
    if not _write(text):
        raise typer.Exit(0 if written else SIGPIPE_EXIT)


class _Stderr(Console):
    def on_broken_pipe(self) -> None:
        # nobody reads stderr any more: say nothing from now on, and let the command finish (Rich's own default
        # exits 1 and points stdout, not stderr, at /dev/null)
        self.quiet = True
        _discard(sys.stderr)


def stderr() -> Console:
    """Errors, warnings and the progress bar: whole lines, whatever the width."""
    return _Stderr(stderr=True, soft_wrap=True, width=width(sys.stderr))


class Interrupted(KeyboardInterrupt):
    """A signal stopped the command (a KeyboardInterrupt, so that code which cleans up after Ctrl-C does)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        name = signal.Signals(self.signum).name
        return "SIGINT (Ctrl-C)" if name == "SIGINT" else name


#: signals whose default is to end the process: each stops the command cleanly instead
STOPPING = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGXCPU", "SIGVTALRM")
    if hasattr(signal, name)
)


@contextmanager
def stopping_signals() -> Iterator[list[int]]:
    """While the block runs, each of :data:`STOPPING` that is not ignored raises :class:`Interrupted` (after an
    output's rename, if one is under way; such signals are listed in the list yielded). Restored after."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set from there
        yield []
        return
    from .files.atomic import committing

    deferred: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if committing():
            deferred.append(signum)
            return
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOPPING if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield deferred
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _fail(as_json: bool, message: str, code: int, label: str = "error") -> typer.Exit:
    if as_json:
        with contextlib.suppress(OSError):  # stdout is what failed, maybe
            _write(json.dumps({"schema": 1, "error": message, "exit_code": code}))  # JSON escapes what it must
    stderr().print(f"[bold red]{label}:[/] {escape(printable(message))}", highlight=False)
    return typer.Exit(code)


def run(as_json: bool, body: Callable[[], Any], source: Path) -> Any:
    """Run a command body; turn our errors and stopping signals into one line and an exit code."""
    from .errors import OOM_FIX, OutOfMemoryError, SpectralError, first_line, is_out_of_memory

    debug = bool(os.environ.get("SPECTRAL_DEBUG"))
    try:
        with stopping_signals() as deferred:
            try:
                result = body()
            except Exception as e:  # an allocation refused anywhere: the machine's limit, said as such
                if isinstance(e, SpectralError) or not is_out_of_memory(e):
                    raise
                message = f"{source}: out of memory ({first_line(e)}); no output was written; {OOM_FIX}"
                raise OutOfMemoryError(message) from None
        if deferred:
            name = Interrupted(deferred[0]).name
            raise _fail(as_json, f"stopped by {name} after the output was written", 128 + deferred[0])
        return result
    except SpectralError as e:
        if debug:
            raise
        raise _fail(as_json, str(e), e.exit_code) from None
    except (typer.Exit, typer.Abort):
        raise
    except Interrupted as e:
        raise _fail(as_json, f"stopped by {e.name}; no half-written output is left", 128 + e.signum) from None
    except KeyboardInterrupt:  # outside the main thread: no handlers, Python's own Ctrl-C
        raise _fail(as_json, "stopped by SIGINT (Ctrl-C); no half-written output is left", 130) from None
    except BrokenPipeError:  # the reader of stdout went away (| head) in a print that is not emit's
        _discard(sys.stdout)
        raise typer.Exit(SIGPIPE_EXIT) from None
    except OSError as e:  # the system refused something we did not wrap: not our bug
        if debug:
            raise
        if e.filename == "stdout":  # a listing that could not be printed: there was no output to write
            raise _fail(as_json, f"stdout: {e.strerror or e}", 1) from None
        where = f"{e.filename}: " if e.filename else ""
        raise _fail(as_json, f"{where}{e.strerror or e}; no output was written", 1) from None
    except Exception as e:
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        message = f"{type(e).__name__}: {first} (set SPECTRAL_DEBUG=1 for the traceback)"
        raise _fail(as_json, message, 1, "internal error") from None


#: seconds of work before a progress bar appears (a quick command shows none)
SHOW_AFTER = 0.5


@contextmanager
def progress(enabled: bool, what: str) -> Iterator[Callable[[int, int, int, int], None] | None]:
    """A Rich progress bar on stderr (bytes and tensors written), only when stderr is a terminal, shown once the
    work has taken :data:`SHOW_AFTER` seconds."""
    err = stderr()
    if not enabled or not err.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[tensors]}"),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task(what, total=None, tensors="")
    start, shown = time.monotonic(), False

    def update(done: int, total: int, tensors: int, tensors_total: int) -> None:
        nonlocal shown
        bar.update(task, completed=done, total=total, tensors=f"{tensors}/{tensors_total} tensors")
        if not shown and time.monotonic() - start >= SHOW_AFTER:
            bar.start()
            shown = True

    try:
        yield update
    finally:
        if shown:
            bar.stop()
