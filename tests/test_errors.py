"""Every refusal of the ``spectral`` command line: its exit code, one line on stderr, and no harm done.

For each case: the documented exit code (``spectral_cli/cli.py``: 1 failed write, 2 usage, 3 unreadable input,
5 refused, 6 nothing to do), stderr is exactly one line (``error: ...``) without a traceback, stdout is empty, the
input is byte-identical afterwards, and the directory holds no output and no temporary ``.*.tmp`` file.

The hostile-input matrix runs every kind of ``tests/hostile_inputs.py`` with each command it applies to (a few
also in a real ``python -m spectral_cli`` process) and checks, besides: every file of the working directory is
byte-identical (sha256), nothing was added (no output, no staging directory), no code ran (the malicious pickles'
marker never appears). The tests after it refuse what a run meets on its way: outputs, usage, failed writes, out
of memory.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile_inputs import (
    KINDS,
    MARKER,
    Fault,
    Kind,
    conv_state,
    disk_full,
    io_error_after,
    replace_refused,
    signal_while_writing,
)
from models import (
    SUFFIX,
    assert_equal_tensors,
    child_env,
    copy_samples,
    corrupting_pwrite,
    failing_pwrite,
    faulty,
    listing,
    make_samples,
    one_line,
    parse_json,
    raising,
    read,
    sha256,
    snapshot,
    spectral,
    spectral_limited,
    temp_files,
)
from safetensors.torch import save_file
from torch import nn

import spectral_cli.transform.slabs as slabs
from spectral_cli import SpectralError, convert_state_dict, load_spectral

COMMANDS = ("convert", "bake", "inspect")


def assert_refused(directory: Path, source: Path | None, args: list[Any], code: int) -> str:
    """Run ``spectral *args`` and check the contract of a refusal; return the error line."""
    before = listing(directory)
    digest = sha256(source) if source is not None and source.is_file() else None
    result = spectral(*args)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("error:"), line
    assert result.stdout == ""
    assert listing(directory) == before and not temp_files(directory)
    if digest is not None:
        assert source is not None and sha256(source) == digest
    return line


# ---- the hostile-input matrix ------------------------------------------------------------------------------------


MATRIX = [(kind, command) for kind, spec in KINDS.items() for command in spec.codes]


def _args(kind: Kind, command: str, source: Path, work: Path) -> list[str]:
    return [command, str(source), *(a.replace("{out}", str(work)) for a in kind.args.get(command, []))]


def _built(tmp_path: Path, name: str) -> tuple[Kind, Path, Path, dict[str, str]]:
    """The kind ``name``, an empty working directory, the kind's input built in it, and the directory's snapshot."""
    kind = KINDS[name]
    work = tmp_path / "work"
    work.mkdir()
    source = kind.build(work)
    return kind, work, source, snapshot(work)


def _check(kind: Kind, code: int, returncode: int, stdout: str, stderr: str) -> None:
    assert returncode == code, (returncode, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    if code == 0:
        assert all(line.startswith("warning:") for line in stderr.splitlines()), stderr
        assert kind.prints in stdout
        return
    line = one_line(stderr)
    assert line.startswith("error:"), line
    assert "internal error" not in line
    assert kind.says in line, (kind.says, line)
    assert stdout == ""


@pytest.mark.parametrize(("name", "command"), MATRIX, ids=[f"{k}-{c}" for k, c in MATRIX])
def test_hostile_input(tmp_path: Path, name: str, command: str) -> None:
    kind, work, source, before = _built(tmp_path, name)
    io = kind.fault(work) if kind.fault is not None else None
    try:
        result = spectral(*_args(kind, command, source, work), io=io)
    finally:
        if (work / "ro").exists():
            (work / "ro").chmod(0o755)
    code = kind.codes[command]
    _check(kind, code, result.exit_code, result.stdout, result.stderr)
    assert not (tmp_path / MARKER).exists(), "the input ran code"
    after = snapshot(work)
    assert {k: v for k, v in after.items() if k in before} == before, "an input file changed"
    added = sorted(set(after) - set(before))
    if code == 0 and kind.after is not None:
        assert added == ["out.pt"]
        kind.after(work, result)
    else:
        assert added == [], added


SUBPROCESS = [(kind, command) for kind, spec in KINDS.items() for command in spec.subprocess]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "command"), SUBPROCESS, ids=[f"{k}-{c}" for k, c in SUBPROCESS])
def test_hostile_input_in_a_real_process(tmp_path: Path, name: str, command: str) -> None:
    """The same contract from ``python -m spectral_cli``: real stderr, real exit status, real warnings filters."""
    kind, work, source, before = _built(tmp_path, name)
    done = subprocess.run(
        [sys.executable, "-m", "spectral_cli", *_args(kind, command, source, work)],
        cwd=work,
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    _check(kind, kind.codes[command], done.returncode, done.stdout, done.stderr)
    assert not (tmp_path / MARKER).exists(), "the input ran code"
    assert snapshot(work) == before


def test_the_matrix_covers_every_kind_and_every_command() -> None:
    """The registry holds at least 100 kinds (it never shrinks unnoticed), each reaches at least one command, every
    command is reached, and some kinds run in a real process."""
    assert len(KINDS) >= 100 and all(kind.codes for kind in KINDS.values())
    assert {c for _, c in MATRIX} == set(COMMANDS)
    assert SUBPROCESS


def test_a_torch_with_known_weights_only_holes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip's torch>=2.10 can be bypassed (--no-deps, an older environment): loading is refused at run time too."""
    work = copy_samples(tmp_path, ["balle.pt"])
    before = snapshot(work)
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    result = spectral("convert", work / "balle.pt")
    assert result.exit_code == 5
    assert "torch>=2.10" in one_line(result.stderr)
    assert snapshot(work) == before
    monkeypatch.setattr(torch, "__version__", "2.10.0a0+git1234")  # a 2.10 nightly is fine
    assert spectral("inspect", work / "balle.pt").exit_code == 0


# ---- unreadable inputs: exit 3 -----------------------------------------------------------------------------------


def test_json_error_document(tmp_path: Path) -> None:
    path = KINDS["truncated-torch-zip-at-half"].build(tmp_path)
    result = spectral("convert", path, "--json")
    assert result.exit_code == 3
    doc = parse_json(result.stdout)
    assert doc["schema"] == 1 and doc["exit_code"] == 3 and path.name in doc["error"]
    one_line(result.stderr)


# ---- code in pickles: exit 5, a state dict with trust ------------------------------------------------------------


def test_pickled_module_with_trust_converts_to_a_state_dict(tmp_path: Path) -> None:
    path = KINDS["pickled-module-with-a-linear-head-without-trust"].build(tmp_path)
    module = torch.load(path, weights_only=False)
    digest = sha256(path)
    result = spectral("convert", path, "--trust-pickle", "--json")
    assert result.exit_code == 0, result.stderr
    assert [layer["name"] for layer in parse_json(result.stdout)["layers"]] == ["0", "2"]
    out = tmp_path / "module.spectral.pt"
    converted = read(out)  # weights_only: a plain state dict, no code
    assert isinstance(converted, dict) and all(isinstance(v, torch.Tensor) for v in converted.values())
    assert sha256(path) == digest
    result = spectral("bake", out)
    assert result.exit_code == 0, result.stderr
    baked = read(tmp_path / "module.baked.pt")
    for key, value in module.state_dict().items():
        assert torch.allclose(baked[key], value, rtol=1e-5, atol=1e-6), key


class _EvilPrint:
    """Unpickling this calls ``print``: any call of a builtin from a pickle is code execution."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


def test_malicious_print_pickle_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "print.pt"
    torch.save({"w": torch.zeros(2, 2, 3), "p": _EvilPrint()}, path)
    result = spectral("inspect", path)
    assert result.exit_code == 5 and "--trust-pickle" in result.stderr
    assert "pwned" not in result.stdout + result.stderr + capsys.readouterr().out


# ---- outputs: exit 5 ---------------------------------------------------------------------------------------------


def test_output_exists_without_force(samples: Path) -> None:
    existing = samples / "balle.spectral.pt"
    digest = sha256(existing)
    line = assert_refused(samples, samples / "balle.pt", ["convert", samples / "balle.pt"], 5)
    assert "--force" in line and sha256(existing) == digest
    (samples / "taken.pt").write_bytes(b"keep me")
    spectral_file = samples / "balle.spectral.pt"
    assert_refused(samples, spectral_file, ["bake", spectral_file, "-o", samples / "taken.pt"], 5)
    assert (samples / "taken.pt").read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("command", "sample"), [("convert", "balle.pt"), ("convert", "balle.safetensors"), ("bake", "balle.spectral.pt")]
)
def test_output_is_the_input(samples: Path, command: str, sample: str) -> None:
    source = samples / sample
    line = assert_refused(samples, source, [command, source, "-o", source, "--force"], 5)
    assert "input" in line
    other_spelling = samples / "." / sample
    assert_refused(samples, source, [command, source, "-o", other_spelling, "--force"], 5)
    (samples / "link.pt").symlink_to(source)
    assert_refused(samples, source, [command, source, "-o", samples / "link.pt", "--force"], 5)


def test_output_directory_missing_or_a_directory(samples: Path) -> None:
    source = samples / "balle.pt"
    assert_refused(samples, source, ["convert", source, "-o", samples / "no" / "such" / "dir.pt"], 5)
    (samples / "outdir").mkdir()
    assert_refused(samples, source, ["convert", source, "-o", samples / "outdir", "--force"], 5)


def test_container_to_safetensors_refused(samples: Path) -> None:
    source = samples / "lightning.ckpt"
    assert_refused(samples, source, ["convert", source, "-o", samples / "l.safetensors"], 5)


# ---- nothing to do: exit 6 ---------------------------------------------------------------------------------------


def test_nothing_to_convert(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Conv2d(4, 4, 1))
    path = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), path)
    line = assert_refused(tmp_path, path, ["convert", path], 6)
    assert "nothing to convert" in line
    assert "skipped: 1x1 kernel (1)" in line  # why the one conv was left
    excluded = tmp_path / "excluded.pt"
    torch.save({"a.weight": torch.randn(4, 4, 1, 1), "b.weight": torch.randn(4, 4, 3, 3)}, excluded)
    line = assert_refused(tmp_path, excluded, ["convert", excluded, "--exclude", "b"], 6)
    assert "skipped: " in line and "1x1 kernel (1)" in line and "excluded (1)" in line


@pytest.mark.parametrize("sample", ["balle.pt", "balle.safetensors", "lightning.ckpt", "conv1d.pt"])
def test_bake_without_spectral_tensors(samples: Path, sample: str) -> None:
    line = assert_refused(samples, samples / sample, ["bake", samples / sample], 6)
    assert "nothing to bake" in line


# ---- usage errors: exit 2 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "balle.pt", "--basis", "dct"],
        ["convert", "balle.pt", "--no-such-option"],
        ["convert"],
        ["frobnicate", "balle.pt"],
    ],
)
def test_usage_errors_exit_2(samples: Path, args: list[str]) -> None:
    before = listing(samples)
    result = spectral(*[str(samples / a) if a.endswith(".pt") else a for a in args])
    assert result.exit_code == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert listing(samples) == before


@pytest.mark.parametrize("size", ["abc", "0x3", "3x3x3x3", "3x"])
def test_bad_kernel_size_exits_2(samples: Path, size: str) -> None:
    source = samples / "balle.spectral.pt"
    line = assert_refused(samples, source, ["bake", source, "-o", samples / "o.pt", "--kernel-size", size], 2)
    assert "--kernel-size" in line


# ---- usage errors under --json -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["--basis", "dct"], ["--max-shard-size", "inf"], ["--max-shard-size", "1e400"], ["--max-shard-size", "-1"]],
)
def test_bad_values_are_usage_errors_and_json_says_so(samples: Path, args: list[str]) -> None:
    result = spectral("convert", samples / "balle.safetensors", *args, "--json")
    assert result.exit_code == 2
    doc = parse_json(result.stdout)
    assert doc["exit_code"] == 2 and args[0] in doc["error"]
    assert args[0] in one_line(result.stderr)
    result = spectral("bake", samples / "balle.spectral.pt", "--kernel-size", "0x3", "--json")
    assert result.exit_code == 2 and parse_json(result.stdout)["exit_code"] == 2


@pytest.mark.slow
def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: it is refused without being opened so."""
    os.mkfifo(tmp_path / "model.pt")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "spectral_cli", "convert", "model.pt"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 3 and "FIFO" in one_line(proc.stderr)
    assert time.monotonic() - start < 60


# ---- output names past NAME_MAX ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default-output", "given-output"])
def test_an_output_name_past_name_max_is_one_line_that_names_it_and_the_fix(tmp_path: Path, case: str) -> None:
    """A default output of 262 bytes ('a'*250 + '.pt'), or ``-o`` a 300-byte name: exit 1, one line naming the
    output and ``-o``, nothing written."""
    source = tmp_path / ("a" * 250 + ".pt")
    torch.save(conv_state(), source)
    before = snapshot(tmp_path)
    if case == "default-output":
        out, args = "a" * 250 + ".spectral.pt", []
    else:
        out = "b" * 297 + ".pt"
        args = ["-o", tmp_path / out]
    result = spectral("convert", source, *args)
    assert result.exit_code == 1, result.stderr
    line = one_line(result.stderr)
    assert out in line, line
    assert "-o" in line.replace(str(tmp_path), ""), line
    assert "internal error" not in line, line
    assert snapshot(tmp_path) == before


# ---- failures while writing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "fault", "code", "says"),
    [
        ("balle.pt", disk_full, 1, "No space left on device"),
        ("balle.pt", replace_refused, 1, "Permission denied"),
        ("balle.safetensors", io_error_after(2_000), 1, "Input/output error"),
        ("balle.safetensors", replace_refused, 1, "Permission denied"),
        ("balle.pt", signal_while_writing(signal.SIGINT), 130, "SIGINT"),
        ("balle.pt", signal_while_writing(signal.SIGTERM), 143, "SIGTERM"),
        ("balle.pt", signal_while_writing(signal.SIGHUP), 129, "SIGHUP"),
        ("balle.safetensors", signal_while_writing(signal.SIGTERM), 143, "SIGTERM"),
        ("balle.safetensors", lambda work: faulty(pwrite=lambda fd, data, offset: 0), 1, "accepted none"),
    ],
    ids=[
        "pt-disk-full",
        "pt-rename",
        "safetensors-io-error",
        "safetensors-rename",
        "pt-sigint",
        "pt-sigterm",
        "pt-sighup",
        "safetensors-sigterm",
        "safetensors-no-progress",
    ],
)
def test_failure_while_writing_leaves_nothing(
    tmp_path: Path, sample: str, fault: Fault, code: int, says: str, request: pytest.FixtureRequest
) -> None:
    """A refused write is exit 1 naming the output and the fix; a signal is 128 + its number, not an internal
    error (torch.save turns its writer's exceptions into a RuntimeError: the writer's own error is raised)."""
    # a run started with signals ignored (`pytest &` in a script) would have spectral keep them ignored, as it
    # rightly does: the signal sent below would then never stop it
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_IGN:
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            request.addfinalizer(functools.partial(signal.signal, signum, signal.signal(signum, default)))
    work = copy_samples(tmp_path, [sample])
    source = work / sample
    out = work / ("out" + source.suffix)
    result = spectral("convert", source, "-o", out, io=fault(work))
    assert result.exit_code == code, (result.stdout, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("error:") and says in line and "internal" not in line, line
    if code == 1:
        assert str(out) in line and "-o" in line, line  # the file, and the fix
    assert listing(work) == [sample] and not temp_files(work)


def test_failure_while_overwriting_keeps_the_old_output(tmp_path: Path) -> None:
    work = copy_samples(tmp_path, ["balle.pt"])
    (work / "out.pt").write_bytes(b"previous output")
    result = spectral("convert", work / "balle.pt", "-o", work / "out.pt", "--force", io=disk_full(work))
    assert result.exit_code == 1
    one_line(result.stderr)
    assert (work / "out.pt").read_bytes() == b"previous output"
    assert not temp_files(work)


@pytest.mark.parametrize("sample", ["balle.pt", "balle.safetensors"])
def test_output_that_reads_back_differently_is_removed(tmp_path: Path, sample: str) -> None:
    """The disk gives back other bytes than were written: every output is read back and compared value by value,
    so a flipped data byte is caught in a safetensors file as in a torch file."""
    work = copy_samples(tmp_path, [sample])
    source = work / sample
    result = spectral("convert", source, "-o", work / ("out" + source.suffix), io=faulty(pwrite=corrupting_pwrite()))
    assert result.exit_code == 3
    assert "read back" in one_line(result.stderr)
    assert listing(work) == [sample]


def test_unwritable_directory(tmp_path: Path) -> None:
    work = copy_samples(tmp_path, ["balle.pt"])

    def denied(path: Any, *args: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(path))

    result = spectral("convert", work / "balle.pt", io=faulty(open=denied))
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert "Permission denied" in line and "internal" not in line and "balle.spectral.pt" in line
    assert listing(work) == ["balle.pt"]


def test_unexpected_exception_is_one_line_with_exit_1(tmp_path: Path) -> None:
    work = copy_samples(tmp_path, ["balle.pt"])
    boom = faulty(pwrite=failing_pwrite(0, raising(RuntimeError("boom\nsecond line"))))
    result = spectral("convert", work / "balle.pt", io=boom)
    assert result.exit_code == 1
    assert "internal error" in one_line(result.stderr) and "SPECTRAL_DEBUG" in result.stderr
    assert listing(work) == ["balle.pt"]
    with pytest.raises(RuntimeError, match="boom"):
        spectral("convert", work / "balle.pt", env={"SPECTRAL_DEBUG": "1"}, io=boom)
    assert listing(work) == ["balle.pt"]


# ---- out of memory: exit 1, said as such -------------------------------------------------------------------------


def _bad_alloc(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("std::bad_alloc")


def _allocator_refused(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried")


def _memory_error(*args: Any, **kwargs: Any) -> Any:
    raise MemoryError


@pytest.mark.parametrize("fail", [_bad_alloc, _allocator_refused, _memory_error])
@pytest.mark.parametrize("sample", ["balle.pt", "balle.safetensors"])
def test_out_of_memory_is_one_line_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: Callable[..., Any], sample: str
) -> None:
    """In a worker thread of the transform, for a torch file and a safetensors file."""
    work = copy_samples(tmp_path, [sample])
    monkeypatch.setattr(slabs, "spectral_rows", fail)
    line = assert_refused(work, work / sample, ["convert", work / sample, "-o", work / f"out{Path(sample).suffix}"], 1)
    assert "out of memory" in line and str(work / sample) in line and "no output was written" in line, line
    assert "internal" not in line and "ulimit" in line


@pytest.mark.slow
def test_loading_under_an_address_space_cap_is_out_of_memory_not_damaged(tmp_path: Path) -> None:
    """A real refusal: torch maps a .pt file whole; under RLIMIT_AS that mapping fails with ENOMEM. The file is
    fine, so the message says out of memory (exit 1), never that it is damaged or truncated (exit 3)."""
    source = tmp_path / "big.pt"
    torch.save({"conv.weight": torch.zeros(64, 64, 64, 64)}, source)  # 64 MiB
    digest = sha256(source)
    child = (
        "import resource, sys\n"
        "from spectral_cli.cli import app\n"
        "import spectral_cli.files.convert\n"
        "size = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (16 << 20),) * 2)\n"
        "app(args=['convert', sys.argv[1], '-o', sys.argv[2]], prog_name='spectral')\n"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(source), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, check=False, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith("error:") and "out of memory" in line and str(source) in line, line
    assert "damaged" not in line
    assert sha256(source) == digest and listing(tmp_path) == ["big.pt"]


@functools.cache
def _address_space_that_stops_torch() -> int | None:
    """An RLIMIT_AS under which the command line starts but ``import torch`` fails to map its libraries, or None."""
    probe = "import resource, sys\nlimit = int(sys.argv[1])\nresource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    probe += "import spectral_cli.cli\nimport torch\n"
    for mib in (512, 256, 1024, 2048, 384, 768):
        proc = subprocess.run([sys.executable, "-c", probe, str(mib << 20)], env=child_env(), capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        if proc.returncode != 0 and "failed to map segment" in proc.stderr:
            return mib << 20
    return None


@pytest.mark.slow
def test_an_address_space_too_small_for_torch_is_out_of_memory(tmp_path: Path) -> None:
    """``ulimit -v`` so small that torch's libraries cannot be mapped: exit 1, one line saying out of memory (not an
    internal error)."""
    limit = _address_space_that_stops_torch()
    if limit is None:
        pytest.skip("no address-space limit found here under which Python starts but torch cannot be mapped")
    torch.save(conv_state(), tmp_path / "m.pt")
    proc = spectral_limited("RLIMIT_AS", limit, "convert", "m.pt", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert "out of memory" in line.lower() and "internal error" not in line, line
    assert listing(tmp_path) == ["m.pt"]


# ---- names that look like Rich markup ----------------------------------------------------------------------------


def test_file_names_are_not_read_as_markup(tmp_path: Path) -> None:
    work = tmp_path / "run[/b]"
    work.mkdir(parents=True)
    source = work / "net[bold].pt"
    source.write_bytes((make_samples.HERE / "balle.pt").read_bytes())
    result = spectral("convert", source)
    assert result.exit_code == 0, result.stderr
    assert str(work / "net[bold].spectral.pt") in result.stdout
    result = spectral("convert", source)
    assert result.exit_code == 5
    assert str(work / "net[bold].spectral.pt") in one_line(result.stderr)
    result = spectral("inspect", work / "gone[/].pt")
    assert result.exit_code == 3 and "gone[/].pt" in one_line(result.stderr)


def test_failed_read_back_under_force_keeps_the_old_output(tmp_path: Path) -> None:
    work = copy_samples(tmp_path, ["balle.pt"])
    (work / "out.pt").write_bytes(b"previous output")
    result = spectral(
        "convert", work / "balle.pt", "-o", work / "out.pt", "--force", io=faulty(pwrite=corrupting_pwrite())
    )
    assert result.exit_code == 3
    assert "read back" in one_line(result.stderr)
    assert (work / "out.pt").read_bytes() == b"previous output"
    assert not temp_files(work)


# ---- conv kernels with a zero-size dimension ---------------------------------------------------------------------


def _zero_size(case: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "kernel-dim-0": {"conv.weight": (16, 4, 0, 3)},
        "kernel-dim-0-1d": {"conv.weight": (16, 4, 0)},
        "beside-others": {"conv.weight": (16, 4, 3, 0), "in0.weight": (16, 0, 3, 3), "c2.weight": (4, 3, 3, 3)},
    }[case]
    state = {k: torch.randn(*shape, generator=g) for k, shape in shapes.items()}
    return state | {"conv.bias": torch.randn(16, generator=g)}


@pytest.mark.parametrize("case", ["kernel-dim-0", "kernel-dim-0-1d", "beside-others"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_conv_weight_with_a_zero_size_dimension_is_no_internal_error(tmp_path: Path, case: str, suffix: str) -> None:
    """A conv weight with a zero-size kernel dimension (alone, or beside a conv with no input channels and a normal
    one): the run does what convert_state_dict does with the same state dict. Where that changes layers: exit 0 and
    the file holds its tensors; where it changes none: exit 6 (nothing to convert), one line, nothing written."""
    state = _zero_size(case)
    torch.save(state, tmp_path / "zero.pt")
    expected = convert_state_dict(state)  # raises (and fails the test) where the pure function crashes
    result = spectral("convert", tmp_path / "zero.pt", "-o", tmp_path / f"out{suffix}")
    assert "internal error" not in result.stderr, result.stderr
    if case == "beside-others":
        assert expected.changed, "the normal convs beside the empty one are converted"
    if expected.changed:
        assert result.exit_code == 0, result.stderr
        assert_equal_tensors(read(tmp_path / f"out{suffix}"), expected.state_dict)
    else:
        assert result.exit_code == 6, result.stderr
        one_line(result.stderr)
        assert listing(tmp_path) == ["zero.pt"]


# ---- an uninitialized lazy layer in a trusted pickle -------------------------------------------------------------


def test_a_pickled_module_with_an_uninitialized_lazy_conv_is_a_damaged_input(tmp_path: Path) -> None:
    """``torch.save`` of a model holding an uninitialized LazyConv2d, with ``--trust-pickle``: exit 3, one line naming
    the file and saying the lazy layer is not initialized."""
    path = tmp_path / "lazy_model.pt"
    torch.save(nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU()), path)
    result = spectral("convert", path, "--trust-pickle")
    assert result.exit_code == 3, result.stderr
    line = one_line(result.stderr)
    assert path.name in line and "lazy" in line.lower() and "initialized" in line.lower(), line
    assert listing(tmp_path) == ["lazy_model.pt"]


def test_load_spectral_of_an_uninitialized_lazy_conv_is_a_spectral_error(tmp_path: Path) -> None:
    """load_spectral of that file raises SpectralError (not torch's RuntimeError) naming the file."""
    path = tmp_path / "lazy_model.pt"
    torch.save(nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU()), path)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(SpectralError) as caught:
        load_spectral(model, path, trust_pickle=True)
    assert path.name in str(caught.value)


# ---- an integer tensor recorded as spectral ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["bake", "inspect"])
def test_an_integer_tensor_recorded_as_spectral_is_a_damaged_file_named_in_the_error(
    tmp_path: Path, command: str
) -> None:
    """A safetensors file whose spectral_cli record names an int32 tensor: exit 3, one line with the file's path."""
    key = f"conv.{SUFFIX}"
    doc = {"version": "0.1.0", "layers": {key: {"basis": "rfft", "kernel_size": [3, 3], "dtype": "float32"}}}
    path = tmp_path / "int_record.safetensors"
    save_file({key: torch.zeros(2, 4, 3, 3, 2, dtype=torch.int32)}, str(path),
              metadata={"format": "pt", "spectral_cli": json.dumps(doc)})  # fmt: skip
    result = spectral(command, path)
    assert result.exit_code == 3, result.stderr
    line = one_line(result.stderr)
    assert str(path) in line, line
    assert listing(tmp_path) == ["int_record.safetensors"]
