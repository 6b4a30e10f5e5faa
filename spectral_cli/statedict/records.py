"""The records a converted checkpoint keeps of its spectral tensors, parsed and checked in this one place.
Imports no torch.

A record says how to bake a tensor back without guessing: its basis, kernel size and the weight's original
dtype. The document ``{"version": <tool version>, "layers": {key: {"basis", "kernel_size", "dtype"}}}`` rides
in a torch state dict's ``_metadata`` under :data:`METADATA_KEY` (as a dict), and in a safetensors file's
``__metadata__`` under the same key (as JSON text). Anything else found there is a damaged checkpoint
(:class:`~spectral_cli.errors.CheckpointError`, exit 3): nothing is guessed once a record is present.

Example:
    >>> doc = '{"version": "0.1.0", "layers": {"c.parametrizations.weight.original": '
    >>> doc += '{"basis": "rfft", "kernel_size": [3, 3], "dtype": "float32"}}}'
    >>> parse_records(doc, "m.safetensors")
    {'c.parametrizations.weight.original': LayerRecord(basis='rfft', kernel_size=(3, 3), dtype='float32')}
    >>> parse_records({"layers": {"c": {"basis": "rfft", "kernel_size": [0, 3], "dtype": "float32"}}}, "m")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    spectral_cli.errors.CheckpointError: m: the spectral_cli record of 'c' is damaged (...: kernel_size must be ...)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, SpectralError
from ..transform.kernels import CONVERTIBLE_DTYPES, Basis, check_basis, check_kernel_size, spectral_kernel_shape
from .keys import TensorSpec

METADATA_KEY = "spectral_cli"


@dataclass(frozen=True)
class LayerRecord:
    """What is needed to bake a spectral tensor back without guessing."""

    basis: Basis
    kernel_size: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"basis": self.basis, "kernel_size": list(self.kernel_size), "dtype": self.dtype}

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a stored tensor of ``shape`` can be a conv kernel's coefficients in this record's layout."""
        k = len(self.kernel_size)
        lead = 3 if self.basis == "rfft" else 2  # (2,) for rfft, then (out, in)
        return (
            len(shape) == k + lead
            and (self.basis != "rfft" or shape[0] == 2)
            and tuple(shape[-k:]) == spectral_kernel_shape(self.kernel_size, self.basis)
        )


def _record(data: Any) -> LayerRecord:
    if not isinstance(data, Mapping):
        raise SpectralError("not a JSON object")
    missing = [name for name in ("basis", "kernel_size", "dtype") if name not in data]
    if missing:
        raise SpectralError(f"no {missing[0]}")
    dtype = data["dtype"]
    if dtype not in CONVERTIBLE_DTYPES:
        raise SpectralError(f"dtype {dtype!r} is not one of {', '.join(sorted(CONVERTIBLE_DTYPES))}")
    return LayerRecord(check_basis(data["basis"]), check_kernel_size(data["kernel_size"]), dtype)


def parse_records(entry: Any, where: str) -> dict[str, LayerRecord]:
    """The records of one file or state dict: ``entry`` is the document (a dict, or JSON text from safetensors
    metadata), ``None`` when there is none. ``where`` names the file in errors."""
    if entry is None:
        return {}
    if isinstance(entry, str):
        try:
            entry = json.loads(entry)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting depth
            raise CheckpointError(f"{where}: unreadable {METADATA_KEY} metadata: {entry[:80]!r}") from None
    layers = entry.get("layers") if isinstance(entry, Mapping) else None
    if not isinstance(layers, Mapping):
        raise CheckpointError(f"{where}: the {METADATA_KEY} metadata has no 'layers' mapping; it is damaged")
    records = {}
    for key, value in layers.items():
        try:
            records[str(key)] = _record(value)
        except SpectralError as e:
            message = f"{where}: the {METADATA_KEY} record of {key!r} is damaged ({value!r}: {e})"
            raise CheckpointError(message[:400]) from None
    return records


def records_document(records: Mapping[str, LayerRecord], version: str) -> dict[str, Any]:
    """The document :func:`parse_records` reads (sorted by key, so that it does not depend on order)."""
    return {"version": version, "layers": {k: records[k].to_json() for k in sorted(records)}}


def check_record(key: str, spec: TensorSpec, record: LayerRecord) -> None:
    """Refuse a record that does not fit its tensor (a damaged or edited checkpoint): nothing is guessed."""
    if spec.kind != "dense" or spec.dtype not in CONVERTIBLE_DTYPES:
        stored = spec.dtype if spec.kind == "dense" else spec.kind
        raise CheckpointError(
            f"{key}: recorded as a spectral tensor but stored as {stored}, which is not a float tensor; the "
            "checkpoint is damaged"
        )
    if not record.fits(spec.shape):
        raise CheckpointError(
            f"{key}: its spectral_cli record ({record.basis}, kernel size {record.kernel_size}) does not fit its "
            f"shape {spec.shape}; the record is damaged"
        )
