"""``from spectral_cli.spectral.utils import register_spectral_parametrization``, as in the seed package."""

from ..parametrization import register_spectral_parametrization

__all__ = ["register_spectral_parametrization"]
