"""Import paths of the seed package pytorch-parametrizations, so its examples run with ``spectral_cli``."""

from ..parametrization import SpectralParametrization

__all__ = ["SpectralParametrization"]
