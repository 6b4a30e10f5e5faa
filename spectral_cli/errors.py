"""The one exception type of spectral_cli, and the exit codes of the command line.

Every error the library raises for a caller's mistake, an input it cannot use or a write the system refused is a
:class:`SpectralError`, whose message states the rule, the offending value and the fix, in one line. The command
line prints that line and exits with ``exit_code``; it never shows a traceback for one. :data:`EXIT_CODES` is
the one table of those codes (the README's table is checked against it).
"""

from __future__ import annotations

import errno

#: every exit status of ``spectral``, and what it means
EXIT_CODES: dict[str, str] = {
    "0": "done (also: nothing left to convert, the input is already spectral)",
    "1": "the system refused a write (disk full, permission denied, file too large) or memory (out of memory, or "
    "of address space under `ulimit -v`), or an internal error (a bug: please report it; `SPECTRAL_DEBUG=1` shows "
    "the traceback)",
    "2": "usage error (bad option or value)",
    "3": "input unreadable: missing, a directory, not a regular file, empty, truncated, damaged, lying about its "
    "contents, changed while being read, not a checkpoint",
    "4": "kernel size cannot be read from a record-less spectral tensor: pass `--kernel-size`",
    "5": "refused: output exists (`--force`), output is or holds the input, pickled code (`--trust-pickle`), "
    "TorchScript, values the output format cannot hold, a peft adapter",
    "6": "nothing to do: no convertible conv kernels / no spectral tensors",
    "128+N": "stopped by signal N (130: Ctrl-C, 143: SIGTERM, 129: SIGHUP); temporary files are removed",
}


class SpectralError(ValueError):
    """A caller's mistake or an input spectral_cli cannot use; the message says what to do.

    Example:
        >>> from spectral_cli import SpectralParametrization
        >>> SpectralParametrization((3, 3), basis="dct")
        Traceback (most recent call last):
        ...
        spectral_cli.errors.SpectralError: unknown basis 'dct': use one of 'rfft', 'rdft'
    """

    #: exit status of the command line when this error ends it
    exit_code: int = 2


class AmbiguousKernelSizeError(SpectralError):
    """A spectral tensor's kernel size cannot be read from its shape alone."""

    exit_code = 4


class CheckpointError(SpectralError):
    """An input file that is missing, damaged, or not a checkpoint."""

    exit_code = 3


class RefusedError(SpectralError):
    """Something spectral_cli will not do without being told: overwrite, run pickled code, lose data."""

    exit_code = 5


class NothingToDoError(SpectralError):
    """The input holds nothing the command applies to."""

    exit_code = 6


class OutputError(SpectralError):
    """The system refused to write the output (disk full, permissions, an I/O error); nothing was written."""

    exit_code = 1


class OutOfMemoryError(SpectralError):
    """The process ran out of memory or of address space (``ulimit -v``) for this input; nothing was written."""

    exit_code = 1


def in_file(error: SpectralError, where: object) -> SpectralError:
    """``error`` as said of the file ``where`` (a state dict's rule broken inside a checkpoint names the checkpoint
    first); unchanged if it names it already.

    Example:
        >>> str(in_file(CheckpointError("conv.weight: damaged"), "model.pt"))
        'model.pt: conv.weight: damaged'
    """
    text, name = str(error), str(where)
    if text.startswith(name):
        return error
    return type(error)(f"{name}: {text}")


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of ``e``'s message (its type's name if it has none), at most ``limit`` characters: what a
    one-line error quotes of an exception from below.

    Example:
        >>> first_line(RuntimeError("\\nunpickling failed\\nat byte 7")), first_line(MemoryError())
        ('unpickling failed', 'MemoryError')
    """
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


#: the fix an out-of-memory message ends with
OOM_FIX = "free memory or raise the process's limit (ulimit -v)"

#: how out-of-memory shows in the messages of torch's allocators and of C++ (``std::bad_alloc``)
_OOM_TEXT = ("bad_alloc", "can't allocate memory", "cannot allocate memory", "out of memory")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says that an allocation failed (the environment's limit, not a damaged file or our bug).

    Example:
        >>> is_out_of_memory(MemoryError()), is_out_of_memory(RuntimeError("std::bad_alloc"))
        (True, True)
        >>> is_out_of_memory(OSError(errno.ENOMEM, "Cannot allocate memory")), is_out_of_memory(ValueError("bad"))
        (True, False)
    """
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
        return True
    text = str(e).lower()
    if isinstance(e, ImportError) and "failed to map segment" in text:  # a library mapped past ``ulimit -v``
        return _address_space_capped()
    return isinstance(e, (RuntimeError, OSError)) and any(t in text for t in _OOM_TEXT)


def _address_space_capped() -> bool:
    """Whether this process's address space is limited (``ulimit -v``): a library that cannot be mapped then ran
    out of it (elsewhere the cause is another, such as a file system mounted ``noexec``)."""
    try:
        import resource
    except ImportError:  # Windows
        return False
    return resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
