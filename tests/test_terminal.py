"""The command line in every terminal, pipe, locale and size: tables laid out for the width (golden files), any
``COLUMNS``, a reader that goes away, ASCII and latin-1 stdout, ``-q``, ``--help``, and tables of 100,000 layers.

Golden files are in ``tests/golden/``; ``SPECTRAL_UPDATE_GOLDEN=1 python -m pytest tests/test_terminal.py``
rewrites them (read the diff before committing it).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from models import REPO, child_env, parse_json, read, spectral
from rich.cells import cell_len
from safetensors.torch import load_file, save_file

from spectral_cli import cli, render
from spectral_cli.files.listing import InspectReport
from spectral_cli.files.report import FileReport
from spectral_cli.statedict.plan import LayerInfo, Skipped
from spectral_cli.statedict.surgery import LayerChange

GOLDEN = Path(__file__).parent / "golden"
SUMMARY = re.compile(r"^(converted|baked) ([\d,]+) layers, skipped ([\d,]+); max error \S+; .*(wrote|would write) .+$")
INSPECT_SUMMARY = re.compile(r"^(\d+) layers listed \(\d+ spectral\); [\d,]+ parameters, [\d,]+ bytes of tensors")
#: a max error differs in its last bits from machine to machine: goldens hold this instead (the same width)
ERROR = re.compile(r"\d\.\de[-+]\d\d")

#: layers with long names (and a short one, a 1x1 kernel that is skipped, a bias that is not a layer)
LONG_NAMES = {
    "encoder.stages.0.blocks.0.depthwise_separable_convolution.conv": (16, 3, 5, 5),
    "encoder.stages.0.blocks.1.depthwise_separable_convolution.conv": (16, 16, 3, 3),
    "encoder.stages.1.downsample.strided_convolution": (32, 16, 3, 3),
    "decoder.upsample.transposed_convolution_with_a_long_descriptive_name": (32, 16, 4, 4),
    "decoder.head.pointwise_projection": (3, 32, 1, 1),
    "g.0": (8, 8, 3, 3),
}


def _state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"{name}.weight": torch.randn(shape, generator=g) for name, shape in shapes.items()}
    sd["encoder.stages.1.downsample.strided_convolution.bias"] = torch.zeros(32)
    return sd


@pytest.fixture
def long_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``long.pt`` and its conversion ``long.spectral.pt`` in the current directory (so that paths print short)."""
    monkeypatch.chdir(tmp_path)
    torch.save(_state_dict(LONG_NAMES), "long.pt")
    result = spectral("convert", "long.pt")
    assert result.exit_code == 0, result.stderr
    return tmp_path


def _golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("SPECTRAL_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs: SPECTRAL_UPDATE_GOLDEN=1 rewrites it"


CASES = {
    "convert": ["convert", "long.pt", "-o", "out.pt", "--force"],
    "bake": ["bake", "long.spectral.pt", "-o", "out.pt", "--force"],
    "inspect": ["inspect", "long.spectral.pt"],
    "inspect-no-energy": ["inspect", "long.spectral.pt", "--no-energy"],
}


@pytest.mark.parametrize("width", [30, 60, 80, 120, 200])
@pytest.mark.parametrize("case", list(CASES))
def test_tables_at_every_width(long_names: Path, case: str, width: int) -> None:
    """Golden output, and what makes it readable: no line wider than the terminal (but the summary, never cut),
    every shape whole on one line, the long names folded (table) or whole (list below the table's width)."""
    result = spectral(*CASES[case], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.stderr
    _golden(f"{case}-{width}", ERROR.sub("#.#e-##", result.stdout))
    lines = result.stdout.rstrip("\n").split("\n")
    summary = lines.pop()
    assert (SUMMARY if case in ("convert", "bake") else INSPECT_SUMMARY).match(summary), summary
    doc = parse_json(spectral(*CASES[case], "--json").stdout)
    for layer in doc["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        if "shape_before" in layer:
            shape = f"{'x'.join(map(str, layer['shape_before']))} → {shape}"
        assert any(f" {shape}" in line for line in lines), (shape, result.stdout)
    names = [layer["name"] for layer in doc["layers"]]
    if any("─" in line for line in lines):  # a table: it fits; a long name is folded onto the lines below it
        assert width >= 60
        assert max(cell_len(line) for line in lines[1:]) <= width  # the title is a path: never cut
        firsts = [line.split()[0] for line in lines[2:] if line.strip()]
        runs = {"".join(firsts[i:j]) for i in range(len(firsts)) for j in range(i + 1, min(i + 6, len(firsts) + 1))}
        assert set(names) <= runs, result.stdout
    else:  # narrower than the narrowest table: one line per layer, its name whole
        assert width < 60
        for name in names:
            assert any(line.startswith(f"{name}: ") for line in lines), result.stdout


def test_tokens_are_never_split_at_80_columns(samples: Path) -> None:
    """At a pipe's 80 columns, shapes and kinds stay whole, and each layer is one line."""
    for args in (["convert", samples / "balle.pt", "-o", samples / "w.pt"], ["inspect", samples / "balle.spectral.pt"]):
        result = spectral(*args, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.stderr
        rows = [line for line in result.stdout.splitlines() if line.startswith(" g_")]
        assert len(rows) == 8, result.stdout  # one line per layer: nothing folded onto a second
        assert all(cell_len(line) <= 80 for line in result.stdout.splitlines()[1:-1])  # but the title, a path
        if args[0] == "convert":
            row = re.compile(r" g_\S+ +rfft +5x5 +(\d+)x(\d+)x5x5 → 2x\1x\2x5x3 +float32 ")
            assert all(row.match(line) for line in rows), rows


def test_nothing_to_list_prints_no_table(samples: Path) -> None:
    result = spectral("inspect", samples / "balle.pt")
    assert result.exit_code == 0, result.stderr
    title, blank, summary = result.stdout.splitlines()
    assert (title, blank) == (f"{samples / 'balle.pt'} (torch)", "")
    assert INSPECT_SUMMARY.match(summary) and summary.endswith("; pass --all to list the convertible conv kernels too")


# ---- degenerate widths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("columns", ["0", "-5", "abc", "", "1", "20", "100000", "9" * 5000])
def test_any_columns_value_gives_output_and_errors(samples: Path, columns: str) -> None:
    result = spectral("convert", samples / "balle.pt", "-o", samples / "w.pt", "--force", env={"COLUMNS": columns})
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.rstrip("\n").split("\n")
    assert SUMMARY.match(lines[-1]) and lines[-1].endswith(f"wrote {samples / 'w.pt'}"), result.stdout
    for name in ("g_a.0", "g_a.2", "g_s.6"):
        assert any(line.lstrip().startswith(name) and "16x" in line for line in lines), result.stdout
    widest = max(cell_len(line) for line in lines[1:-1])  # the title is a path: never cut
    if columns in ("0", "-5", "abc", ""):  # ignored: a pipe's 80
        assert 60 < widest <= 80
    elif columns in ("100000", "9" * 5000):  # the table's own width, not padded to the terminal's
        assert widest < 120

    missing = spectral("convert", samples / "missing.pt", env={"COLUMNS": columns})
    assert missing.exit_code == 3
    assert missing.stderr == f"error: {samples / 'missing.pt'}: no such file; check the path\n"
    bad = spectral("convert", samples / "balle.pt", "--basis", "fft", env={"COLUMNS": columns})
    assert (bad.exit_code, bad.stderr) == (2, "error: --basis 'fft': use one of rfft, rdft\n")
    usage = spectral("convert", env={"COLUMNS": columns})
    assert usage.exit_code == 2 and "Missing argument 'IN'" in usage.stderr, usage.stderr


# ---- pipes ---------------------------------------------------------------------------------------------------

MANY = {f"backbone.stage_{i // 10}.block_{i}.depthwise_convolution_with_a_long_name": (4, 4, 3, 3) for i in range(90)}


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``many.pt`` of 90 layers with long names and its conversion: tables of several pages of a pipe."""
    work = tmp_path_factory.mktemp("pipes")
    torch.save(_state_dict(MANY), work / "many.pt")
    result = spectral("convert", work / "many.pt")
    assert result.exit_code == 0, result.stderr
    return work


def _through_a_closing_pipe(args: list[str], cwd: Path) -> tuple[int, bytes, bytes]:
    """Run ``spectral args`` with stdout into a pipe (of one page) whose reader closes after the first line:
    ``| head -1``. Returns the exit code, the line and stderr."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    with subprocess.Popen([sys.executable, "-m", "spectral_cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                          cwd=cwd, env=child_env(COLUMNS="200")) as proc:  # fmt: skip
        os.close(write_end)
        line = b""
        while not line.endswith(b"\n"):
            byte = os.read(read_end, 1)
            if not byte:
                break
            line += byte
        os.close(read_end)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        return proc.wait(timeout=120), line, stderr


PIPED = {
    # command: (arguments, exit code when the reader goes away, output written)
    "convert": (["convert", "many.pt", "-o", "out.pt"], 0, "out.pt"),
    "convert --json": (["convert", "many.pt", "-o", "out.pt", "--json"], 0, "out.pt"),
    "convert --dry-run": (["convert", "many.pt", "-o", "out.pt", "--dry-run"], 141, None),
    "convert --dry-run --json": (["convert", "many.pt", "-o", "out.pt", "--dry-run", "--json"], 141, None),
    "bake": (["bake", "many.spectral.pt", "-o", "out.pt"], 0, "out.pt"),
    "bake --json": (["bake", "many.spectral.pt", "-o", "out.pt", "--json"], 0, "out.pt"),
    "bake --dry-run": (["bake", "many.spectral.pt", "-o", "out.pt", "--dry-run"], 141, None),
    "inspect": (["inspect", "many.spectral.pt"], 141, None),
    "inspect --all": (["inspect", "many.pt", "--all"], 141, None),
    "inspect --json": (["inspect", "many.spectral.pt", "--json"], 141, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PIPED))
def test_a_reader_that_goes_away(many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """``| head -1``: quiet, no traceback; exit 0 when the output file is written (and it is the same file as
    without the pipe), 141 for a listing or a dry run."""
    args, code, output = PIPED[case]
    for name in ("many.pt", "many.spectral.pt"):
        (tmp_path / name).write_bytes((many / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    whole = spectral(*args, env={"COLUMNS": "200"})
    assert whole.exit_code == 0, whole.stderr
    assert len(whole.stdout.encode()) > 4096 + 200  # more than the pipe holds: the reader's going is felt
    if output:
        reference = read(tmp_path / output)
        (tmp_path / output).unlink()

    exit_code, line, stderr = _through_a_closing_pipe(args, tmp_path)
    assert (exit_code, stderr) == (code, b"")
    assert line.decode() == whole.stdout.split("\n")[0] + "\n"
    if output:
        written = read(tmp_path / output)
        assert written.keys() == reference.keys()
        assert all(torch.equal(written[k], reference[k]) for k in reference)
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["many.pt", "many.spectral.pt"]


@pytest.mark.slow
def test_stdout_that_fails_after_the_output_is_written(many: Path, tmp_path: Path) -> None:
    """A report that cannot be printed (a full disk) after the output was written: a warning, exit 0; a listing
    that cannot be printed: an error naming stdout, exit 1. Never an internal error."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "spectral_cli", "convert", many / "many.pt", "-o",
                               tmp_path / "out.pt"], stdout=full, stderr=subprocess.PIPE, text=True,
                              env=child_env(), check=False, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr.startswith("warning: could not print the report (") and "internal" not in done.stderr
        assert done.stderr.rstrip().endswith(f"{tmp_path / 'out.pt'} is written and verified")
        assert len(read(tmp_path / "out.pt")) == len(MANY) + 1
        listed = subprocess.run([sys.executable, "-m", "spectral_cli", "inspect", many / "many.spectral.pt"],
                                stdout=full, stderr=subprocess.PIPE, text=True, env=child_env(), check=False,
                                timeout=120)  # fmt: skip
        assert (listed.returncode, listed.stderr) == (1, "error: stdout: No space left on device\n")


# ---- locales ---------------------------------------------------------------------------------------------------

NAMES = {"böse.层.conv": (4, 4, 3, 3), "evil\x1b[31mred.conv": (4, 4, 3, 3)}
LOCALES: dict[str, tuple[dict[str, str | None], str, list[str]]] = {
    # name: (environment, stdout's encoding, how the names print)
    "C": ({"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": None}, "ascii",
          ["b\\xf6se.\\u5c42.conv", "evil\\x1b[31mred.conv"]),
    "latin-1": ({"PYTHONIOENCODING": "latin-1"}, "latin-1", ["böse.\\u5c42.conv", "evil\\x1b[31mred.conv"]),
    "utf-8": ({"PYTHONIOENCODING": "utf-8"}, "utf-8", ["böse.层.conv", "evil\\x1b[31mred.conv"]),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("locale", list(LOCALES))
def test_locales(tmp_path: Path, locale: str) -> None:
    """Names that are not ASCII or hold control characters, the sparkline and the arrow, in what stdout can say:
    escapes and ASCII where it cannot, never an error (for convert: after the output was written)."""
    env, encoding, shown = LOCALES[locale]
    save_file({f"{k}.weight": torch.randn(v) for k, v in NAMES.items()}, str(tmp_path / "names.safetensors"))

    def run(*args: str | Path) -> str:
        done = subprocess.run([sys.executable, "-m", "spectral_cli", *map(str, args)], capture_output=True,
                              cwd=tmp_path, env=child_env(**env), check=False, timeout=120)  # fmt: skip
        assert (done.returncode, done.stderr) == (0, b""), done.stderr.decode(errors="replace")
        return done.stdout.decode(encoding)  # strict: fails on a byte the locale cannot read

    listed = run("inspect", "names.safetensors", "--all", "--energy")
    converted = run("convert", "names.safetensors")
    for text in (listed, converted):
        assert all(name in text for name in shown), text
        assert "\x1b" not in text
        rows = [line for line in text.splitlines() if " 4x4x3x3 " in line]
        columns = [cell_len(row[: row.index(" 4x4x3x3 ")]) for row in rows]
        assert len(rows) == 2 and columns[0] == columns[1], text  # aligned as printed, escapes included
    unicode = encoding == "utf-8"
    sparks = [line.split()[-1] for line in listed.splitlines() if " 4x4x3x3 " in line]
    assert len(sparks) == 2 and all(len(spark) == 3 for spark in sparks), listed
    assert set("".join(sparks)) <= set(render.UNICODE.spark if unicode else render.ASCII.spark), listed
    assert ("4x4x3x3 → 2x4x4x3x2" in converted) == unicode and ("4x4x3x3 -> 2x4x4x3x2" in converted) != unicode
    written = load_file(str(tmp_path / "names.spectral.safetensors"))
    assert sorted(written) == sorted(f"{k}.parametrizations.weight.original" for k in NAMES)


# ---- -q --------------------------------------------------------------------------------------------------------


def test_quiet_prints_only_the_summary(samples: Path) -> None:
    out = samples / "q.ckpt"
    result = spectral("convert", samples / "lightning.ckpt", "-o", out, "-q")
    assert result.exit_code == 0
    assert SUMMARY.match(result.stdout) and result.stdout.count("\n") == 1, result.stdout
    assert result.stderr == ""  # the optimizer state converted: nothing to warn about
    dropped = spectral("convert", samples / "lightning.ckpt", "-o", out, "-q", "--force", "--optimizer", "drop")
    assert SUMMARY.match(dropped.stdout) and dropped.stdout.count("\n") == 1, dropped.stdout
    assert dropped.stderr.startswith("warning: optimizer state optimizer_states/0: every parameter's state dropped")
    full = parse_json(spectral("convert", samples / "lightning.ckpt", "-o", out, "--force", "--json").stdout)
    quiet = parse_json(spectral("convert", samples / "lightning.ckpt", "-o", out, "--force", "--json", "-q").stdout)
    assert quiet == full and len(quiet["layers"]) == 8  # --json stays complete

    result = spectral("bake", samples / "balle.spectral.pt", "-o", samples / "b.pt", "--quiet")
    assert (result.exit_code, result.stderr) == (0, "")
    assert SUMMARY.match(result.stdout) and result.stdout.count("\n") == 1, result.stdout
    result = spectral("inspect", samples / "balle.spectral.pt", "-q")
    assert (result.exit_code, result.stderr) == (0, "")
    assert INSPECT_SUMMARY.match(result.stdout) and result.stdout.count("\n") == 1, result.stdout
    result = spectral("convert", samples / "balle.spectral.pt", "-o", samples / "z.pt", "-q")  # nothing to do
    assert result.exit_code == 0
    assert result.stdout == "nothing to convert: 8 layers are already spectral; no file written\n"
    result = spectral("convert", samples / "missing.pt", "-q")
    assert (result.exit_code, result.stdout) == (3, "")
    assert result.stderr.startswith("error: ")


# ---- --help ----------------------------------------------------------------------------------------------------

#: each input format the README's "Formats" section names -> how every command's help names it
FORMATS = {
    "`torch.save` zip archives": "torch.save file",
    "legacy pickle-stream torch files": "legacy pickle stream",
    "safetensors files": ".safetensors file",
    "directories of Hugging Face-style shards": "directory of safetensors shards",
    "model directories": "model directory",
    "distributed checkpoints": "distributed checkpoint",
}


def _readme_formats() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Formats") :]
    inputs = re.search(r"\*\*Inputs\*\*, [^:]*: (.+?)\. ", section, re.S)
    assert inputs, "README: Formats lists no Inputs"
    listed = re.sub(r"\s*\([^)]*\)", "", " ".join(inputs[1].split()))
    return [item.strip().removeprefix("and ") for item in listed.split(",")]


@pytest.mark.parametrize("command", ["convert", "bake", "inspect"])
def test_help_is_current(command: str) -> None:
    """Every format the README lists is named by the help; flags show no value; -q is described as it is."""
    assert sorted(_readme_formats()) == sorted(FORMATS)
    result = spectral(command, "--help", env={"COLUMNS": "0"})
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for name, said in FORMATS.items():
        assert said in text, (name, said)
    assert "<bool>" not in text and "<str>" not in text and "list[str]" not in text and "{input}" not in text
    assert f"Usage: spectral {command} [OPTIONS] {{IN}}" in text  # Typer's braces: required
    for flag in ("--json", "--trust-pickle", "-q, --quiet"):
        assert re.search(rf"(^|\n)  {flag}  ", result.stdout), flag  # a flag: nothing between it and its help
    assert "-q, --quiet Print only the summary line" in text
    if command == "inspect":
        assert "--plot FILE.png Also draw" in text and "needs matplotlib: pip install matplotlib)" in text


# ---- long tables -----------------------------------------------------------------------------------------------

N = 100_000
BIG = {5_000, 50_000, N - 1}  # layers 64 times larger than the others


def _change(i: int) -> LayerChange:
    channels = 64 if i in BIG else 1
    return LayerChange(action="convert", name=f"layer{i}", source_key=f"layer{i}.weight",
                       target_key=f"layer{i}.parametrizations.weight.original", basis="rfft", kernel_size=(3, 3),
                       shape_before=(channels, 1, 3, 3), shape_after=(2, channels, 1, 3, 2), dtype="float32",
                       out_dtype="float32", max_error=1e-7)  # fmt: skip


@pytest.fixture(scope="module")
def huge() -> FileReport:
    report = FileReport(Path("huge.safetensors"), Path("huge.spectral.safetensors"), "safetensors", "safetensors")
    report.changed = [("", _change(i)) for i in range(N)]
    report.skipped = [("", Skipped(f"tiny{i}.weight", "1x1 kernel" if i % 3 else "excluded")) for i in range(N)]
    report.written, report.verified = True, N
    return report


def _printed(capsys: pytest.CaptureFixture[str], *args: Any) -> str:
    cli._print_report(*args)
    out = capsys.readouterr()
    assert out.err == ""
    return out.out


@pytest.mark.slow
def test_a_table_of_100000_layers_is_summarized(
    huge: FileReport, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first rows, the largest of the rest, and how many more; the skipped counted by reason. --json: all."""
    monkeypatch.setenv("COLUMNS", "120")
    lines = _printed(capsys, "convert", huge, False, False).splitlines()
    assert len(lines) < 80
    shown = [line.split()[0] for line in lines if re.match(r" layer\d+ ", line)]
    largest = sorted(BIG | set(range(render.FIRST, render.FIRST + render.LARGEST - len(BIG))))
    assert shown == [f"layer{i}" for i in [*range(render.FIRST), *largest]]
    assert " … 99,960 more; --json lists all" in lines
    skipped = [line for line in lines if "skipped: " in line]
    assert len(skipped) == render.FIRST_SKIPPED
    assert " … 99,990 more skipped (1x1 kernel: 66,660, excluded: 33,330); --json lists all" in lines
    assert lines[-1].startswith("converted 100,000 layers, skipped 100,000; max error 1.0e-07; verified 100,000")

    doc = json.loads(_printed(capsys, "convert", huge, True, False))
    assert len(doc["layers"]) == N and len(doc["skipped"]) == N
    assert [layer["name"] for layer in doc["layers"]] == [f"layer{i}" for i in range(N)]


@pytest.mark.slow
def test_an_inspect_table_of_100000_layers_is_summarized() -> None:
    layers = [("", LayerInfo(f"layer{i}", f"layer{i}.parametrizations.weight.original", "spectral", "rfft", (3, 3),
                             (2, 64 if i in BIG else 1, 1, 3, 2), "float32")) for i in range(N)]  # fmt: skip
    report = InspectReport(Path("huge.safetensors"), "safetensors", layers, {}, N * 12, N * 48)
    lines = render.inspect_lines(report, 120)
    assert len(lines) < 60
    assert sum(1 for line in lines if re.match(r" layer\d+ ", line)) == render.FIRST + render.LARGEST
    assert all(any(line.startswith(f" layer{i} ") for line in lines) for i in BIG)
    assert lines[-1] == " … 99,960 more; --json lists all"
    assert len(render.inspect_json(report)["layers"]) == N
