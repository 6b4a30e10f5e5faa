"""``spectral inspect``: list a checkpoint's parametrized layers. Imports torch only when it must.

safetensors files and sharded directories are listed from their headers alone (no torch, no tensor data), so
a file of many GB lists in a fraction of a second. The energy profile needs the tensors: it is computed for
torch files (already loaded) and, for safetensors, only when asked (``energy=True``), one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .formats import SAFETENSORS, SHARDED, detect_format
from .layout import LayerRecord, records_from_json
from .plan import LayerInfo, describe


@dataclass
class InspectReport:
    source: Path
    format: str
    layers: list[tuple[str, LayerInfo]]
    #: (location, key) -> fraction of energy per radial frequency band; absent when not computed
    energy: dict[tuple[str, str], list[float]]
    total_params: int
    total_bytes: int


def _profile(value: Any, info: LayerInfo) -> list[float] | None:
    import torch

    from .spectrum import radial_energy

    if info.kernel_size is None or info.domain not in ("spectral", "spatial"):
        return None
    if not bool(torch.isfinite(value).all()):  # NaN or Inf: no meaningful profile
        return None
    if value.is_complex():
        value = torch.stack((value.real, value.imag))
    layout = info.basis if info.domain == "spectral" else "spatial"
    return radial_energy(value, info.kernel_size, layout or "rfft")


def inspect_file(
    source: Path | str, *, include_spatial: bool = False, trust_pickle: bool = False, energy: bool | None = None
) -> InspectReport:
    """List a checkpoint's parametrized layers (and with ``include_spatial`` its convertible kernels).

    ``energy``: compute the frequency profile of each listed kernel; by default for torch files only.
    """
    source = Path(source)
    fmt = detect_format(source)
    if fmt in (SAFETENSORS, SHARDED):
        return _inspect_safetensors(source, include_spatial, bool(energy))
    return _inspect_torch(source, fmt, include_spatial, trust_pickle, energy is not False)


def _inspect_safetensors(source: Path, include_spatial: bool, energy: bool) -> InspectReport:
    from .stream import open_safetensors

    st = open_safetensors(source)
    records: dict[str, LayerRecord] = {}
    for doc in st.records_json:
        records.update(records_from_json(doc))
    specs = st.specs
    layers = [("", info) for info in describe(specs, records, include_spatial=include_spatial)]
    profiles: dict[tuple[str, str], list[float]] = {}
    if energy:
        from .stream import read_tensor

        for _, info in layers:
            header = st.owner[info.key]
            with header.path.open("rb") as f:
                profile = _profile(read_tensor(f, header.entries[info.key]), info)
            if profile is not None:
                profiles["", info.key] = profile
    total_params = sum(spec.numel for spec in specs.values())
    total_bytes = sum(spec.nbytes for spec in specs.values())
    return InspectReport(source, SHARDED if st.index_path else SAFETENSORS, layers, profiles, total_params,
                         total_bytes)  # fmt: skip


def _inspect_torch(source: Path, fmt: str, include_spatial: bool, trust_pickle: bool, energy: bool) -> InspectReport:
    import torch

    from .checkpoint import load_checkpoint
    from .surgery import describe_state_dict

    ck = load_checkpoint(source, trust_pickle=trust_pickle)
    layers: list[tuple[str, LayerInfo]] = []
    profiles: dict[tuple[str, str], list[float]] = {}
    params = nbytes = 0
    for loc, sd in ck.state_dicts():
        where = "/".join(loc)
        for info in describe_state_dict(sd, include_spatial=include_spatial):
            layers.append((where, info))
            profile = _profile(sd[info.key], info) if energy else None
            if profile is not None:
                profiles[where, info.key] = profile
        tensors: Mapping[str, Any] = sd
        for value in tensors.values():
            if isinstance(value, torch.Tensor):
                params += value.numel()
                nbytes += value.numel() * value.element_size()
    return InspectReport(source, ck.format, layers, profiles, params, nbytes)
