"""Convert and bake whole checkpoint files; the work behind ``spectral convert`` and ``spectral bake``.

Two paths, one plan (:mod:`spectral_cli.plan`):

* torch files are loaded (``weights_only=True``, ``mmap=True``), every state dict in the container goes through
  the pure surgery, everything else in the container is kept, and the result is written atomically, read back
  and compared;
* safetensors files and sharded directories are streamed (:mod:`spectral_cli.streamed`): tensor by tensor,
  in slabs, every other tensor copied as raw bytes; memory stays near a few slabs.

Where the records go: torch files carry them in each state dict's ``_metadata`` (see
:mod:`spectral_cli.surgery`); safetensors files in ``__metadata__["spectral_cli"]`` as JSON, beside the
existing entries and ``"format": "pt"``. No printing here: progress is reported through a callback.
"""

from __future__ import annotations

import glob
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    Checkpoint,
    get_at,
    is_optimizer_state,
    key_prefix,
    load_checkpoint,
    set_at,
    write_atomic,
)
from .errors import CheckpointError, NothingToDoError, RefusedError
from .formats import (
    SAFETENSORS,
    SHARDED,
    check_output,
    default_output,
    detect_format,
    output_format,
)
from .layout import LayerRecord, TensorSpec
from .plan import Plan, Step, plan_bake, plan_convert
from .report import FileReport, Progress
from .slabs import Pieces, Scratch, bake_streamed, convert_streamed
from .stream import Entry
from .streamed import file_metadata, transform_safetensors
from .surgery import (
    METADATA_KEY,
    SurgeryResult,
    bake_state_dict,
    convert_state_dict,
    records_of,
    spec_of,
)


def _prefixed(patterns: Sequence[str] | None, prefix: str) -> list[str] | None:
    return None if patterns is None else [glob.escape(prefix) + p for p in patterns]


def parse_size(text: str) -> int:
    """``"500MB"``, ``"2GiB"``, ``"1048576"`` -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    try:
        size = int(float(number) * units[cleaned[len(number) :]])
    except (ValueError, KeyError):
        raise RefusedError(f"--max-shard-size {text!r}: give a size like 500MB, 2GB or 1GiB") from None
    if size <= 0:
        raise RefusedError(f"--max-shard-size {text!r}: must be positive")
    return size


# ---- torch files: in memory -----------------------------------------------------------------------------------


def _transform_torch(
    source: Path,
    output: Path | None,
    tag: str,
    surgery: Callable[[Mapping[str, Any], str, Checkpoint], SurgeryResult],
    *,
    dry_run: bool,
    force: bool,
    trust_pickle: bool,
) -> FileReport:
    ck = load_checkpoint(source, trust_pickle=trust_pickle)
    obj = ck.obj
    report = FileReport(source, None, ck.format, None)
    for loc, sd in ck.state_dicts():
        if ck.format == SAFETENSORS:
            sd = _with_records(sd, ck.metadata)
        result = surgery(sd, key_prefix(sd), ck)
        where = "/".join(loc)
        report.changed += [(where, c) for c in result.changed]
        report.skipped += [(where, s) for s in result.skipped]
        obj = set_at(obj, loc, result.state_dict)
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
        return report
    target = output if output is not None else default_output(source, tag, output_format(source, ck.format))
    fmt = output_format(target, ck.format)
    report.target, report.output_format = target, fmt
    if fmt == SAFETENSORS and ck.locations != [()]:
        raise RefusedError(f"{target}: safetensors holds only tensors, and {source} is a container; write a .pt file")
    check_output(source, target, force=force)
    if dry_run:
        return report
    metadata = None
    if fmt == SAFETENSORS:
        records = records_of(get_at(obj, ()))
        metadata = file_metadata(ck.metadata, records, None)
    write_atomic(target, fmt, obj, metadata, verify=lambda tmp: _verify_torch(tmp, target, obj, ck.locations))
    report.written, report.files = True, [target]
    return report


def _verify_torch(written_path: Path, target: Path, written: Any, locations: list[tuple[str, ...]]) -> None:
    """Read the written file back (before it replaces ``target``) and compare every tensor with ``written``."""
    back = load_checkpoint(written_path)
    for loc in locations:
        expected, actual = get_at(written, loc), get_at(back.obj, loc)
        if back.format == SAFETENSORS:
            actual = _with_records(actual, back.metadata)
        bad = [k for k, v in expected.items() if isinstance(v, torch.Tensor) and not _same(v, actual.get(k))]
        if bad or set(expected) != set(actual):
            raise CheckpointError(f"{target}: read back differently from what was written ({bad[:3]}); not written")
        if records_of(expected) != records_of(actual):
            raise CheckpointError(f"{target}: lost its spectral records on writing; not written")


def _with_records(sd: Mapping[str, Any], metadata: Mapping[str, str]) -> Mapping[str, Any]:
    from collections import OrderedDict

    out = OrderedDict(sd)
    raw = metadata.get(METADATA_KEY)
    if raw:
        out._metadata = OrderedDict({METADATA_KEY: json.loads(raw)})  # type: ignore[attr-defined]
    return out


def _same(a: torch.Tensor, b: Any) -> bool:
    """Same dtype, shape and values; NaN equals NaN (a checkpoint's NaNs are carried over, not an error).

    Sparse, nested and meta tensors (carried over, never transformed) are compared by what they hold.
    """
    if not (isinstance(b, torch.Tensor) and spec_of(a) == spec_of(b)):
        return False
    kind = spec_of(a).kind
    if kind == "meta":  # no data
        return True
    if kind == "nested":
        parts_a, parts_b = a.unbind(), b.unbind()
        return len(parts_a) == len(parts_b) and all(_same(x, y) for x, y in zip(parts_a, parts_b, strict=True))
    if kind != "dense":
        return _same(a.to_dense(), b.to_dense())
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


# ---- the two operations ---------------------------------------------------------------------------------------


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
    max_shard_size: int | None = None,
    progress: Progress | None = None,
) -> FileReport:
    """Convert a checkpoint's conv kernels to spectral tensors and write the result next to it."""

    def planner(specs: dict[str, TensorSpec], records: dict[str, LayerRecord], prefix: str) -> Plan:
        return plan_convert(specs, records, basis=basis, include=_prefixed(include, prefix),  # type: ignore[arg-type]
                            exclude=_prefixed(exclude, prefix))  # fmt: skip

    def surgery(sd: Mapping[str, Any], prefix: str, ck: Checkpoint) -> SurgeryResult:
        excl = list(_prefixed(exclude, prefix) or [])
        if ck.conv_modules is not None:  # a walked module: only its real conv layers
            kernels = {k.removesuffix(".weight") for k in sd if k.endswith(".weight")}
            excl += [glob.escape(n) for n in sorted(kernels - ck.conv_modules)]
        return convert_state_dict(sd, basis=basis, include=_prefixed(include, prefix), exclude=excl or None)  # type: ignore[arg-type]

    report = _run(Path(source), output, "spectral", planner, convert_streamed, surgery, dry_run=dry_run, force=force,
                  trust_pickle=trust_pickle, max_shard_size=max_shard_size, progress=progress)  # fmt: skip
    if not report.changed:
        already = [s for _, s in report.skipped if s.reason == "already spectral"]
        if already:
            report.message = f"nothing to convert: {len(already)} layers are already spectral; no file written"
            return report
        raise NothingToDoError(
            f"{source}: no convertible conv kernels (float weights of rank 3 to 5 with more "
            f"than one tap){_skip_summary(report)}; nothing to convert"
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
    max_shard_size: int | None = None,
    progress: Progress | None = None,
) -> FileReport:
    """Bake every spectral tensor of a checkpoint back to a spatial weight in its original dtype."""

    def planner(specs: dict[str, TensorSpec], records: dict[str, LayerRecord], prefix: str) -> Plan:
        return plan_bake(specs, records, kernel_size=kernel_size)

    def surgery(sd: Mapping[str, Any], prefix: str, ck: Checkpoint) -> SurgeryResult:
        return bake_state_dict(sd, kernel_size=kernel_size)

    report = _run(Path(source), output, "baked", planner, bake_streamed, surgery, dry_run=dry_run, force=force,
                  trust_pickle=trust_pickle, max_shard_size=max_shard_size, progress=progress)  # fmt: skip
    if not report.changed:
        raise NothingToDoError(f"{source}: no spectral tensors{_skip_summary(report)}; nothing to bake")
    return report


def _run(
    source: Path,
    output: Path | str | None,
    tag: str,
    planner: Callable[[dict[str, TensorSpec], dict[str, LayerRecord], str], Plan],
    execute: Callable[[Step, BufferedReader, Entry, Scratch], Pieces],
    surgery: Callable[[Mapping[str, Any], str, Checkpoint], SurgeryResult],
    *,
    dry_run: bool,
    force: bool,
    trust_pickle: bool,
    max_shard_size: int | None,
    progress: Progress | None,
) -> FileReport:
    """Stream safetensors (``planner``, ``execute``), or load a torch file whole (``surgery``)."""
    out = None if output is None else Path(output)
    if _streams(source, out, max_shard_size):
        report = transform_safetensors(source, out, tag, planner, execute, dry_run=dry_run, force=force,
                                        max_shard_size=max_shard_size, progress=progress)  # fmt: skip
    else:
        _no_sharding(max_shard_size, source)
        report = _transform_torch(source, out, tag, surgery, dry_run=dry_run, force=force, trust_pickle=trust_pickle)
    _warn_nonfinite(report)
    return report


def _skip_summary(report: FileReport) -> str:
    """``"; skipped: 1x1 kernel (3), excluded (1)"``: why the tensors that looked like kernels were left."""
    reasons = Counter(s.reason for _, s in report.skipped)
    if not reasons:
        return ""
    return "; skipped: " + ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common())


def _streams(source: Path, output: Path | None, max_shard_size: int | None) -> bool:
    """safetensors in and out (or shards): streamed. Anything involving a torch file goes through memory."""
    fmt = detect_format(source)
    if fmt == SHARDED or max_shard_size is not None:
        return fmt in (SAFETENSORS, SHARDED)
    return fmt == SAFETENSORS and (output is None or output_format(output, SAFETENSORS) == SAFETENSORS)


def _no_sharding(max_shard_size: int | None, source: Path) -> None:
    if max_shard_size is not None:
        raise RefusedError(f"{source}: --max-shard-size writes safetensors shards; it needs a safetensors input")


def _warn_nonfinite(report: FileReport) -> None:
    for _, change in report.changed:
        if not math.isfinite(change.max_error):
            report.warnings.append(
                f"{change.source_key}: holds NaN or Inf values; written anyway, and the transform spreads "
                "them over every tap of the kernels that hold them"
            )
