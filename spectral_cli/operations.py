"""The three file operations behind the command line: convert, bake, inspect.

Each reads a checkpoint (:mod:`spectral_cli.checkpoint`), applies the pure state-dict surgery
(:mod:`spectral_cli.surgery`) to every state dict in it, keeps everything else in the container as it was,
writes atomically, reads the written file back and compares, and returns a report. No printing.

Where the records go: torch files carry them in each state dict's ``_metadata`` (see
:mod:`spectral_cli.surgery`); safetensors files in ``__metadata__["spectral_cli"]`` as JSON, beside the
existing entries and ``"format": "pt"``.
"""

from __future__ import annotations

import glob
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import (
    KEY_PREFIXES,
    SAFETENSORS,
    Checkpoint,
    check_output,
    get_at,
    is_optimizer_state,
    load_checkpoint,
    output_format,
    set_at,
    write_atomic,
)
from .errors import CheckpointError, NothingToDoError, RefusedError
from .spectrum import radial_energy
from .surgery import (
    METADATA_KEY,
    LayerChange,
    LayerInfo,
    Skipped,
    SurgeryResult,
    bake_state_dict,
    convert_state_dict,
    describe_state_dict,
    records_of,
)


@dataclass
class FileReport:
    """What convert or bake did to a file. ``location`` names the state dict inside a container."""

    source: Path
    target: Path | None
    input_format: str
    output_format: str | None
    changed: list[tuple[str, LayerChange]] = field(default_factory=list)
    skipped: list[tuple[str, Skipped]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    written: bool = False
    message: str = ""


@dataclass
class InspectReport:
    source: Path
    format: str
    layers: list[tuple[str, LayerInfo]]
    #: radial energy profile per (location, key); absent for kernels holding NaN or Inf
    energy: dict[tuple[str, str], list[float]]
    total_params: int
    total_bytes: int


def key_prefix(keys: Iterable[str]) -> str:
    """The wrapper prefix (``module.``, ``_orig_mod.``, ...) shared by every key, possibly nested."""
    keys = list(keys)
    prefix = ""
    while keys:
        for p in KEY_PREFIXES:
            if all(k.startswith(prefix + p) for k in keys):
                prefix += p
                break
        else:
            return prefix
    return prefix


def _prefixed(patterns: Sequence[str] | None, prefix: str) -> list[str] | None:
    return None if patterns is None else [glob.escape(prefix) + p for p in patterns]


def _with_safetensors_records(sd: Mapping[str, Any], metadata: Mapping[str, str]) -> OrderedDict[str, Any]:
    out = OrderedDict(sd)
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            out._metadata = OrderedDict({METADATA_KEY: json.loads(raw)})  # type: ignore[attr-defined]
        except ValueError:
            raise CheckpointError(
                f"unreadable {METADATA_KEY} entry in the safetensors metadata: {raw[:80]!r}"
            ) from None
    return out


def _safetensors_metadata(base: Mapping[str, str], result: SurgeryResult) -> dict[str, str]:
    meta = {k: v for k, v in base.items() if k != METADATA_KEY}
    meta.setdefault("format", "pt")
    if result.records:
        layers = {k: r.to_json() for k, r in result.records.items()}
        meta[METADATA_KEY] = json.dumps({"version": __version__, "layers": layers}, sort_keys=True)
    return meta


def default_output(source: Path, tag: str, fmt: str) -> Path:
    """``model.pt`` -> ``model.<tag>.pt`` (an earlier ``.spectral``/``.baked`` tag is replaced)."""
    stem = source.stem
    for old in (".spectral", ".baked"):
        stem = stem.removesuffix(old)
    suffix = ".safetensors" if fmt == SAFETENSORS else (source.suffix or ".pt")
    if fmt != SAFETENSORS and suffix == ".safetensors":
        suffix = ".pt"
    return source.with_name(f"{stem}.{tag}{suffix}")


def _location_name(loc: tuple[str, ...]) -> str:
    return "/".join(loc)


def _transform_file(
    source: Path | str,
    output: Path | str | None,
    tag: str,
    surgery: Callable[[Mapping[str, Any], str, Checkpoint], SurgeryResult],
    *,
    dry_run: bool,
    force: bool,
    trust_pickle: bool,
) -> tuple[FileReport, Checkpoint]:
    source = Path(source)
    ck = load_checkpoint(source, trust_pickle=trust_pickle)
    obj = ck.obj
    report = FileReport(source, None, ck.format, None)
    last: SurgeryResult | None = None
    for loc, sd in ck.state_dicts():
        if ck.format == SAFETENSORS:
            sd = _with_safetensors_records(sd, ck.metadata)
        prefix = key_prefix(sd)
        result = surgery(sd, prefix, ck)
        where = _location_name(loc)
        report.changed += [(where, c) for c in result.changed]
        report.skipped += [(where, s) for s in result.skipped]
        obj = set_at(obj, loc, result.state_dict)
        last = result
    for change in (c for _, c in report.changed):
        if not math.isfinite(change.max_error):
            report.warnings.append(
                f"{change.source_key}: holds NaN or Inf values; written anyway, and the transform spreads "
                "them over every tap of the kernels that hold them"
            )
    if report.changed and isinstance(obj, Mapping):
        dropped = [k for k, v in obj.items() if isinstance(k, str) and is_optimizer_state(v)]
        if dropped:
            obj = {k: v for k, v in obj.items() if k not in dropped}
            report.dropped = dropped
            report.warnings.append(
                f"dropped optimizer state ({', '.join(dropped)}): it refers to the weights as they were; "
                "rebuild the optimizer after loading"
            )
    if not report.changed:
        return report, ck
    target = Path(output) if output is not None else default_output(source, tag, output_format(source, ck.format))
    fmt = output_format(target, ck.format)
    report.target, report.output_format = target, fmt
    if fmt == SAFETENSORS and ck.locations != [()]:
        raise RefusedError(f"{target}: safetensors holds only tensors, and {source} is a container; write a .pt file")
    check_output(source, target, force=force)
    if dry_run:
        return report, ck
    assert last is not None
    metadata = _safetensors_metadata(ck.metadata, last) if fmt == SAFETENSORS else None
    write_atomic(target, fmt, obj, metadata)
    _verify(target, obj, ck.locations)
    report.written = True
    return report, ck


def _verify(target: Path, written: Any, locations: list[tuple[str, ...]]) -> None:
    """Read the output back and compare every tensor with what was meant to be written."""
    back = load_checkpoint(target)
    for loc in locations:
        expected, actual = get_at(written, loc), get_at(back.obj, loc)
        bad = [k for k, v in expected.items() if isinstance(v, torch.Tensor) and not _same(v, actual.get(k))]
        if bad or set(expected) != set(actual):
            target.unlink(missing_ok=True)
            raise CheckpointError(f"{target}: read back differently from what was written ({bad[:3]}); removed it")
        if records_of(expected) and records_of(expected) != records_of(_reattach(actual, back)):
            target.unlink(missing_ok=True)
            raise CheckpointError(f"{target}: lost its spectral records on writing; removed it")


def _reattach(sd: Mapping[str, Any], ck: Checkpoint) -> Mapping[str, Any]:
    return _with_safetensors_records(sd, ck.metadata) if ck.format == SAFETENSORS else sd


def _same(a: torch.Tensor, b: Any) -> bool:
    """Same dtype, shape and values; NaN equals NaN (a checkpoint's NaNs are carried over, not an error)."""
    if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
        return False
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def convert_file(
    source: Path | str,
    output: Path | str | None = None,
    *,
    basis: str = "rfft",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dry_run: bool = False,
    force: bool = False,
    trust_pickle: bool = False,
) -> FileReport:
    """Convert a checkpoint's conv kernels to spectral tensors and write the result next to it."""

    def surgery(sd: Mapping[str, Any], prefix: str, ck: Checkpoint) -> SurgeryResult:
        excl = list(_prefixed(exclude, prefix) or [])
        if ck.conv_modules is not None:  # a walked module: only its real conv layers
            kernels = {k.removesuffix(".weight") for k in sd if k.endswith(".weight")}
            excl += [glob.escape(n) for n in sorted(kernels - ck.conv_modules)]
        return convert_state_dict(sd, basis=basis, include=_prefixed(include, prefix), exclude=excl or None)  # type: ignore[arg-type]

    report, ck = _transform_file(
        source, output, "spectral", surgery, dry_run=dry_run, force=force, trust_pickle=trust_pickle
    )
    if not report.changed:
        already = [s for _, s in report.skipped if s.reason == "already spectral"]
        if already:
            report.message = f"nothing to convert: {len(already)} layers are already spectral; no file written"
            return report
        raise NothingToDoError(
            f"{ck.path}: no convertible conv kernels (float weights of rank 3 to 5 with more "
            "than one tap); nothing to convert"
        )
    return report


def bake_file(
    source: Path | str,
    output: Path | str | None = None,
    *,
    kernel_size: tuple[int, ...] | None = None,
    dry_run: bool = False,
    force: bool = False,
    trust_pickle: bool = False,
) -> FileReport:
    """Bake every spectral tensor of a checkpoint back to a spatial weight in its original dtype."""

    def surgery(sd: Mapping[str, Any], prefix: str, ck: Checkpoint) -> SurgeryResult:
        return bake_state_dict(sd, kernel_size=kernel_size)

    report, ck = _transform_file(
        source, output, "baked", surgery, dry_run=dry_run, force=force, trust_pickle=trust_pickle
    )
    if not report.changed:
        raise NothingToDoError(f"{ck.path}: no spectral tensors; nothing to bake")
    return report


def inspect_file(source: Path | str, *, include_spatial: bool = False, trust_pickle: bool = False) -> InspectReport:
    """List a checkpoint's parametrized layers (and with ``include_spatial`` its convertible kernels)."""
    ck = load_checkpoint(source, trust_pickle=trust_pickle)
    layers: list[tuple[str, LayerInfo]] = []
    energy: dict[tuple[str, str], list[float]] = {}
    params = nbytes = 0
    for loc, sd in ck.state_dicts():
        if ck.format == SAFETENSORS:
            sd = _with_safetensors_records(sd, ck.metadata)
        where = _location_name(loc)
        for info in describe_state_dict(sd, include_spatial=include_spatial):
            layers.append((where, info))
            if info.kernel_size is not None and info.domain in ("spectral", "spatial"):
                layout = info.basis if info.domain == "spectral" else "spatial"
                value = sd[info.key]
                if not bool(torch.isfinite(value).all()):  # NaN or Inf: no meaningful profile
                    continue
                if value.is_complex():
                    value = torch.stack((value.real, value.imag))
                energy[where, info.key] = radial_energy(value, info.kernel_size, layout or "rfft")
        for value in sd.values():
            if isinstance(value, torch.Tensor):
                params += value.numel()
                nbytes += value.numel() * value.element_size()
    return InspectReport(Path(source), ck.format, layers, energy, params, nbytes)
