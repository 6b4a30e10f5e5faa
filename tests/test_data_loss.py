"""Ways a run could lose or garble data, through the real command line: each test holds one promise.

* tensors that are views (transposed, sliced, expanded, ``channels_last``) are written with their values;
* an input is never removed, whatever its name (even one that looks like a temporary), nor is a user's directory
  that only looks like one;
* a process killed with ``SIGKILL`` while writing leaves nothing in the output's directory;
* output names near ``NAME_MAX`` work, and names past it are one line that names the file and the fix (``-o``);
* ``.``, ``./`` and an index file named from inside a checkpoint directory are inputs like any other;
* ``--force`` never replaces a symlink to a FIFO or a device;
* model directories come out whole: deep files, hidden files and symlinked component folders included;
* a low open-files limit still converts hundreds of shards, and an address-space limit that stops ``import torch``
  is said as out of memory;
* conv kernels with a zero-size dimension, uninitialized lazy layers and integer tensors recorded as spectral are
  handled or refused in one line naming the file, never an internal error.

Signals, limits and working directories that the in-process runner cannot give are real ``python`` processes.
"""

from __future__ import annotations

import functools
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
from models import child_env, listing, one_line, read, snapshot, spectral
from safetensors.torch import load_file, save_file
from torch import nn

from spectral_cli import SpectralError, bake_state_dict, convert_state_dict, load_spectral

SPECTRAL = "parametrizations.weight.original"


# ---- helpers ---------------------------------------------------------------------------------------------------


#: ``spectral ARGS`` in a process that first sets a resource limit: ``python -c LIMITED RLIMIT_NAME VALUE ARGS...``
LIMITED = """
import resource, sys
limit = int(sys.argv[2])
resource.setrlimit(getattr(resource, sys.argv[1]), (limit, limit))
from spectral_cli.cli import app
app(args=sys.argv[3:], prog_name="spectral")
"""


def _limited(name: str, limit: int, *args: Any, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``spectral ARGS`` in a real process under ``resource.setrlimit(name, limit)``."""
    return subprocess.run([sys.executable, "-c", LIMITED, name, str(limit), *map(str, args)], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def _conv_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)}


def assert_equal_tensors(actual: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    """The same keys, and every tensor bit-equal (dtype, shape and values)."""
    expected = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype and got.shape == value.shape, (key, got.dtype, got.shape, value.shape)
        assert torch.equal(got, value), f"{key}: the values written are not the values given"


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


# ---- 1. views are written with their values --------------------------------------------------------------------


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


# ---- 2. inputs and user directories named like temporaries -----------------------------------------------------

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
    assert f"conv.{SPECTRAL}" in _read_shards(tmp_path / "out")


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


# ---- 3. SIGKILL leaves nothing ---------------------------------------------------------------------------------

#: a child that converts as ``spectral`` would, with every write slowed down and pieces small; it says "writing"
#: on stdout at its first write, so that the test can kill it in the middle
SLOW_CHILD = """
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
    args = [sys.executable, "-c", SLOW_CHILD, "convert", source.name, "-o", f"out{suffix}"]
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


# ---- 4. long names ---------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("case", ["default-output", "given-output"])
def test_an_output_name_past_name_max_is_one_line_that_names_it_and_the_fix(tmp_path: Path, case: str) -> None:
    """A default output of 262 bytes ('a'*250 + '.pt'), or ``-o`` a 300-byte name: exit 1, one line naming the
    output and ``-o``, nothing written."""
    source = tmp_path / ("a" * 250 + ".pt")
    torch.save(_conv_state(), source)
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


# ---- 5. '.', './' and an index named from inside the directory --------------------------------------------------


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


# ---- 6. --force and symlinks to FIFOs and devices --------------------------------------------------------------


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


# ---- 7. model directories come out whole -----------------------------------------------------------------------


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


# ---- 8. resource limits ----------------------------------------------------------------------------------------


def test_three_hundred_shards_convert_under_a_limit_of_256_open_files(tmp_path: Path) -> None:
    """``ulimit -n 256`` and an index of 300 shards (one conv among them): exit 0, the output complete."""
    g = torch.Generator().manual_seed(0)
    states = [{"conv.weight": torch.randn(4, 3, 3, 3, generator=g)}]
    states += [{f"block{i}.bias": torch.randn(2, generator=g)} for i in range(1, 300)]
    _write_shards(tmp_path / "many", states)
    proc = _limited("RLIMIT_NOFILE", 256, "convert", "many", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = convert_state_dict({k: v for state in states for k, v in state.items()}).state_dict
    assert_equal_tensors(_read_shards(tmp_path / "many.spectral"), expected)


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


def test_an_address_space_too_small_for_torch_is_out_of_memory(tmp_path: Path) -> None:
    """``ulimit -v`` so small that torch's libraries cannot be mapped: exit 1, one line saying out of memory (not an
    internal error)."""
    limit = _address_space_that_stops_torch()
    if limit is None:
        pytest.skip("no address-space limit found here under which Python starts but torch cannot be mapped")
    torch.save(_conv_state(), tmp_path / "m.pt")
    proc = _limited("RLIMIT_AS", limit, "convert", "m.pt", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert "out of memory" in line.lower() and "internal error" not in line, line
    assert listing(tmp_path) == ["m.pt"]


# ---- 9. conv kernels with a zero-size dimension ----------------------------------------------------------------


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


# ---- 10. an uninitialized lazy layer in a trusted pickle -------------------------------------------------------


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


# ---- 11. an integer tensor recorded as spectral ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["bake", "inspect"])
def test_an_integer_tensor_recorded_as_spectral_is_a_damaged_file_named_in_the_error(
    tmp_path: Path, command: str
) -> None:
    """A safetensors file whose spectral_cli record names an int32 tensor: exit 3, one line with the file's path."""
    key = f"conv.{SPECTRAL}"
    doc = {"version": "0.1.0", "layers": {key: {"basis": "rfft", "kernel_size": [3, 3], "dtype": "float32"}}}
    path = tmp_path / "int_record.safetensors"
    save_file({key: torch.zeros(2, 4, 3, 3, 2, dtype=torch.int32)}, str(path),
              metadata={"format": "pt", "spectral_cli": json.dumps(doc)})  # fmt: skip
    result = spectral(command, path)
    assert result.exit_code == 3, result.stderr
    line = one_line(result.stderr)
    assert str(path) in line, line
    assert listing(tmp_path) == ["int_record.safetensors"]


# ---- a trusted container that holds a module beside its state dict ----------------------------------------------


def test_a_trusted_container_with_a_module_beside_its_state_dict_converts_and_carries_the_module(
    tmp_path: Path,
) -> None:
    """The verification compares a carried module by its class and its state (a module's == is identity: every
    such container was refused as read back differently)."""
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
