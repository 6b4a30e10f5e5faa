"""The one exception type of spectral_cli.

Every error the library raises for a caller's mistake is a :class:`SpectralError`, whose message states the
rule, the offending value and the fix, in one line. The command line prints that line and exits with
``exit_code``; it never shows a traceback for one.
"""

from __future__ import annotations

import errno


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


class OutOfMemoryError(SpectralError):
    """The process ran out of memory or of address space (``ulimit -v``) for this input; nothing was written."""

    exit_code = 1


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
    return isinstance(e, (RuntimeError, OSError)) and any(t in text for t in _OOM_TEXT)
