"""No run loses or garbles data, through the real command line: signals, killed processes, refused writes, inputs
that change while read, what safetensors cannot hold, names that would drive the terminal; and the ways a run could
lose data by what it writes or where.

* a stopping signal (SIGINT, SIGTERM, SIGHUP) or SIGKILL, in the middle of writing or during the rename, leaves
  nothing behind, and the next run removes what a killed writer left; a refused write (a file-size limit, a failed
  swap) is exit 1 with nothing left; an input truncated or rewritten while read is never written out;
* tied tensors and views go into safetensors once per key; a safetensors output has the same bytes whatever the
  input format; names from a file are printed as text;
* tensors that are views (transposed, sliced, expanded, ``channels_last``) are written with their values;
* an input is never removed, whatever its name (even one that looks like a temporary), nor is a user's directory
  that only looks like one; ``--force`` never replaces a symlink to a FIFO or a device;
* output names near ``NAME_MAX`` work; ``.``, ``./`` and an index file named from inside a checkpoint directory
  are inputs like any other; model directories come out whole: deep files, hidden files and symlinked component
  folders included; a low open-files limit still converts hundreds of shards; a trusted container carries its
  module.

Signals, limits and working directories that the in-process runner cannot give are real ``python`` processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from models import (
    SUFFIX,
    assert_equal_tensors,
    child_env,
    copy_samples,
    faulty,
    listing,
    make_samples,
    one_line,
    parse_json,
    read,
    sha256,
    snapshot,
    spectral,
    spectral_limited,
    temp_files,
)
from safetensors.torch import load_file, save_file
from torch import nn

from spectral_cli import bake_state_dict, convert_state_dict

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- helpers of the data-loss cases ----------------------------------------------------------------------------------


def _conv_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)}


def _write_shards(directory: Path, states: list[dict[str, torch.Tensor]]) -> None:
    """A Hugging Face-style sharded checkpoint: one shard per state dict and the index naming them."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, state in enumerate(states, 1):
        name = f"model-{i:05d}-of-{len(states):05d}.safetensors"
        save_file(state, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _read_shards(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, through its index."""
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(str(directory / shard)))
    assert sorted(tensors) == sorted(weight_map)
    return tensors


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """A blocked in-process run (a FIFO opened for writing) ends in a failed test, not a hung one: SIGALRM."""
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- views are written with their values --------------------------------------------------------------------


def _views(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors whose memory is not laid out as their shape says: each must be written as the values it shows."""
    g = torch.Generator().manual_seed(seed)
    return {
        "lin.weight": torch.randn(64, 32, generator=g).t(),  # transposed
        "sliced": torch.randn(8, 10, generator=g)[::2, 1:7],  # strided slice
        "offset": torch.randn(40, generator=g)[7:19],  # a view into the middle of a storage
        "expanded": torch.randn(1, 5, generator=g).expand(4, 5),  # stride 0
        "feat.buffer": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
    }


def test_views_are_converted_into_files_with_their_values(tmp_path: Path) -> None:
    """A .pt of non-contiguous tensors (and a channels_last conv) converted to .safetensors and to .pt: the carried
    tensors bit-equal to the source, the converted ones equal to convert_state_dict's."""
    g = torch.Generator().manual_seed(1)
    state = {
        **_views(),
        "conv.weight": torch.randn(4, 4, 3, 3, generator=g),
        "cl.weight": torch.randn(4, 4, 3, 3, generator=g).to(memory_format=torch.channels_last),
    }
    assert not all(v.is_contiguous() for k, v in state.items() if k != "conv.weight")
    torch.save(state, tmp_path / "views.pt")
    expected = convert_state_dict(state).state_dict
    for out in ("views.spectral.safetensors", "views.spectral.pt"):
        result = spectral("convert", tmp_path / "views.pt", "-o", tmp_path / out)
        assert result.exit_code == 0, result.stderr
        written = read(tmp_path / out)
        assert_equal_tensors(written, expected)
        for key in _views():
            assert torch.equal(written[key], state[key]), f"{out}: {key} is not the source's values"


def test_views_are_baked_into_safetensors_with_their_values(tmp_path: Path) -> None:
    """A spectral .pt holding non-contiguous carried tensors, baked to .safetensors: carried tensors bit-equal,
    baked ones equal to bake_state_dict's."""
    spectral_state = convert_state_dict(_conv_state()).state_dict
    spectral_state.update(_views(seed=2))
    torch.save(spectral_state, tmp_path / "views.spectral.pt")
    result = spectral("bake", tmp_path / "views.spectral.pt", "-o", tmp_path / "baked.safetensors")
    assert result.exit_code == 0, result.stderr
    written = load_file(str(tmp_path / "baked.safetensors"))
    assert_equal_tensors(written, bake_state_dict(spectral_state).state_dict)
    for key, value in _views(seed=2).items():
        assert torch.equal(written[key], value), f"{key} is not the source's values"


# ---- inputs and user directories named like temporaries -----------------------------------------------------

OLD_STYLE = ".out.pt.spectral-1.tmp"  # the pattern of the temporaries of an output named out.pt: .<name>.spectral-*
NEW_STYLE = ".spectral-0123456789abcdef.tmp"  # the pattern of the staging names: .spectral-<16 hex digits>.tmp


def test_an_input_named_like_a_temporary_of_its_output_is_untouched(tmp_path: Path) -> None:
    """A file named as a temporary of ``out.pt`` (the old pattern, then the new one), converted with ``-o out.pt``
    beside it: exit 0, the output written, and the input byte-identical afterwards."""
    for i, name in enumerate((OLD_STYLE, NEW_STYLE)):
        work = tmp_path / str(i)
        work.mkdir()
        source = work / name
        torch.save(_conv_state(seed=i), source)
        data = source.read_bytes()
        result = spectral("convert", source, "-o", work / "out.pt")
        assert result.exit_code == 0, (name, result.stderr)
        assert source.is_file(), f"the input {name} was removed"
        assert source.read_bytes() == data, f"the input {name} was changed"
        assert_equal_tensors(read(work / "out.pt"), convert_state_dict(_conv_state(seed=i)).state_dict)


def test_a_sharded_input_named_like_a_temporary_of_its_output_is_untouched(tmp_path: Path) -> None:
    """A shard directory ``.out.spectral-1.tmp`` converted with ``-o out``: exit 0, every input file the same."""
    source = tmp_path / ".out.spectral-1.tmp"
    _write_shards(source, [_conv_state(), {"head.bias": torch.arange(4.0)}])
    before = snapshot(source)
    result = spectral("convert", source, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert source.is_dir(), "the input directory was removed"
    assert snapshot(source) == before
    assert f"conv.{SUFFIX}" in _read_shards(tmp_path / "out")


def test_directories_named_like_temporaries_that_hold_user_files_are_kept(tmp_path: Path) -> None:
    """Directories of the user named as temporaries of ``out``/``out.pt`` (either pattern), inputs of nothing and
    locked by no one: writing those outputs removes none of them."""
    torch.save(_conv_state(), tmp_path / "m.pt")
    _write_shards(tmp_path / "shards", [_conv_state()])
    kept = [".out.spectral-0123abcd.tmp", ".out.pt.spectral-0123abcd.tmp", NEW_STYLE]
    for name in kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text(f"the only copy of {name}")
    before = {name: snapshot(tmp_path / name) for name in kept}
    assert spectral("convert", tmp_path / "m.pt", "-o", tmp_path / "out.pt").exit_code == 0
    assert spectral("convert", tmp_path / "shards", "-o", tmp_path / "out").exit_code == 0
    for name in kept:
        assert (tmp_path / name).is_dir(), f"{name} (a directory of the user's) was removed"
        assert snapshot(tmp_path / name) == before[name], name


# ---- SIGKILL leaves nothing ---------------------------------------------------------------------------------

#: a child that converts as ``spectral`` would, with every write slowed down and pieces small; it says "writing"
#: on stdout at its first write, so that the test can kill it in the middle
SLOW_CHILD_SAYING_WRITING = """
import dataclasses, os, sys, time
from spectral_cli.cli import app
from spectral_cli.files.convert import Io
from spectral_cli.files.syscalls import SYSCALLS

said = False

def slow(fd, data, offset):
    global said
    if not said:
        said = True
        print("writing", flush=True)
    time.sleep(0.05)
    return os.pwrite(fd, data, offset)

app(args=sys.argv[1:], prog_name="spectral", obj=Io(dataclasses.replace(SYSCALLS, pwrite=slow), slab_bytes=4096))
"""


def _slow_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(32, 16, 3, 3, generator=g) for i in range(8)} | {
        "head.bias": torch.randn(16, generator=g)
    }


def _has_tmpfile(directory: Path) -> bool:
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


@pytest.fixture(params=["tmp_path", "dev-shm"])
def kill_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory on the disk of tmp_path (ext4 here), or on /dev/shm (tmpfs)."""
    if request.param == "tmp_path":
        directory = tmp_path
    else:
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm")
        directory = Path(tempfile.mkdtemp(prefix="spectral-test-", dir="/dev/shm"))
    try:
        if not _has_tmpfile(directory):
            pytest.skip(f"{directory}: the file system has no O_TMPFILE")
        yield directory
    finally:
        if directory != tmp_path:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_run_killed_while_writing_leaves_nothing_in_the_directory(kill_dir: Path, suffix: str) -> None:
    """SIGKILL in the middle of writing out.safetensors / out.pt: the directory lists exactly what it did before
    (hidden entries included: no temporary)."""
    source = kill_dir / f"big{suffix}"
    if suffix == ".pt":
        torch.save(_slow_state(), source)
    else:
        save_file(_slow_state(), str(source), metadata={"format": "pt"})
    before = snapshot(kill_dir)
    args = [sys.executable, "-c", SLOW_CHILD_SAYING_WRITING, "convert", source.name, "-o", f"out{suffix}"]
    proc = subprocess.Popen(
        args, cwd=kill_dir, env=child_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "writing\n", (line, proc.communicate())
        time.sleep(0.3)  # well into the writing
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert snapshot(kill_dir) == before


# ---- long names ---------------------------------------------------------------------------------------------


def test_an_output_name_of_248_bytes_is_written(tmp_path: Path) -> None:
    """Input 'a'*236 + '.pt' (239 bytes): its default output (248 bytes) fits NAME_MAX (255), so it is written."""
    source = tmp_path / ("a" * 236 + ".pt")
    torch.save(_conv_state(), source)
    result = spectral("convert", source)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / ("a" * 236 + ".spectral.pt")
    assert len(out.name.encode()) == 248
    assert_equal_tensors(read(out), convert_state_dict(_conv_state()).state_dict)
    assert listing(tmp_path) == sorted([source.name, out.name])


# ---- '.', './' and an index named from inside the directory --------------------------------------------------


@pytest.mark.parametrize("argument", [".", "./", "model.safetensors.index.json"])
def test_a_shard_directory_named_from_inside_it_converts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argument: str
) -> None:
    """cwd = a shard directory, ``spectral convert .`` (``./``, the index): exit 0, and ``<parent>/<name>.spectral``
    holds the converted shards."""
    shards = tmp_path / "ckpt"
    state = _conv_state()
    _write_shards(shards, [{"conv.weight": state["conv.weight"]}, {"conv.bias": state["conv.bias"]}])
    before = snapshot(shards)
    monkeypatch.chdir(shards)
    result = spectral("convert", argument)
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(_read_shards(tmp_path / "ckpt.spectral"), convert_state_dict(state).state_dict)
    assert snapshot(shards) == before


def test_a_distributed_checkpoint_named_as_dot_converts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cwd = a DCP directory, ``spectral convert .``: exit 0, and ``<parent>/<name>.spectral`` is written."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with _quiet():  # torch warns that no process group is initialized
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    monkeypatch.chdir(tmp_path / "dcp")
    result = spectral("convert", ".")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "dcp.spectral" / ".metadata").is_file()


# ---- --force and symlinks to FIFOs and devices --------------------------------------------------------------


@pytest.mark.parametrize("target", ["fifo", "/dev/null"])
def test_force_never_replaces_a_symlink_to_a_fifo_or_a_device(tmp_path: Path, target: str) -> None:
    """``-o`` a symlink to a FIFO or to /dev/null, with ``--force``: exit 5, one line, the symlink and what it points
    to unchanged. (A symlink to a regular file is still replaced with ``--force``.)"""
    torch.save(_conv_state(), tmp_path / "m.pt")
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
    link = tmp_path / "out.pt"
    link.symlink_to(target)
    with _deadline(60):
        result = spectral("convert", tmp_path / "m.pt", "-o", link, "--force")
    assert result.exit_code == 5, result.stderr
    one_line(result.stderr)
    assert link.is_symlink() and os.readlink(link) == target
    assert stat.S_ISFIFO(os.stat(link).st_mode) if target == "fifo" else stat.S_ISCHR(os.stat(link).st_mode)
    # a symlink to a regular file stays allowed
    (tmp_path / "regular.pt").write_bytes(b"old output")
    other = tmp_path / "other.pt"
    other.symlink_to("regular.pt")
    result = spectral("convert", tmp_path / "m.pt", "-o", other, "--force")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(other), convert_state_dict(_conv_state()).state_dict)


# ---- model directories come out whole -----------------------------------------------------------------------


def _diffusers_like(root: Path, elsewhere: Path) -> None:
    """A model directory: a weight file and config, a file 5 folders deep, a hidden file, and a component folder
    that is a symlink to a real folder elsewhere."""
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "test"}')
    save_file(_conv_state(seed=1), str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "a" / "b" / "c" / "d" / "e").mkdir(parents=True)
    (root / "a" / "b" / "c" / "d" / "e" / "notes.txt").write_text("deep notes")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    component = elsewhere / "unet"
    component.mkdir(parents=True)
    (component / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    save_file(_conv_state(seed=2), str(component / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (root / "unet").symlink_to(component, target_is_directory=True)


def test_a_model_directory_is_converted_whole(tmp_path: Path) -> None:
    """Deep files, hidden files and a symlinked component folder are in the output: files carried with the same
    bytes, the component's weights converted."""
    root, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    _diffusers_like(root, elsewhere)
    outside = snapshot(elsewhere)
    result = spectral("convert", root, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    carried = [
        Path(folder, name).relative_to(root)
        for folder, _, names in os.walk(root, followlinks=True)
        for name in names
        if not name.endswith(".safetensors")
    ]
    assert {"config.json", "a/b/c/d/e/notes.txt", ".gitattributes", "unet/config.json"} <= set(map(str, carried))
    for relative in carried:
        assert (out / relative).is_file(), f"{relative} is missing from the output"
        assert (out / relative).read_bytes() == (root / relative).read_bytes(), relative
    assert_equal_tensors(load_file(str(out / "model.safetensors")), convert_state_dict(_conv_state(seed=1)).state_dict)
    component = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_equal_tensors(component, convert_state_dict(_conv_state(seed=2)).state_dict)
    assert snapshot(elsewhere) == outside  # the real folder untouched


def test_a_symlink_loop_in_a_model_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    """A folder linking back to one above it would be walked forever: exit 3, one line naming it, nothing written."""
    root, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    _diffusers_like(root, elsewhere)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    before = snapshot(tmp_path)
    result = spectral("convert", root, "-o", tmp_path / "out")
    assert result.exit_code == 3, result.stderr
    line = one_line(result.stderr)
    assert "loop" in line and str(root / "a" / "loop") in line
    assert snapshot(tmp_path) == before


# ---- resource limits ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_hundred_shards_convert_under_a_limit_of_256_open_files(tmp_path: Path) -> None:
    """``ulimit -n 256`` and an index of 300 shards (one conv among them): exit 0, the output complete."""
    g = torch.Generator().manual_seed(0)
    states = [{"conv.weight": torch.randn(4, 3, 3, 3, generator=g)}]
    states += [{f"block{i}.bias": torch.randn(2, generator=g)} for i in range(1, 300)]
    _write_shards(tmp_path / "many", states)
    proc = spectral_limited("RLIMIT_NOFILE", 256, "convert", "many", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = convert_state_dict({k: v for state in states for k, v in state.items()}).state_dict
    assert_equal_tensors(_read_shards(tmp_path / "many.spectral"), expected)


# ---- a trusted container that holds a module beside its state dict ----------------------------------------------


def test_a_trusted_container_with_a_module_beside_its_state_dict_converts_and_carries_the_module(
    tmp_path: Path,
) -> None:
    """The verification compares a carried module by its class and its state (a module's == is identity, which
    would call every such container read back differently)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    path, out = tmp_path / "mixed.pt", tmp_path / "mixed.spectral.pt"
    torch.save({"state_dict": model.state_dict(), "module": model, "epoch": 3}, path)
    result = spectral("convert", path, "-o", out, "--trust-pickle")
    assert result.exit_code == 0, result.stderr
    back = torch.load(out, weights_only=False)
    assert list(back) == ["state_dict", "module", "epoch"] and back["epoch"] == 3
    assert type(back["module"]) is nn.Sequential
    assert_equal_tensors(back["module"].state_dict(), model.state_dict())
    assert_equal_tensors(back["state_dict"], convert_state_dict(model.state_dict()).state_dict)
