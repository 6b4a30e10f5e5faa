"""The one exception type of spectral_cli.

Every error the library raises for a caller's mistake is a :class:`SpectralError`, whose message states the
rule, the offending value and the fix, in one line. The command line prints that line and exits with
``exit_code``; it never shows a traceback for one.
"""

from __future__ import annotations


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
