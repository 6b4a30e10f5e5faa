"""The ``spectral`` command line: Typer commands and Rich output only.

torch is imported inside the commands, so ``spectral --help`` and ``--version`` start instantly. Results go
to stdout, warnings to stderr. A user's mistake ends with one line on stderr and the exit code of its
:class:`~spectral_cli.errors.SpectralError`; set ``SPECTRAL_DEBUG=1`` to see tracebacks (each command body runs
through :func:`spectral_cli.console.run`).

Exit codes: 0 done (also: nothing left to convert), 1 internal error, a failed write (disk full, no
permission) or out of memory, 2 usage error, 3 unreadable or damaged input, 4 kernel size ambiguous (pass
``--kernel-size``), 5 refused (output exists, output is the input, untrusted pickle, TorchScript), 6 nothing to
do (no conv kernels / no spectral tensors).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from . import __version__, console

app = typer.Typer(
    name="spectral",
    help="Convert conv checkpoints to the spectral parametrization (Ballé, PCS 2018), bake them back, inspect them.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class BasisChoice(str, Enum):
    rfft = "rfft"
    rdft = "rdft"


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


def _parse_kernel_size(text: str | None) -> tuple[int, ...] | None:
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


def _transform(
    command: str,
    operation: Callable[..., Any],
    source: Path,
    output: Path | None,
    options: dict[str, Any],
    dry_run: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
    max_shard_size: str | None,
    trust_pickle: bool,
) -> None:
    """Run convert or bake with a progress bar, then print its report."""
    from .operations import parse_size

    shard = None if max_shard_size is None else parse_size(max_shard_size)
    with console.progress(not (quiet or as_json), "converting" if command == "convert" else "baking") as progress:
        report = operation(source, output, dry_run=dry_run, force=force, trust_pickle=trust_pickle,
                           max_shard_size=shard, progress=progress, **options)  # fmt: skip
    _print_report(command, report, as_json, dry_run)


def _print_report(command: str, report: Any, as_json: bool, dry_run: bool) -> None:
    from . import render

    err = console.stderr()
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(console.one_line(warning))}", highlight=False)
    if as_json:
        typer.echo(json.dumps(render.file_report_json(command, report, dry_run), indent=2))
        return
    out = console.stdout()
    if report.message:
        out.print(report.message, highlight=False, markup=False, soft_wrap=True)
        return
    out.print(render.file_report_table(command, report))
    out.print(render.file_report_summary(command, report), highlight=False, markup=False, soft_wrap=True)


InputArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: torch.save file (.pt/.pth/.bin/.ckpt), .safetensors, or a directory of safetensors shards."
    ),
]
OutputOpt = Annotated[
    Path | None, typer.Option("-o", "--output", help="Output file (default: next to the input).", show_default=False)
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document instead of a table.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would change; write nothing.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")]
ShardOpt = Annotated[
    str | None,
    typer.Option("--max-shard-size", help="Write safetensors shards of at most this size (e.g. 2GB) and an index."),
]
TrustOpt = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow loading a pickled nn.Module. This RUNS CODE from the file."),
]


@app.command()
def convert(
    input: InputArg,
    output: OutputOpt = None,
    basis: Annotated[BasisChoice, typer.Option("--basis", help="Spectral basis.")] = BasisChoice.rfft,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Only layers whose name matches this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Skip layers whose name matches this glob (repeatable).")
    ] = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    max_shard_size: ShardOpt = None,
    trust_pickle: TrustOpt = False,
) -> None:
    """Turn a checkpoint's conv kernels into spectral 'original' tensors, as torch.nn.utils.parametrize stores them."""

    def body() -> None:
        from .operations import convert_file

        options = {"basis": basis.value, "include": include, "exclude": exclude}
        _transform("convert", convert_file, input, output, options, dry_run, force, as_json, quiet, max_shard_size,
                   trust_pickle)  # fmt: skip

    console.run(as_json, body, input)


@app.command()
def bake(
    input: InputArg,
    output: OutputOpt = None,
    kernel_size: Annotated[
        str | None,
        typer.Option("--kernel-size", help="Kernel size for spectral tensors without a record, e.g. 3x5."),
    ] = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    max_shard_size: ShardOpt = None,
    trust_pickle: TrustOpt = False,
) -> None:
    """Turn spectral tensors back into plain spatial weights, in their original dtype, for deployment."""

    def body() -> None:
        from .errors import AmbiguousKernelSizeError
        from .operations import bake_file

        options = {"kernel_size": _parse_kernel_size(kernel_size)}
        try:
            _transform("bake", bake_file, input, output, options, dry_run, force, as_json, quiet, max_shard_size,
                       trust_pickle)  # fmt: skip
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
) -> None:
    """List the parametrized layers: spectral ones with basis and kernel size, and other parametrizations."""

    def body() -> None:
        from . import render
        from .inspection import inspect_file

        report = inspect_file(input, include_spatial=all_layers, trust_pickle=trust_pickle, energy=energy)
        if as_json:
            typer.echo(json.dumps(render.inspect_json(report), indent=2))
            return
        out = console.stdout()
        out.print(render.inspect_table(report))
        line = render.inspect_summary(report)
        if not all_layers and not report.layers:
            line += "; pass --all to list the convertible conv kernels too"
        out.print(line, highlight=False, markup=False, soft_wrap=True)

    console.run(as_json, body, input)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="spectral")


if __name__ == "__main__":  # pragma: no cover
    main()
