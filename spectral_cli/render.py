"""The tables, summaries and ``--json`` documents of the command line: pure functions of a report, a width and
the characters stdout can encode. Imports neither torch nor typer.

Tables are plain text laid out here, never cut by a terminal: tokens (shapes, dtypes, numbers, bases) are never
split. When the natural width does not fit, the layer name folds first (down to :data:`NAME_MIN` cells, at its
dots where it can); then columns are dropped, one at a time, in the order of :data:`CONVERT_DROPS` and
:data:`INSPECT_DROPS`; when even the narrowest table does not fit, each layer is one line of text instead. A long
table (more than :data:`LONG` rows) shows its first :data:`FIRST` rows and the :data:`LARGEST` largest of the
rest, then how many more ``--json`` lists; more than :data:`LONG_SKIPPED` skipped layers are counted by reason
after the first :data:`FIRST_SKIPPED`. Selecting them is linear in the layers; only the rows shown are laid out.

JSON schema (version 1), stable; new fields may be added, none removed or renamed:

``inspect``::

    {"schema": 1, "command": "inspect", "file": str,
     "format": "torch" | "torch-legacy" | "safetensors" | "safetensors-sharded" | "dcp" | "directory",
     "layers": [{"name", "location", "key",
                 "domain": "spectral" | "spatial" | "weight_norm" | "spectral_norm" | "pruned"
                 | "parametrized",
                 "basis": "rfft" | "rdft" | null, "kernel_size": [int] | null, "shape": [int], "dtype": str,
                 "params": int, "inferred": bool, "energy": [float] | null}],
     "totals": {"layers": int, "spectral": int, "params": int, "bytes": int}}

``convert`` / ``bake``::

    {"schema": 1, "command": "convert" | "bake", "file": str, "output": str | null, "written": bool,
     "dry_run": bool, "message": str,
     "layers": [{"name", "location", "source_key", "key", "domain": "spectral" | "spatial", "basis",
                 "kernel_size", "shape_before", "shape", "dtype", "params_before", "params", "max_error",
                 "inferred"}],
     "skipped": [{"location", "key", "reason", "fix"}], "dropped": [str], "warnings": [str], "max_error": float | null,
     "optimizer": [{"location", "optimizer", "parameters": int, "converted": [str], "approximated": [str],
                    "second_moment": str, "reaged_to": int | null, "dropped": [{"parameter", "reason"}],
                    "removed": bool}]}

``dropped`` lists the container entries left out of the output; ``optimizer`` says what became of each optimizer
state: the parameters whose state was converted (by their names in the input), those of them holding
approximations, and those whose state was dropped (``"*"``: every parameter's) and why.

Errors print ``{"schema": 1, "error": str, "exit_code": int}`` on stdout with ``--json``.
"""

from __future__ import annotations

import codecs
import heapq
import math
import textwrap
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len, get_character_cell_size

from .statedict.keys import layer_of

if TYPE_CHECKING:
    from .files.listing import InspectReport
    from .files.report import FileReport

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


@dataclass(frozen=True)
class Glyphs:
    """The characters tables are drawn with: Unicode where stdout can encode it, ASCII otherwise; and stdout's
    encoding, in which what a file says (names, dtypes, reasons) is written, other characters as escapes."""

    arrow: str
    more: str
    rule: str
    spark: str
    encoding: str = "utf-8"

    def say(self, text: object) -> str:
        """``text`` printable (:func:`printable`), in what :attr:`encoding` can say: laid out as it will print.

        Example:
            >>> glyphs_for("latin-1").say("böse.层\\x1b")
            'böse.\\\\u5c42\\\\x1b'
        """
        return printable(text).encode(self.encoding, "backslashreplace").decode(self.encoding)


UNICODE = Glyphs(arrow="→", more="…", rule="─", spark="▁▂▃▄▅▆▇█")
ASCII = Glyphs(arrow="->", more="...", rule="-", spark="_.:-=+*#", encoding="ascii")


def glyphs_for(encoding: str | None) -> Glyphs:
    """:data:`UNICODE` if ``encoding`` (stdout's) can encode all of it, else :data:`ASCII`.

    Example:
        >>> glyphs_for("utf-8").arrow, glyphs_for("latin-1").arrow, glyphs_for("ascii").spark
        ('→', '->', '_.:-=+*#')
    """
    try:
        encoding = codecs.lookup(encoding or "utf-8").name
    except LookupError:
        return ASCII
    try:
        (UNICODE.arrow + UNICODE.more + UNICODE.rule + UNICODE.spark).encode(encoding)
    except UnicodeError:
        return replace(ASCII, encoding=encoding)
    return replace(UNICODE, encoding=encoding)


SPARK = UNICODE.spark


def sparkline(values: list[float], spark: str = SPARK) -> str:
    """One character of ``spark`` per value, scaled to the largest."""
    top = max(values, default=0.0)
    if top <= 0 or not all(math.isfinite(v) for v in values):
        return " " * len(values)
    return "".join(spark[min(len(spark) - 1, round(v / top * (len(spark) - 1)))] for v in values)


def _dims(shape: tuple[int, ...] | list[int] | None) -> str:
    return "-" if shape is None else "x".join(str(d) for d in shape) or "scalar"


def _error(value: float) -> str:
    return f"{value:.1e}" if math.isfinite(value) else str(value)


def _where(location: str, name: str, show_location: bool, g: Glyphs) -> str:
    """The layer cell: names and file paths printable, in stdout's encoding."""
    return g.say(f"{location}/{name}" if location and show_location else name or "(root)")


# ---- the table layout ------------------------------------------------------------------------------------------

#: the table's left margin and the space between columns, in cells
INDENT, GAP = 1, 2
#: the layer name folds down to this many cells before any column is dropped
NAME_MIN = 20
#: a table of more rows is summarized: the first FIRST rows, the LARGEST largest of the rest, and a count
LONG, FIRST, LARGEST = 100, 20, 20
#: more skipped layers than this are counted by reason after the first FIRST_SKIPPED
LONG_SKIPPED, FIRST_SKIPPED = 50, 10
#: convert and bake drop these columns, in this order, when the width is too small (never the layer, the shape
#: or the max error)
CONVERT_DROPS = ("params", "dtype", "kernel", "kind")
#: inspect drops these, in this order (never the layer, the domain, the basis or the shape)
INSPECT_DROPS = ("params", "dtype", "kernel", "energy")


@dataclass(frozen=True)
class Column:
    """A table's column: its header, its cells' label on a one-line-per-layer list, its justification."""

    header: str
    #: the label of the cell on a one-line-per-layer list ("" for none)
    label: str = ""
    right: bool = False


@dataclass(frozen=True)
class Row:
    """A layer: its cells (the first is its name), or its name and a note (a skipped layer's reason) spanning
    the other columns."""

    cells: tuple[str, ...]
    note: str | None = None


#: a table's lines are rows or plain lines (the "… N more" markers), drawn at the table's margin
Line = Row | str


def _cut(text: str, width: int) -> int:
    """How many characters of ``text`` fit in ``width`` cells (at least one)."""
    used = 0
    for i, char in enumerate(text):
        used += get_character_cell_size(char)
        if used > width:
            return max(i, 1)
    return len(text)


def fold(text: str, width: int) -> list[str]:
    """``text`` in pieces of at most ``width`` cells, each ending after its last ``.``, ``/`` or ``_`` unless that
    would leave it shorter than a quarter of ``width``.

    Example:
        >>> fold("encoder.stages.0.blocks.1.conv", 12)
        ['encoder.', 'stages.0.', 'blocks.1.', 'conv']
    """
    pieces = []
    while cell_len(text) > width:
        cut = _cut(text, width)
        separator = max(text.rfind(c, 0, cut) for c in "./_")
        if separator + 1 >= max(1, cut // 4):
            cut = separator + 1
        pieces.append(text[:cut])
        text = text[cut:]
    return [*pieces, text]


def _pad(text: str, width: int, right: bool) -> str:
    space = " " * max(0, width - cell_len(text))
    return space + text if right else text + space


def layout(
    columns: Sequence[Column], lines: Sequence[Line], width: int, drops: Sequence[str], rule: str = UNICODE.rule
) -> list[str]:
    """The table at ``width`` cells: the layer name folded first, then the columns whose header starts with one
    of ``drops`` dropped in order; when even that does not fit, one line per layer (``name: cell, label cell``)."""
    rows = [line for line in lines if isinstance(line, Row)]
    natural = [cell_len(column.header) for column in columns]
    for row in rows:
        natural[0] = max(natural[0], cell_len(row.cells[0]))
        if row.note is None:
            for i, cell in enumerate(row.cells[1:], 1):
                natural[i] = max(natural[i], cell_len(cell))
    kept = list(range(len(columns)))
    order = [i for header in drops for i, column in enumerate(columns) if column.header.startswith(header)]
    for dropping in [None, *order]:
        if dropping is not None:
            kept.remove(dropping)
        others = INDENT + sum(natural[i] + GAP for i in kept[1:])
        name = min(natural[0], width - others)
        if name >= min(natural[0], NAME_MIN):
            widths = [name, *natural[1:]]
            return _draw(columns, lines, kept, widths, width, rule)
    return _listed(columns, lines)


def _draw(
    columns: Sequence[Column], lines: Sequence[Line], kept: list[int], widths: list[int], width: int, rule: str
) -> list[str]:
    margin = " " * INDENT
    gap = " " * GAP

    def joined(cells: Sequence[str]) -> str:
        return (margin + gap.join(_pad(cells[i], widths[i], columns[i].right) for i in kept)).rstrip()

    header = joined([column.header for column in columns])
    out = [header, margin + rule * (sum(widths[i] for i in kept) + GAP * (len(kept) - 1))]
    span = max(width - INDENT - widths[0] - GAP, NAME_MIN)
    for line in lines:
        if isinstance(line, str):
            parts = textwrap.wrap(line, max(width - INDENT, NAME_MIN), break_on_hyphens=False)
            out += [margin + part for part in parts]
            continue
        names = fold(line.cells[0], widths[0])
        if line.note is None:
            out.append(joined([names[0], *line.cells[1:]]))
            out.extend(margin + piece for piece in names[1:])
            continue
        notes = textwrap.wrap(line.note, span, break_on_hyphens=False) or [""]
        for i in range(max(len(names), len(notes))):
            piece = names[i] if i < len(names) else ""
            note = notes[i] if i < len(notes) else ""
            out.append((margin + _pad(piece, widths[0], False) + gap + note).rstrip())
    return out


def _listed(columns: Sequence[Column], lines: Sequence[Line]) -> list[str]:
    out = []
    for line in lines:
        if isinstance(line, str):
            out.append(line)
        elif line.note is not None:
            out.append(f"{line.cells[0]}: {line.note}")
        else:
            cells = [f"{c.label} {cell}".strip() for c, cell in zip(columns[1:], line.cells[1:], strict=True)
                     if cell not in ("", "-")]  # fmt: skip
            out.append(f"{line.cells[0]}: {', '.join(cells)}")
    return out


def _selected(count: int, size: Callable[[int], int]) -> tuple[list[int], int]:
    """The indices of a long table's rows to show (the first ones, then the largest of the rest, in order) and
    how many are left out: linear in ``count``."""
    if count <= LONG:
        return list(range(count)), 0
    largest = heapq.nlargest(LARGEST, range(FIRST, count), key=size)
    return [*range(FIRST), *sorted(largest)], count - FIRST - LARGEST


def _skipped_lines(skipped: Sequence[tuple[str, Any]], several: bool, g: Glyphs) -> list[Line]:
    shown = skipped if len(skipped) <= LONG_SKIPPED else skipped[:FIRST_SKIPPED]
    lines: list[Line] = [
        Row((_where(loc, layer_of(s.key), several, g),), f"skipped: {g.say(s.reason)}") for loc, s in shown
    ]
    if len(shown) < len(skipped):
        reasons = Counter(s.reason for _, s in skipped[FIRST_SKIPPED:]).most_common()
        said = ", ".join(f"{g.say(reason)}: {n:,}" for reason, n in reasons[:3])
        if len(reasons) > 3:
            said += f", {len(reasons) - 3:,} other reasons"
        lines.append(f"{g.more} {len(skipped) - len(shown):,} more skipped ({said}); --json lists all")
    return lines


def _more(hidden: int, g: Glyphs) -> list[Line]:
    return [f"{g.more} {hidden:,} more; --json lists all"] if hidden else []


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
        "skipped": [{"location": loc, "key": s.key, "reason": s.reason, "fix": s.fix} for loc, s in report.skipped],
        "dropped": report.dropped,
        "warnings": report.warnings,
        "max_error": max(errors) if errors and all(math.isfinite(e) for e in errors) else None,
        "optimizer": [
            {
                "location": o.where,
                "optimizer": o.optimizer,
                "parameters": o.parameters,
                "converted": o.converted,
                "approximated": o.approximated,
                "second_moment": o.second_moment,
                "reaged_to": o.reaged,
                "dropped": [{"parameter": name, "reason": why} for name, why in o.dropped],
                "removed": o.removed,
            }
            for o in report.optimizer
        ],
    }


def file_report_lines(command: str, report: FileReport, width: int, g: Glyphs = UNICODE) -> list[str]:
    """The table of a convert or bake report, its title first, at ``width`` cells."""
    verb = "converted" if command == "convert" else "baked"
    columns = (
        Column("layer"),
        Column("kind"),
        Column("kernel", "kernel"),
        Column(f"shape before {g.arrow} after"),
        Column("dtype"),
        Column("params", "params", right=True),
        Column("max error", "max error", right=True),
    )
    several = len({loc for loc, _ in report.changed} | {loc for loc, _ in report.skipped}) > 1
    chosen, hidden = _selected(len(report.changed), lambda i: report.changed[i][1].params_before)
    lines: list[Line] = []
    for n, index in enumerate(chosen):
        if n == FIRST and hidden:
            lines.append(f"{g.more} and the {LARGEST} largest of the other {hidden + LARGEST:,}:")
        loc, c = report.changed[index]
        params = f"{c.params_before:,}"
        if c.params_before != c.params_after:
            params += f" {g.arrow} {c.params_after:,}"
        kind = c.basis + (" (inferred)" if c.inferred else "")
        shapes = f"{_dims(c.shape_before)} {g.arrow} {_dims(c.shape_after)}"
        cells = (_where(loc, c.name, several, g), kind, _dims(c.kernel_size), shapes, g.say(c.dtype), params,
                 _error(c.max_error))  # fmt: skip
        lines.append(Row(cells))
    lines += _more(hidden, g)
    lines += _skipped_lines(report.skipped, several, g)
    table = layout(columns, lines, width, CONVERT_DROPS, g.rule)
    said = [g.say(o.line(verb)) for o in report.optimizer]
    return [f"{verb}: {g.say(report.source)}", "", *table, *([""] if said else []), *said]


def file_report_summary(command: str, report: FileReport) -> str:
    verb = "converted" if command == "convert" else "baked"
    errors = [c.max_error for _, c in report.changed]
    worst = _error(max(errors)) if errors and all(math.isfinite(e) for e in errors) else "n/a"
    target = printable(report.target)
    if report.written:
        where = f"verified {report.verified:,} tensors; wrote {target}"
    else:
        where = f"dry run, would write {target}"
    return f"{verb} {len(report.changed):,} layers, skipped {len(report.skipped):,}; max error {worst}; {where}"


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


def inspect_lines(report: InspectReport, width: int, g: Glyphs = UNICODE) -> list[str]:
    """The table of an inspect report, its title first, at ``width`` cells. The energy column only when profiles
    were computed (safetensors are listed from the header alone)."""
    columns = [Column("layer"), Column("domain"), Column("basis"), Column("kernel", "kernel"), Column("shape"),
               Column("dtype"), Column("params", "params", right=True)]  # fmt: skip
    if report.energy:
        columns.append(Column(f"energy DC{g.arrow}Nyquist", "energy"))
    several = len({loc for loc, _ in report.layers}) > 1
    chosen, hidden = _selected(len(report.layers), lambda i: report.layers[i][1].params)
    lines: list[Line] = []
    for n, index in enumerate(chosen):
        if n == FIRST and hidden:
            lines.append(f"{g.more} and the {LARGEST} largest of the other {hidden + LARGEST:,}:")
        loc, info = report.layers[index]
        basis = (info.basis or "-") + (" (inferred)" if info.inferred else "")
        cells = [_where(loc, info.name, several, g), g.say(info.domain), basis, _dims(info.kernel_size),
                 _dims(info.shape), g.say(info.dtype), f"{info.params:,}"]  # fmt: skip
        if report.energy:
            energy = report.energy.get((loc, info.key))
            cells.append(sparkline(energy, g.spark) if energy else "")
        lines.append(Row(tuple(cells)))
    lines += _more(hidden, g)
    title = f"{g.say(report.source)} ({report.format})"
    if not lines:  # no table: its header alone would say nothing
        return [title]
    return [title, "", *layout(columns, lines, width, INSPECT_DROPS, g.rule)]


def inspect_summary(report: InspectReport) -> str:
    spectral = sum(1 for _, i in report.layers if i.domain == "spectral")
    return (
        f"{len(report.layers):,} layers listed ({spectral:,} spectral); "
        f"{report.total_params:,} parameters, {report.total_bytes:,} bytes of tensors"
    )
