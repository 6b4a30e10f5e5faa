"""The ``spectral`` command line: Typer commands and Rich output only.

torch is imported inside the commands, so ``spectral --help`` and ``--version`` start instantly, and ``inspect``
of a safetensors file never imports it. Results go to stdout, warnings to stderr. A user's mistake ends with one
line on stderr and the exit code of its :class:`~spectral_cli.errors.SpectralError` (the table:
:data:`~spectral_cli.errors.EXIT_CODES`); option values are checked by the commands themselves, so that a bad one
is an exit-2 error that ``--json`` reports as JSON too. Set ``SPECTRAL_DEBUG=1`` to see tracebacks.

Tests run the app with ``CliRunner().invoke(app, args, obj=Io(...))``: the context object, when it is a
:class:`~spectral_cli.files.checkpoint.Io`, replaces the system calls and piece sizes of convert and bake (the seam
where faults are injected).
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from . import __version__, console

if TYPE_CHECKING:
    from .files.convert import Options
    from .files.report import FileReport

app = typer.Typer(
    name="spectral",
    help="Convert conv checkpoints to the spectral parametrization (Ballé, PCS 2018), bake them back, inspect them.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help and usage errors: Rich's panels show every flag with a "<bool>" as if it took a value,
    # read "[plot]" in a help text as markup, and print nothing at all under COLUMNS=0
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spectral {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Spectral parametrization of convolution kernels, for checkpoints."""


# ---- option values: checked here, so that a bad one is a usage error (exit 2) also under --json ---------------


def parse_kernel_size(text: str | None) -> tuple[int, ...] | None:
    """``"3x5"``, ``"5"``, ``"3x3x3"`` -> a kernel size."""
    if text is None:
        return None
    from .errors import SpectralError

    try:
        parts = tuple(int(p) for p in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise SpectralError(f"--kernel-size {text!r}: give sizes like 3x3, 5 or 3x3x3") from None
    if not 1 <= len(parts) <= 3 or min(parts) < 1:
        raise SpectralError(f"--kernel-size {text!r}: give 1 to 3 positive sizes, like 3x3")
    return parts


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(|B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | None) -> int | None:
    """``"500MB"``, ``"2GiB"``, ``"1.5GB"``, ``"1048576"`` -> bytes: at least one, at most 2**62.

    Example:
        >>> parse_size("2GiB"), parse_size("1.5 kB")
        (2147483648, 1500)
        >>> parse_size("inf")
        Traceback (most recent call last):
        ...
        spectral_cli.errors.SpectralError: --max-shard-size 'inf': give a size like 500MB, 2GB or 1GiB
    """
    if text is None:
        return None
    from .errors import SpectralError

    found = _SIZE.fullmatch(text.strip())
    try:
        size = int(Decimal(found[1]) * _UNITS[found[2].upper()]) if found else 0
    except InvalidOperation:
        size = 0
    if not found:
        raise SpectralError(f"--max-shard-size {text!r}: give a size like 500MB, 2GB or 1GiB")
    if not 1 <= size <= 2**62:
        raise SpectralError(f"--max-shard-size {text!r}: give a size of at least 1 byte, like 500MB")
    return size


def parse_optimizer(text: str) -> str:
    """``--optimizer``: ``convert`` or ``drop``."""
    from .errors import SpectralError

    if text not in ("convert", "drop"):
        raise SpectralError(f"--optimizer {text!r}: use convert (map the optimizer state to the new weights) or drop")
    return text


def parse_basis(text: str) -> str:
    """``--basis``: one of the bases' names."""
    from .errors import SpectralError
    from .transform.kernels import BASES

    if text not in BASES:
        raise SpectralError(f"--basis {text!r}: use one of {', '.join(BASES)}")
    return text


# ---- the commands ----------------------------------------------------------------------------------------------


def _transform(ctx: typer.Context, command: str, input: Path, as_json: bool, quiet: bool, **options: Any) -> None:
    """Run convert or bake with a progress bar, then print its report."""
    import gc
    from dataclasses import replace

    from .files.checkpoint import Io
    from .files.convert import Options, bake, convert

    # the imports' objects (torch's: hundreds of thousands) live as long as this process: frozen, the collector
    # stops walking them at each full collection (a measurable part of a convert's CPU time: docs/measurements.md)
    gc.freeze()
    io = ctx.obj if isinstance(ctx.obj, Io) else Io()
    with console.progress(not (quiet or as_json), "converting" if command == "convert" else "baking") as progress:
        chosen: Options = replace(Options(**options), progress=progress)
        report = (convert if command == "convert" else bake)(input, chosen, io)
    try:
        _print_report(command, report, as_json, chosen.dry_run, quiet)
    except typer.Exit:  # the reader of stdout went away: console.emit chose the exit code
        raise
    except Exception as e:
        # the output is written and verified: a report that cannot be printed does not make that an error
        if not report.written or os.environ.get("SPECTRAL_DEBUG"):
            raise
        from .errors import first_line
        from .render import printable

        console.stderr().print(
            f"[yellow]warning:[/] could not print the report ({type(e).__name__}: "
            f"{escape(printable(first_line(e)))}); {escape(printable(report.target))} is written and verified",
            highlight=False,
        )


def _warn(warnings: list[str]) -> None:
    from .render import printable

    err = console.stderr()
    for warning in warnings:
        err.print(f"[yellow]warning:[/] {escape(printable(warning))}", highlight=False)


def _print_report(command: str, report: FileReport, as_json: bool, dry_run: bool, quiet: bool = False) -> None:
    """Warnings on stderr; on stdout the JSON document, or the table and the summary line (only the summary line
    when ``quiet``)."""
    from . import render

    _warn(report.warnings)
    if as_json:
        console.emit(json.dumps(render.file_report_json(command, report, dry_run), indent=2), written=report.written)
        return
    if report.message:
        console.emit(render.printable(report.message), written=report.written)
        return
    lines = [] if quiet else [*render.file_report_lines(command, report, console.width(), console.glyphs()), ""]
    lines.append(render.file_report_summary(command, report))
    console.emit("\n".join(lines), written=report.written)


InputArg = Annotated[
    Path,
    typer.Argument(
        metavar="IN",
        help="The checkpoint: a torch.save file (.pt/.pth/.bin/.ckpt, a zip archive or a legacy pickle stream), a "
        ".safetensors file, a directory of safetensors shards, a model directory (save_pretrained: weight files "
        "and config.json, diffusers pipelines too) or a distributed checkpoint (torch.distributed.checkpoint).",
        show_default=False,
    ),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        metavar="OUT",
        help="Output file or directory (default: next to the input).",
        show_default=False,
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document instead of a table.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "-q",
        "--quiet",
        help="Print only the summary line: no table, no progress bar (warnings and errors still go to stderr; --json "
        "stays complete).",
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size",
        metavar="SIZE",
        help="Write safetensors shards of at most this size (e.g. 2GB) and an index.",
    ),
]
OptimizerOpt = Annotated[
    str,
    typer.Option(
        "--optimizer",
        metavar="[convert|drop]",
        help="What becomes of optimizer state in the checkpoint (torch containers, Lightning, DCP): convert maps "
        "it to the new weights (momentum and Adam's first moment exactly, Adam's second moment approximated and "
        "re-aged to 10 steps) so a run resumes without a dip; drop starts every parameter's state afresh "
        "(learning rates kept; DCP: the optimizer entries are left out).",
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow loading a pickled nn.Module. This RUNS CODE from the file."),
]


@app.command()
def convert(
    ctx: typer.Context,
    input: InputArg,
    output: OutputOpt = None,
    basis: Annotated[str, typer.Option("--basis", metavar="[rfft|rdft]", help="Spectral basis.")] = "rfft",
    include: Annotated[
        list[str] | None,
        typer.Option("--include", metavar="GLOB", help="Only layers whose name matches this glob (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="GLOB", help="Skip layers whose name matches this glob (repeatable)."),
    ] = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    max_shard_size: ShardOpt = None,
    trust_pickle: TrustOpt = False,
    optimizer: OptimizerOpt = "convert",
) -> None:
    """Turn a checkpoint's conv kernels into spectral 'original' tensors, as torch.nn.utils.parametrize stores them."""

    def body() -> None:
        _transform(ctx, "convert", input, as_json, quiet, output=output, basis=parse_basis(basis), include=include,
                   exclude=exclude, dry_run=dry_run, force=force, trust_pickle=trust_pickle,
                   max_shard_size=parse_size(max_shard_size), optimizer=parse_optimizer(optimizer))  # fmt: skip

    console.run(as_json, body, input)


@app.command()
def bake(
    ctx: typer.Context,
    input: InputArg,
    output: OutputOpt = None,
    kernel_size: Annotated[
        str | None,
        typer.Option(
            "--kernel-size", metavar="KHxKW", help="Kernel size for spectral tensors without a record, e.g. 3x5."
        ),
    ] = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    max_shard_size: ShardOpt = None,
    trust_pickle: TrustOpt = False,
    optimizer: OptimizerOpt = "convert",
) -> None:
    """Turn spectral tensors back into plain spatial weights, in their original dtype, for deployment."""

    def body() -> None:
        from .errors import AmbiguousKernelSizeError

        try:
            _transform(ctx, "bake", input, as_json, quiet, output=output, kernel_size=parse_kernel_size(kernel_size),
                       dry_run=dry_run, force=force, trust_pickle=trust_pickle,
                       max_shard_size=parse_size(max_shard_size), optimizer=parse_optimizer(optimizer))  # fmt: skip
        except AmbiguousKernelSizeError as e:
            if "--kernel-size" in str(e):
                raise
            raise AmbiguousKernelSizeError(f"{e} with --kernel-size KHxKW, e.g. --kernel-size 3x5") from None

    console.run(as_json, body, input)


@app.command()
def inspect(
    input: InputArg,
    as_json: JsonOpt = False,
    all_layers: Annotated[bool, typer.Option("--all", help="Also list convertible spatial conv kernels.")] = False,
    energy: Annotated[
        bool | None,
        typer.Option(
            "--energy/--no-energy",
            help="Frequency profile of each kernel (reads the tensors). Default: on for torch files, off for "
            "safetensors, which are listed from their header alone.",
            show_default=False,
        ),
    ] = None,
    trust_pickle: TrustOpt = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE.png",
            help="Also draw each layer's energy per frequency band into this PNG (an existing file is replaced; "
            "needs matplotlib: pip install matplotlib).",
            show_default=False,
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """List the parametrized layers: spectral ones with basis and kernel size, and other parametrizations."""

    def body() -> None:
        from . import render
        from .files.listing import inspect_file

        wants_energy = True if plot is not None else energy
        report = inspect_file(input, include_spatial=all_layers, trust_pickle=trust_pickle, energy=wants_energy)
        plotted = None
        if plot is not None:
            from .plot import plot_energy

            plotted = plot_energy(report, plot)
        if as_json:
            console.emit(json.dumps(render.inspect_json(report), indent=2), written=plotted is not None)
            return
        lines = [] if quiet else [*render.inspect_lines(report, console.width(), console.glyphs()), ""]
        line = render.inspect_summary(report)
        if not all_layers and not report.layers:
            line += "; pass --all to list the convertible conv kernels too"
        if plotted is not None:
            line += f"; plotted {plotted} layers to {render.printable(plot)}"
        console.emit("\n".join([*lines, line]), written=plotted is not None)

    console.run(as_json, body, input)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="spectral")


if __name__ == "__main__":  # pragma: no cover
    main()
