"""Spectral parametrization of convolution kernels (Ballé, PCS 2018) for PyTorch, and the ``spectral`` CLI.

The public names are loaded on first use, so ``import spectral_cli`` (and ``spectral --help``) does not
import torch.

Example:
    >>> import torch
    >>> from spectral_cli import register_spectral_parametrization
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    >>> register_spectral_parametrization(net).changed
    ('0',)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SpectralParametrization": "parametrization",
    "register_spectral_parametrization": "parametrization",
    "Registration": "parametrization",
    "SpectralError": "errors",
    "AmbiguousKernelSizeError": "errors",
    "to_spatial": "transform.bases",
    "to_spectral": "transform.bases",
    "BASES": "transform.kernels",
    "convert_state_dict": "statedict.surgery",
    "bake_state_dict": "statedict.surgery",
    "describe_state_dict": "statedict.surgery",
    "plan_spectral_parametrization": "parametrization",
    "spectral_shard_placement": "parametrization",
    "load_spectral": "files.load",
    "Loaded": "files.load",
    "convert_file": "files.convert",
    "bake_file": "files.convert",
    "inspect_file": "files.listing",
    "FileReport": "files.report",
    "InspectReport": "files.listing",
    "SurgeryResult": "statedict.surgery",
    "LayerChange": "statedict.surgery",
    "Basis": "transform.kernels",
    "convert_optimizer_state": "statedict.optimizer",
    "convert_optimizer_state_dict": "statedict.optimizer",
    "OptimizerState": "statedict.optimizer",
}

__all__ = [
    "BASES",
    "AmbiguousKernelSizeError",
    "Basis",
    "FileReport",
    "InspectReport",
    "LayerChange",
    "Loaded",
    "OptimizerState",
    "Registration",
    "SpectralError",
    "SpectralParametrization",
    "SurgeryResult",
    "__version__",
    "bake_file",
    "bake_state_dict",
    "convert_file",
    "convert_optimizer_state",
    "convert_optimizer_state_dict",
    "convert_state_dict",
    "describe_state_dict",
    "inspect_file",
    "load_spectral",
    "plan_spectral_parametrization",
    "register_spectral_parametrization",
    "spectral_shard_placement",
    "to_spatial",
    "to_spectral",
]

if TYPE_CHECKING:
    from .errors import AmbiguousKernelSizeError, SpectralError
    from .files.convert import bake_file, convert_file
    from .files.listing import InspectReport, inspect_file
    from .files.load import Loaded, load_spectral
    from .files.report import FileReport
    from .parametrization import (
        Registration,
        SpectralParametrization,
        plan_spectral_parametrization,
        register_spectral_parametrization,
        spectral_shard_placement,
    )
    from .statedict.optimizer import OptimizerState, convert_optimizer_state, convert_optimizer_state_dict
    from .statedict.surgery import LayerChange, SurgeryResult, bake_state_dict, convert_state_dict, describe_state_dict
    from .transform.bases import to_spatial, to_spectral
    from .transform.kernels import BASES, Basis


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
