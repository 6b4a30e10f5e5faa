"""Only the seed package's import paths (pytorch-parametrizations' ``spectral`` and ``spectral.utils``), so that its
examples run with ``spectral_cli``; it defines nothing. New code imports from ``spectral_cli``."""

from ..parametrization import SpectralParametrization

__all__ = ["SpectralParametrization"]
