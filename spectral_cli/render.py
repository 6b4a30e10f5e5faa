"""Rich tables and the ``--json`` documents of the command line. Imports neither torch nor typer.

JSON schema (version 1), stable; new fields may be added, none removed or renamed:

``inspect``::

    {"schema": 1, "command": "inspect", "file": str,
     "format": "torch" | "torch-legacy" | "safetensors" | "safetensors-sharded" | "dcp" | "directory",
     "layers": [{"name", "location", "key",
                 "domain": "spectral" | "spatial" | "weight_norm" | "spectral_norm" | "parametrized",
                 "basis": "rfft" | "rdft" | null, "kernel_size": [int] | null, "shape": [int], "dtype": str,
                 "params": int, "inferred": bool, "energy": [float] | null}],
     "totals": {"layers": int, "spectral": int, "params": int, "bytes": int}}

``convert`` / ``bake``::

    {"schema": 1, "command": "convert" | "bake", "file": str, "output": str | null, "written": bool,
     "dry_run": bool, "message": str,
     "layers": [{"name", "location", "source_key", "key", "domain": "spectral" | "spatial", "basis",
                 "kernel_size", "shape_before", "shape", "dtype", "params_before", "params", "max_error",
                 "inferred"}],
     "skipped": [{"location", "key", "reason"}], "dropped": [str], "warnings": [str], "max_error": float | null}

Errors print ``{"schema": 1, "error": str, "exit_code": int}`` on stdout with ``--json``.
"""

from __future__ import annotations

import math
import unicodedata
from typing import TYPE_CHECKING, Any

from rich import box
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from .files.convert import FileReport
    from .files.inspect import InspectReport

SCHEMA = 1

#: categories of characters that are never printed as they are: controls (C0, C1, DEL), format characters (bidi
#: overrides, zero-width), line and paragraph separators, and the lone surrogates of undecodable file names
_UNPRINTABLE = ("Cc", "Cf", "Zl", "Zp", "Cs")


def printable(text: object) -> str:
    """``text`` with every character a terminal would act on shown as a Python escape: whatever a file or a key
    name holds, it is printed on one line, as text, and cannot move the cursor, recolour or retitle the terminal.

    Example:
        >>> printable("conv\\x1b[2J.weight\\nfake line \\u202eevil")
        'conv\\\\x1b[2J.weight\\\\nfake line \\\\u202eevil'
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _UNPRINTABLE else c for c in text)


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One block character per value, scaled to the largest."""
    top = max(values, default=0.0)
    if top <= 0 or not all(math.isfinite(v) for v in values):
        return " " * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, round(v / top * (len(SPARK) - 1)))] for v in values)


def _dims(shape: tuple[int, ...] | list[int] | None) -> str:
    return "-" if shape is None else "x".join(str(d) for d in shape) or "scalar"


def _error(value: float) -> str:
    return f"{value:.1e}" if math.isfinite(value) else str(value)


def _text(value: object) -> str:
    """A cell or title from a file: printable, and never read as Rich markup."""
    return escape(printable(value))


def _where(location: str, name: str, show_location: bool) -> str:
    """The layer cell: names and file paths are printable and never read as Rich markup."""
    return _text(f"{location}/{name}" if location and show_location else name or "(root)")


def _module_of(key: str) -> str:
    """``enc.weight`` / ``enc.parametrizations.weight.original`` / ``enc.weight_transformed`` -> ``enc``."""
    for suffix in ("parametrizations.weight.original", "weight_transformed", "weight"):
        if key == suffix or key.endswith("." + suffix):
            return key.removesuffix(suffix).removesuffix(".")
    return key


def _table(title: str, columns: tuple[str, ...], right: tuple[str, ...]) -> Table:
    table = Table(title=_text(title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    return table


def file_report_json(command: str, report: FileReport, dry_run: bool) -> dict[str, Any]:
    domain = "spectral" if command == "convert" else "spatial"
    errors = [c.max_error for _, c in report.changed]
    return {
        "schema": SCHEMA,
        "command": command,
        "file": str(report.source),
        "output": None if report.target is None else str(report.target),
        "written": report.written,
        "verified_tensors": report.verified,
        "dry_run": dry_run,
        "message": report.message,
        "layers": [
            {
                "name": c.name,
                "location": loc,
                "source_key": c.source_key,
                "key": c.target_key,
                "domain": domain,
                "basis": c.basis,
                "kernel_size": list(c.kernel_size),
                "shape_before": list(c.shape_before),
                "shape": list(c.shape_after),
                "dtype": c.dtype,
                "params_before": c.params_before,
                "params": c.params_after,
                "max_error": c.max_error if math.isfinite(c.max_error) else None,
                "inferred": c.inferred,
            }
            for loc, c in report.changed
        ],
        "skipped": [{"location": loc, "key": s.key, "reason": s.reason} for loc, s in report.skipped],
        "dropped": report.dropped,
        "warnings": report.warnings,
        "max_error": max(errors) if errors and all(math.isfinite(e) for e in errors) else None,
    }


def file_report_table(command: str, report: FileReport) -> Table:
    verb = "converted" if command == "convert" else "baked"
    columns = ("layer", "kind", "kernel", "shape before -> after", "dtype", "params", "max error")
    table = _table(f"{verb}: {report.source}", columns, ("params", "max error"))
    several = len({loc for loc, _ in report.changed + report.skipped}) > 1
    for loc, c in report.changed:
        kind = f"spatial -> {c.basis}" if command == "convert" else f"{c.basis} -> spatial"
        if c.inferred:
            kind += " (inferred)"
        params = (
            f"{c.params_before:,}"
            if c.params_before == c.params_after
            else f"{c.params_before:,} -> {c.params_after:,}"
        )
        table.add_row(
            _where(loc, c.name, several),
            kind,
            _dims(c.kernel_size),
            f"{_dims(c.shape_before)} -> {_dims(c.shape_after)}",
            _text(c.dtype),
            params,
            _error(c.max_error),
        )
    for loc, s in report.skipped:
        name = _module_of(s.key)
        table.add_row(_where(loc, name, several), f"[dim]skipped: {_text(s.reason)}[/dim]", "", "", "", "", "")
    return table


def file_report_summary(command: str, report: FileReport) -> str:
    verb = "converted" if command == "convert" else "baked"
    errors = [c.max_error for _, c in report.changed]
    worst = _error(max(errors)) if errors and all(math.isfinite(e) for e in errors) else "n/a"
    target = printable(report.target)
    if report.written:
        where = f"verified {report.verified} tensors; wrote {target}"
    else:
        where = f"dry run, would write {target}"
    return f"{verb} {len(report.changed)} layers, skipped {len(report.skipped)}; max error {worst}; {where}"


def _finite_or_none(values: list[float] | None) -> list[float] | None:
    """JSON has no NaN or Infinity: an energy profile of a kernel holding them is ``null``."""
    return values if values is not None and all(math.isfinite(v) for v in values) else None


def inspect_json(report: InspectReport) -> dict[str, Any]:
    layers = [
        {
            "name": info.name,
            "location": loc,
            "key": info.key,
            "domain": info.domain,
            "basis": info.basis,
            "kernel_size": None if info.kernel_size is None else list(info.kernel_size),
            "shape": list(info.shape),
            "dtype": info.dtype,
            "params": info.params,
            "inferred": info.inferred,
            "energy": _finite_or_none(report.energy.get((loc, info.key))),
        }
        for loc, info in report.layers
    ]
    return {
        "schema": SCHEMA,
        "command": "inspect",
        "file": str(report.source),
        "format": report.format,
        "layers": layers,
        "totals": {
            "layers": len(layers),
            "spectral": sum(1 for _, i in report.layers if i.domain == "spectral"),
            "params": report.total_params,
            "bytes": report.total_bytes,
        },
    }


def inspect_table(report: InspectReport) -> Table:
    # The energy column only when profiles were computed (safetensors are listed from the header alone).
    columns: tuple[str, ...] = ("layer", "domain", "basis", "kernel", "shape", "dtype", "params")
    if report.energy:
        columns += ("energy DC->Nyquist",)
    table = _table(f"{report.source} ({report.format})", columns, ("params",))
    several = len({loc for loc, _ in report.layers}) > 1
    for loc, info in report.layers:
        basis = (info.basis or "-") + (" (inferred)" if info.inferred else "")
        row = [_where(loc, info.name, several), info.domain, basis, _dims(info.kernel_size), _dims(info.shape),
               _text(info.dtype), f"{info.params:,}"]  # fmt: skip
        if report.energy:
            energy = report.energy.get((loc, info.key))
            row.append(sparkline(energy) if energy else "")
        table.add_row(*row)
    return table


def inspect_summary(report: InspectReport) -> str:
    spectral = sum(1 for _, i in report.layers if i.domain == "spectral")
    return (
        f"{len(report.layers)} layers listed ({spectral} spectral); "
        f"{report.total_params:,} parameters, {report.total_bytes:,} bytes of tensors"
    )
