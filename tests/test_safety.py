"""The safety promises of the README through the real command line: signals, a killed process, refused writes,
what safetensors cannot hold, names that would drive the terminal, one file whatever the input format.

Each test fails on the code before issue 12: stopping signals left hidden temporaries (SIGTERM, SIGHUP) or were an
internal error (Ctrl-C in a .pt write); a refused .pt write was "internal error: RuntimeError [enforce fail]"; .pt to
.safetensors crashed on tied tensors and ``_extra_state``; names were printed raw; the input could be truncated
under a mapped .pt (SIGBUS).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from models import (
    child_env,
    copy_samples,
    faulty,
    listing,
    make_samples,
    one_line,
    parse_json,
    read,
    sha256,
    spectral,
    temp_files,
)
from safetensors.torch import load_file, save_file

#: a child that converts or bakes as ``spectral`` would, with every write slowed down (so that a test can signal it
#: in the middle) and pieces small (so that there are many writes)
SLOW_CHILD = """
import dataclasses, os, sys, time
from spectral_cli.cli import app
from spectral_cli.files.convert import Io
from spectral_cli.files.syscalls import SYSCALLS

def slow(fd, data, offset):
    time.sleep(0.05)
    return os.pwrite(fd, data, offset)

app(args=sys.argv[1:], prog_name="spectral", obj=Io(dataclasses.replace(SYSCALLS, pwrite=slow), slab_bytes=4096))
"""


def _start(code: str, *args: Any, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _hidden(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def _writing(directory: Path, pid: int) -> bool:
    """Whether process ``pid`` has an output open in ``directory``: a hidden temporary, or an unnamed file
    (``O_TMPFILE``: ``/proc/PID/fd`` shows it as ``DIR/#INODE (deleted)``)."""
    if _hidden(directory):
        return True
    fds = Path(f"/proc/{pid}/fd")
    try:
        links = [os.readlink(fd) for fd in fds.iterdir()]
    except OSError:
        return False
    return any(link.startswith(f"{directory}/#") for link in links)


def _wait_for_temporary(directory: Path, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not _writing(directory, proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no temporary appeared"
        time.sleep(0.02)
    time.sleep(0.2)  # well into the writing


def _wait_until_clean(directory: Path, timeout: float = 30) -> list[str]:
    """The hidden entries of ``directory`` once the watcher of a killed writer has removed its temporary."""
    deadline = time.monotonic() + timeout
    while _hidden(directory) and time.monotonic() < deadline:
        time.sleep(0.02)
    return _hidden(directory)


def _big_state(rows: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(rows, 64, 3, 3, generator=g) for i in range(4)} | {
        "head.bias": torch.randn(64, generator=g)
    }


@pytest.fixture
def big(tmp_path: Path) -> Iterator[Path]:
    work = tmp_path / "work"
    work.mkdir()
    torch.save(_big_state(), work / "big.pt")
    save_file(_big_state(), str(work / "big.safetensors"), metadata={"format": "pt"})
    yield work


# ---- signals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "signum", "args"),
    [
        ("pt-sigterm", signal.SIGTERM, ["big.pt", "-o", "out.pt"]),
        ("pt-sighup", signal.SIGHUP, ["big.pt", "-o", "out.pt"]),
        ("pt-sigint", signal.SIGINT, ["big.pt", "-o", "out.pt"]),
        ("safetensors-sigterm", signal.SIGTERM, ["big.safetensors", "-o", "out.safetensors"]),
        ("shards-sighup", signal.SIGHUP, ["big.safetensors", "-o", "shards", "--max-shard-size", "100KB"]),
        ("pt-sigquit", signal.SIGQUIT, ["big.pt", "-o", "out.safetensors"]),
    ],
)
def test_a_stopping_signal_leaves_nothing_behind(big: Path, name: str, signum: int, args: list[str]) -> None:
    """A real process, signalled while it writes: exit 128 + the signal, one line, nothing left, input intact."""
    before = {p: sha256(big / p) for p in listing(big)}
    proc = _start(SLOW_CHILD, "convert", *args, cwd=big)
    _wait_for_temporary(big, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (proc.returncode, stderr)
    line = one_line(stderr)
    assert line.startswith("error: stopped by SIG") and "internal" not in line, line
    assert stdout == ""
    assert {p: sha256(big / p) for p in listing(big)} == before  # nothing added, hidden or not


@pytest.mark.parametrize(
    "args",
    [["-o", "out.pt"], ["-o", "out.safetensors"], ["-o", "shards", "--max-shard-size", "100KB"]],
)
def test_a_killed_run_leaves_nothing_behind(big: Path, args: list[str]) -> None:
    """SIGKILL cannot be caught: a file output was never named (O_TMPFILE), a directory output's watcher removes
    it; either way the directory is as it was."""
    if not _tmpfile_supported(big):
        pytest.skip("this file system makes no unnamed files (O_TMPFILE)")
    source = "big.safetensors" if args[1] != "out.pt" else "big.pt"
    before = listing(big)
    proc = _start(SLOW_CHILD, "convert", source, *args, cwd=big)
    _wait_for_temporary(big, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert _wait_until_clean(big) == []
    assert listing(big) == before


def test_a_temporary_a_killed_writer_and_its_watcher_left_is_removed_by_the_next_run(samples: Path) -> None:
    """Where nothing could remove it (the watcher killed too), the next output into the directory does: it is
    named as ours, owned by us and locked by nobody."""
    stale = samples / ".spectral-0123456789abcdef.tmp"
    (stale / "shard").mkdir(parents=True)
    unmarked = samples / ".spectral-fedcba9876543210.tmp"
    unmarked.mkdir()
    try:
        os.setxattr(stale, "user.spectral_cli.temporary", b"1")
    except OSError:
        pytest.skip("this file system takes no user extended attributes: only the watcher removes temporaries")
    assert spectral("convert", samples / "balle.pt", "-o", samples / "out.pt").exit_code == 0
    assert not stale.exists()
    assert unmarked.exists()  # named as ours, but not made by this tool


def _tmpfile_supported(directory: Path) -> bool:
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600))
    except (OSError, AttributeError):
        return False
    return True


def test_a_signal_the_process_was_started_ignoring_stays_ignored(big: Path) -> None:
    """``nohup spectral ...`` ignores SIGHUP: the run goes on to the end."""
    code = "import signal\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\n" + SLOW_CHILD
    proc = _start(code, "convert", "big.pt", "-o", "out.pt", cwd=big)
    _wait_for_temporary(big, proc)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "out.pt" in listing(big) and _hidden(big) == []


def test_a_temporary_that_a_live_process_holds_is_left_alone(samples: Path) -> None:
    """Another spectral writing the same output holds its temporary locked: not stale, not removed."""
    live = samples / ".spectral-0123456789abcdef.tmp"
    fd = os.open(live, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.setxattr(fd, "user.spectral_cli.temporary", b"1")
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert spectral("convert", samples / "balle.pt", "-o", samples / "out.pt").exit_code == 0
        assert live.exists()
    finally:
        os.close(fd)
    assert spectral("convert", samples / "balle.pt", "-o", samples / "out.pt", "--force").exit_code == 0
    assert not live.exists()


def test_a_signal_during_the_rename_waits_for_it(samples: Path) -> None:
    """The output is complete once renamed: a signal then is reported after it, and the output is whole."""
    out = samples / "out.pt"

    def rename_then_signal(src: Path, dst: Path) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the rename is under way
        os.replace(src, dst)

    result = spectral("convert", samples / "balle.pt", "-o", out, io=faulty(replace=rename_then_signal))
    assert result.exit_code == 143
    assert "after the output was written" in one_line(result.stderr)
    assert out.exists() and not temp_files(samples)
    read(out)  # whole


# ---- refused writes --------------------------------------------------------------------------------------------

FSIZE_CHILD = """
import resource, sys
from spectral_cli.cli import app
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
app(args=sys.argv[1:], prog_name="spectral")
"""


@pytest.mark.parametrize("out", ["out.pt", "out.safetensors", "shards"])
def test_a_file_size_limit_is_a_refused_write_not_a_killed_process(tmp_path: Path, out: str) -> None:
    """ulimit -f: the write fails with EFBIG, said as a refused write of that file with the fix (torch.save turned
    it into "internal error: RuntimeError [enforce fail ...]")."""
    work = copy_samples(tmp_path, ["balle.pt", "balle.safetensors"])
    source = "balle.safetensors" if out == "shards" else "balle.pt"
    extra = ["--max-shard-size", "1MB"] if out == "shards" else []
    proc = subprocess.run([sys.executable, "-c", FSIZE_CHILD, "convert", source, "-o", out, *extra], cwd=work,
                          env=child_env(), capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    line = one_line(proc.stderr)
    assert "File too large" in line and out in line and "ulimit -f" in line, line
    assert listing(work) == ["balle.pt", "balle.safetensors"]


def test_a_failed_swap_of_a_sharded_output_keeps_the_old_one_and_leaves_nothing(tmp_path: Path) -> None:
    """Without renameat2 the old directory steps aside and the new one takes its name: if that fails, the old one
    is put back, and no empty aside directory is left."""
    work = copy_samples(tmp_path, ["balle.safetensors"])
    out = work / "shards"
    assert spectral("convert", work / "balle.safetensors", "-o", out, "--max-shard-size", "40KB").exit_code == 0
    before = {p: sha256(out / p) for p in listing(out)}
    calls = 0

    def second_refused(src: Path, dst: Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise PermissionError(13, "Permission denied", str(dst))
        os.replace(src, dst)

    io = faulty(exchange=None, replace=second_refused)
    args = ["convert", work / "balle.safetensors", "-o", out, "--max-shard-size", "60KB", "--force", "--basis", "rdft"]
    result = spectral(*args, io=io)
    assert result.exit_code == 1 and "Permission denied" in one_line(result.stderr)
    assert listing(work) == ["balle.safetensors", "shards"]  # no aside or staging directory
    assert {p: sha256(out / p) for p in listing(out)} == before
    # and with the one-step swap, the new output replaces the old
    assert spectral(*args).exit_code == 0
    assert listing(work) == ["balle.safetensors", "shards"] and {p: sha256(out / p) for p in listing(out)} != before


# ---- inputs that change while being read -----------------------------------------------------------------------


def test_a_torch_file_truncated_while_converting_is_no_bus_error(tmp_path: Path) -> None:
    """A .pt is read into memory, never mapped: truncating it mid-run cannot kill the process (SIGBUS)."""
    work = copy_samples(tmp_path, ["balle.pt"])
    reference = work / "reference.pt"
    assert spectral("convert", work / "balle.pt", "-o", reference).exit_code == 0
    truncated = False

    def truncate_then_write(fd: int, data: Any, offset: int) -> int:
        nonlocal truncated
        if not truncated:
            truncated = True
            os.truncate(work / "balle.pt", 100)  # what a trainer's torch.save(path) does first
        return os.pwrite(fd, data, offset)

    result = spectral("convert", work / "balle.pt", "-o", work / "out.pt", io=faulty(pwrite=truncate_then_write))
    assert result.exit_code == 0, result.stderr
    assert read(work / "out.pt").keys() == read(reference).keys()
    for key, value in read(reference).items():
        assert torch.equal(read(work / "out.pt")[key], value), key


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_safetensors_file_changed_while_streaming_is_not_written(tmp_path: Path, change: str) -> None:
    """Read as it is written: truncated, it ends early; rewritten in place, the output would mix two files."""
    work = copy_samples(tmp_path, ["balle.safetensors"])
    source = work / "balle.safetensors"
    done = False

    def change_then_write(fd: int, data: Any, offset: int) -> int:
        nonlocal done
        if not done:
            done = True
            if change == "truncate":
                os.truncate(source, source.stat().st_size // 2)
            else:
                data_now = bytearray(source.read_bytes())
                data_now[-4:] = b"\x00\x00\x80\x7f"
                with source.open("r+b") as f:  # in place, same size
                    f.write(data_now)
                os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
        return os.pwrite(fd, data, offset)

    result = spectral("convert", source, "-o", work / "out.safetensors", io=faulty(pwrite=change_then_write))
    assert result.exit_code == 3, result.stderr
    line = one_line(result.stderr)
    assert ("truncated" if change == "truncate" else "changed while it was being read") in line, line
    assert listing(work) == ["balle.safetensors"]


# ---- .pt to .safetensors ---------------------------------------------------------------------------------------


def test_tied_tensors_and_views_go_into_safetensors_once_per_key(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(8, 4, 3, 3, generator=g)
    table = torch.randn(10, 6, generator=g)
    state = {"enc.weight": shared, "dec.weight": shared, "embed.weight": table, "head.weight": table,
             "row": table[3], "conv.bias": torch.zeros(8)}  # fmt: skip
    torch.save(state, tmp_path / "tied.pt")
    result = spectral("convert", tmp_path / "tied.pt", "-o", tmp_path / "tied.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    assert [layer["name"] for layer in parse_json(result.stdout)["layers"]] == ["enc", "dec"]
    back = load_file(str(tmp_path / "tied.safetensors"))
    for key in ("embed.weight", "head.weight", "row", "conv.bias"):
        assert torch.equal(back[key], state[key]), key
    assert spectral("bake", tmp_path / "tied.safetensors", "-o", tmp_path / "baked.safetensors").exit_code == 0
    baked = load_file(str(tmp_path / "baked.safetensors"))
    assert torch.allclose(baked["enc.weight"], shared, atol=1e-6) and torch.allclose(
        baked["dec.weight"], shared, atol=1e-6
    )


def _with(value: Any) -> dict[str, Any]:
    return {"conv.weight": torch.randn(4, 3, 3, 3), "odd": value}


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # quantized tensors are deprecated, but such checkpoints exist
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"step": 3}, "odd (a dict, not a tensor)"),
        (_quantized, "odd (qint8)"),
        (torch.randn(4).to_sparse(), "odd (sparse_coo)"),
        (torch.zeros(4, dtype=torch.complex128), "odd (complex128)"),
        (torch.empty(4, device="meta"), "odd (meta)"),
    ],
    ids=["extra-state-object", "quantized", "sparse", "complex128", "meta"],
)
def test_what_safetensors_cannot_hold_is_named(tmp_path: Path, value: Any, says: str) -> None:
    value = value() if callable(value) else value
    state = _with(value)
    if isinstance(value, dict):
        state = {"conv.weight": state["conv.weight"], "odd._extra_state": value}
        says = "odd._extra_state (a dict, not a tensor)"
    source = tmp_path / "odd.pt"
    torch.save(state, source)
    result = spectral("convert", source, "-o", tmp_path / "odd.safetensors")
    assert result.exit_code == 5, result.stderr
    line = one_line(result.stderr)
    assert says in line and "-o NAME.pt" in line, line
    assert listing(tmp_path) == ["odd.pt"]
    assert spectral("convert", source, "-o", tmp_path / "odd.spectral.pt").exit_code == 0  # a .pt holds it


def test_a_safetensors_output_has_the_same_bytes_whatever_the_input_format(tmp_path: Path) -> None:
    state = make_samples.build("balle").state_dict()
    torch.save(state, tmp_path / "m.pt")
    save_file(dict(state), str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    shards = tmp_path / "shards"
    assert spectral("convert", tmp_path / "m.safetensors", "-o", shards, "--max-shard-size", "40KB", "--basis",
                    "rdft").exit_code == 0  # fmt: skip
    assert spectral("bake", shards, "-o", tmp_path / "plain").exit_code == 0  # plain shards again
    outputs = []
    for name, source in (("from-pt", "m.pt"), ("from-safetensors", "m.safetensors"), ("from-shards", "plain")):
        out = tmp_path / f"{name}.safetensors"
        result = spectral("convert", tmp_path / source, "-o", out)
        assert result.exit_code == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1], "a .pt and a .safetensors input gave different files"
    converted = load_file(str(tmp_path / "from-shards.safetensors"))
    assert sorted(converted) == sorted(load_file(str(tmp_path / "from-pt.safetensors")))


# ---- names that would drive the terminal -----------------------------------------------------------------------

HOSTILE_NAME = "enc\x1b[2J\x1b]0;owned\x07\n.0\u202eevil\x9b31m"


def test_names_from_a_file_are_printed_as_text(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, generator=g)
    weight[0, 0, 0, 0] = float("nan")  # a warning that names the key
    directory = tmp_path / "run\x1b[31m"
    directory.mkdir()
    source = directory / "m\x1b[2J\n.safetensors"
    save_file({f"{HOSTILE_NAME}.weight": weight, "plain.weight": torch.randn(4, 3, 3, 3, generator=g)}, str(source))
    runs: list[list[Any]] = [
        ["convert", source],
        ["inspect", source, "--all"],
        ["inspect", source, "--all", "--json"],
        ["convert", source, "--dry-run", "--force", "--json"],
        ["inspect", directory / "missing\x1b[2J.pt"],
    ]
    for args in runs:
        result = spectral(*args, env={"COLUMNS": "400"})
        for stream in (result.stdout, result.stderr):
            assert not any(c in stream for c in "\x1b\x07\x9b\u202e"), (args, stream)
        assert ("\\u001b[2J" if "--json" in args else "\\x1b[2J") in result.stdout + result.stderr, args
        if "--json" in args:
            parse_json(result.stdout)
        elif result.exit_code == 0:  # each layer one row: no name broke a line
            rows = [line for line in result.stdout.splitlines() if "enc" in line or "plain" in line]
            assert len(rows) == 2, result.stdout
    converted = directory / "m\x1b[2J\n.spectral.safetensors"
    result = spectral("bake", converted, env={"COLUMNS": "400"})
    assert result.exit_code == 0 and "\x1b" not in result.stdout + result.stderr
    assert sum("baked" in line for line in result.stdout.splitlines()) == 2  # title and summary, one line each


def test_a_file_name_that_is_not_utf8_is_printed_not_a_crash(tmp_path: Path) -> None:
    name = os.fsdecode(b"bad\xff.pt")
    copy_samples(tmp_path, ["balle.pt"])
    os.rename(tmp_path / "balle.pt", tmp_path / name)
    for args in (["inspect", tmp_path / name], ["convert", tmp_path / name, "--json"]):
        result = spectral(*args)
        assert result.exit_code == 0, result.stderr
        assert "\\udcff" in result.stdout
    result = spectral("inspect", tmp_path / os.fsdecode(b"gone\xfe.pt"))
    assert result.exit_code == 3 and "\\udcfe" in one_line(result.stderr)


# ---- usage errors under --json ---------------------------------------------------------------------------------


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


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: it is refused without being opened so."""
    os.mkfifo(tmp_path / "model.pt")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "spectral_cli", "convert", "model.pt"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 3 and "FIFO" in one_line(proc.stderr)
    assert time.monotonic() - start < 60
