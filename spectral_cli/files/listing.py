"""``spectral inspect``: list a checkpoint's parametrized layers. Imports torch only when it must.

Every format is opened as the same source as convert reads. safetensors files and sharded directories are listed
from their headers alone (no torch, no tensor data), so a file of many GB lists in a fraction of a second. The
energy profile needs the tensors: by default it is computed for torch files (already loaded) and, for
safetensors and distributed checkpoints, only when asked (``energy=True``), one tensor at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpectralError, in_file
from ..statedict.plan import LayerInfo, describe
from .formats import DCP, SAFETENSORS, SHARDED
from .registry import open_source


@dataclass
class InspectReport:
    """A file's layers as ``spectral inspect`` lists them: each ``(location, LayerInfo)``, the energy profiles when
    computed, and the totals of the file's parameters and tensor bytes."""

    source: Path
    format: str
    layers: list[tuple[str, LayerInfo]]
    #: (location, key) -> fraction of energy per radial frequency band; absent when not computed
    energy: dict[tuple[str, str], list[float]]
    total_params: int
    total_bytes: int


def _profile(value: Any, info: LayerInfo) -> list[float] | None:
    import torch

    from ..statedict.surgery import rfft_planes
    from ..transform.spectrum import radial_energy

    if info.kernel_size is None or info.domain not in ("spectral", "spatial"):
        return None
    if not bool(torch.isfinite(value).all()):  # NaN or Inf: no meaningful profile
        return None
    if value.is_complex():
        value = rfft_planes(value)
    layout = info.basis if info.domain == "spectral" else "spatial"
    return radial_energy(value, info.kernel_size, layout or "rfft")


def inspect_file(
    source: Path | str, *, include_spatial: bool = False, trust_pickle: bool = False, energy: bool | None = None
) -> InspectReport:
    """List a checkpoint's parametrized layers (and with ``include_spatial`` its convertible kernels).

    ``energy``: compute the frequency profile of each listed kernel; by default for torch files only.
    """
    path = Path(source)
    with contextlib.closing(open_source(path, trust_pickle=trust_pickle)) as src:
        if energy is None:
            energy = src.format not in (SAFETENSORS, SHARDED, DCP)
        layers: list[tuple[str, LayerInfo]] = []
        profiles: dict[tuple[str, str], list[float]] = {}
        params = nbytes = 0
        for part in src.parts:
            try:
                infos = describe(part.specs, part.records, include_spatial=include_spatial)
            except SpectralError as e:
                raise in_file(e, f"{path} ({part.label})" if part.label else path) from None
            for info in infos:
                layers.append((part.label, info))
                profile = _profile(part.tensor(info.key).whole(), info) if energy else None
                if profile is not None:
                    profiles[part.label, info.key] = profile
            params += sum(spec.numel for spec in part.specs.values())
            nbytes += sum(spec.nbytes for spec in part.specs.values())
        return InspectReport(path, src.format, layers, profiles, params, nbytes)
