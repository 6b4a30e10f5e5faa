"""How a command of the ``spectral`` line talks: its consoles, its errors as one line and an exit code, its
progress bar. The command line (:mod:`spectral_cli.cli`) runs each command body through :func:`run`.

A :class:`~spectral_cli.errors.SpectralError` prints ``error: <its message>`` and exits with its code; a refused
write (``OSError``) exits 1; an allocation refused anywhere is said as out of memory (exit 1); anything else is an
internal error (exit 1, ``SPECTRAL_DEBUG=1`` shows the traceback). Ctrl-C exits 130. No traceback otherwise.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape


def stdout() -> Console:
    """Results: tables are cut to the terminal's width, never wrapped into each other."""
    return Console(soft_wrap=False)


def stderr() -> Console:
    """Errors, warnings and the progress bar."""
    return Console(stderr=True, soft_wrap=True)


#: control characters (newlines, terminal escapes) shown as Python escapes, so that a hostile file or key name
#: can neither split an error into several lines nor send escape sequences to the terminal
CONTROL = {c: repr(chr(c))[1:-1] for c in (*range(32), 127)}


def one_line(text: str) -> str:
    """``text`` with its control characters escaped: one line, no terminal escapes.

    Example:
        >>> one_line("a.pt\\nerror: fake")
        'a.pt\\\\nerror: fake'
    """
    return text.translate(CONTROL)


def run(as_json: bool, body: Callable[[], Any], source: Path) -> Any:
    """Run a command body; turn our errors into one line and an exit code."""
    from .errors import OOM_FIX, OutOfMemoryError, SpectralError, first_line, is_out_of_memory

    try:
        try:
            return body()
        except Exception as e:  # an allocation refused anywhere: the machine's limit, said as such
            if isinstance(e, SpectralError) or not is_out_of_memory(e):
                raise
            message = f"{source}: out of memory ({first_line(e)}); no output was written; {OOM_FIX}"
            raise OutOfMemoryError(message) from None
    except SpectralError as e:
        if os.environ.get("SPECTRAL_DEBUG"):
            raise
        if as_json:
            typer.echo(json.dumps({"schema": 1, "error": str(e), "exit_code": e.exit_code}))
        stderr().print(f"[bold red]error:[/] {escape(one_line(str(e)))}", highlight=False, markup=True)
        raise typer.Exit(e.exit_code) from None
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        stderr().print("interrupted; no output was written", highlight=False)
        raise typer.Exit(130) from None
    except OSError as e:  # the system refused a write (disk full, no permission): not our bug
        if os.environ.get("SPECTRAL_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or e}; no output was written"
        if as_json:
            typer.echo(json.dumps({"schema": 1, "error": message, "exit_code": 1}))
        stderr().print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as e:
        if os.environ.get("SPECTRAL_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if as_json:
            typer.echo(json.dumps({"schema": 1, "error": f"{type(e).__name__}: {first}", "exit_code": 1}))
        stderr().print(
            f"[bold red]internal error:[/] {type(e).__name__}: {escape(one_line(first))} "
            "(set SPECTRAL_DEBUG=1 for the traceback)",
            highlight=False,
        )
        raise typer.Exit(1) from None


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
