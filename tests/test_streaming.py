"""Streaming safetensors: the same bits as the library's in-memory functions, sharded input and output,
progress, start-up.

Nothing here is timed (the figures are in ``benchmarks/``). Convert splits each kernel into slabs of rows; the
slab size is made tiny here (through :class:`~spectral_cli.files.checkpoint.Io`, the seam every run here gets) so
that every tensor is cut many times, at ragged boundaries.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from models import listing, one_line
from models import spectral as _spectral
from safetensors.torch import load_file, save_file

import spectral_cli.console as console
import spectral_cli.files.safetensors_io as safetensors_io
import spectral_cli.transform.bases as bases
from spectral_cli.files.atomic import Output
from spectral_cli.files.checkpoint import Io
from spectral_cli.files.convert import Options, bake, convert
from spectral_cli.files.report import FileReport
from spectral_cli.files.syscalls import SYSCALLS
from spectral_cli.statedict.records import METADATA_KEY, parse_records
from spectral_cli.statedict.surgery import LayerChange, bake_state_dict, convert_state_dict

SUFFIX = "parametrizations.weight.original"

#: slabs of a few runs, so that small tensors are split many times; early writeback every kilobyte
TINY = Io(slab_bytes=200, writeback_bytes=1000)


@pytest.fixture(autouse=True)
def _tiny_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of a few kernels (the chunk of the bases' products), so that slabs end anywhere."""
    monkeypatch.setattr(bases, "CHUNK_TAPS", 40)


def convert_file(source: Path, output: Path, io: Io = TINY, **options: Any) -> FileReport:
    return convert(source, Options(output=output, **options), io)


def bake_file(source: Path, output: Path, io: Io = TINY, **options: Any) -> FileReport:
    return bake(source, Options(output=output, **options), io)


def spectral(*args: Any) -> Any:
    return _spectral(*args, io=TINY)


def with_syscalls(**calls: Any) -> Io:
    """:data:`TINY` with some system calls replaced."""
    return replace(TINY, syscalls=replace(SYSCALLS, **calls))


def _state_dict() -> dict[str, torch.Tensor]:
    """Conv kernels of every rank, size and float dtype, plus tensors that are copied unchanged."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    nan = randn(6, 5, 3, 3)
    nan[2, 1, 0, 2] = float("nan")
    return {
        "stem.weight": randn(16, 3, 5, 5),
        "stem.bias": randn(16),
        "body.0.weight": randn(37, 16, 3, 3),  # 592 rows: slabs end anywhere
        "body.0.bias": randn(37),
        "body.1.weight": randn(16, 37, 3, 3, dtype=torch.float16),
        "body.2.weight": randn(16, 16, 3, 3, dtype=torch.bfloat16),
        "body.3.weight": randn(8, 16, 4, 6, dtype=torch.float64),  # rectangular, even sizes (Nyquist bins)
        "proj.weight": randn(8, 16, 1, 1),  # 1x1: copied
        "seq.weight": randn(8, 4, 4),  # 1-D, even
        "vol.weight": randn(4, 2, 3, 3, 3),  # 3-D
        "large.weight": randn(3, 2, 23, 24),  # large kernels: the separable (FFT) method
        "long.weight": randn(2, 3, 600, dtype=torch.float16),
        "nan.weight": nan,
        "empty.weight": randn(0, 4, 3, 3),
        "head.weight": randn(10, 64),  # a linear layer: copied
        "steps": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def _bits(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """dtype, shape and raw bytes: equality of these is bitwise equality (NaN included)."""
    return str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_bitwise(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same tensors, bit for bit (a safetensors file lists them by name, whatever the input's order)."""
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert _bits(actual[key]) == _bits(expected[key]), key


def assert_same_errors(streamed: list[tuple[str, LayerChange]], in_memory: Sequence[LayerChange]) -> None:
    """The same changes and errors: a file is converted by the code of the library's state-dict functions."""
    errors = {c.target_key: c for _, c in streamed}
    assert sorted(errors) == sorted(c.target_key for c in in_memory)
    for change in in_memory:
        got = errors[change.target_key]
        assert replace(got, max_error=0.0) == replace(change, max_error=0.0)
        both_nan = math.isnan(got.max_error) and math.isnan(change.max_error)
        assert got.max_error == change.max_error or both_nan, change.target_key


def _records(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
        meta = dict(f.metadata() or {})
    assert meta.get("format") == "pt"
    return parse_records(meta.get(METADATA_KEY), str(path))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(_state_dict(), str(path), metadata={"format": "pt", "note": "kept"})
    return path


# ---- a file == a state dict in memory ----------------------------------------------------------------------


@pytest.mark.parametrize("basis", ["rfft", "rdft"])
def test_streamed_convert_and_bake_give_the_bits_of_the_in_memory_path(checkpoint: Path, basis: str) -> None:
    sd = load_file(str(checkpoint))
    converted = checkpoint.with_name("model.spectral.safetensors")
    result = spectral("convert", checkpoint, "--basis", basis, "-o", converted)
    assert result.exit_code == 0, result.stderr
    expected = convert_state_dict(sd, basis=basis)  # type: ignore[arg-type]
    assert_bitwise(load_file(str(converted)), dict(expected.state_dict))
    assert list(safetensors_io.read_header(converted).entries) == sorted(expected.state_dict)  # by name
    assert _records(converted) == expected.records

    report = convert_file(checkpoint, checkpoint.with_name("again.safetensors"), basis=basis)
    assert_same_errors(report.changed, expected.changed)
    assert math.isnan(next(c.max_error for _, c in report.changed if c.source_key == "nan.weight"))
    assert any("nan.weight" in w for w in report.warnings)

    baked = checkpoint.with_name("model.baked.safetensors")
    assert spectral("bake", converted, "-o", baked).exit_code == 0
    expected_bake = bake_state_dict(expected.state_dict)  # the same bits as the file, and its records
    assert_bitwise(load_file(str(baked)), dict(expected_bake.state_dict))
    assert _records(baked) == {}
    report = bake_file(converted, checkpoint.with_name("again.baked.safetensors"))
    assert_same_errors(report.changed, expected_bake.changed)


def test_slab_size_does_not_change_the_bits(checkpoint: Path) -> None:
    outputs = []
    for size in (36, 200, 4096, 1 << 30):
        out = checkpoint.with_name(f"slab{size}.safetensors")
        convert_file(checkpoint, out, replace(TINY, slab_bytes=size))
        outputs.append(out.read_bytes())
    assert all(o == outputs[0] for o in outputs)


def test_complex_compressai_tensors_bake_streamed_as_in_memory(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {
        "conv.weight_transformed": torch.randn(6, 4, 5, 3, generator=g, dtype=torch.complex64),
        "conv.bias": torch.zeros(6),
    }
    source = tmp_path / "compressai.safetensors"
    save_file(sd, str(source), metadata={"format": "pt"})
    baked = tmp_path / "baked.safetensors"
    assert spectral("bake", source, "-o", baked).exit_code == 0
    assert_bitwise(load_file(str(baked)), dict(bake_state_dict(sd).state_dict))


def test_streaming_needs_no_numpy_and_restores_torch_threads(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch does not depend on numpy: the streaming writer must not call ``Tensor.numpy``."""
    reference = checkpoint.with_name("reference.safetensors")
    convert_file(checkpoint, reference)

    def no_numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Numpy is not available")

    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    out = checkpoint.with_name("no-numpy.safetensors")
    convert_file(checkpoint, out)
    bake_file(out, checkpoint.with_name("no-numpy.baked.safetensors"))
    assert torch.get_num_threads() == threads
    monkeypatch.undo()
    assert out.read_bytes() == reference.read_bytes()


def test_reads_without_preadv_give_the_same_file(checkpoint: Path) -> None:
    """Where the system has no preadv (Windows), tensors are read by seek and read under a lock."""
    reference = checkpoint.with_name("reference.safetensors")
    convert_file(checkpoint, reference)
    out = checkpoint.with_name("seek.safetensors")
    no_preadv = with_syscalls(preadv=None)
    convert_file(checkpoint, out, no_preadv)
    assert out.read_bytes() == reference.read_bytes()
    bake_file(out, checkpoint.with_name("seek.baked.safetensors"), no_preadv)


def _refuse_copy(*args: Any) -> int:
    raise OSError(18, "Invalid cross-device link")


@pytest.mark.parametrize("copy", [SYSCALLS.copy_file_range, _refuse_copy, None], ids=["kernel", "fallback", "none"])
def test_untouched_tensors_are_copied_byte_for_byte(checkpoint: Path, copy: Any) -> None:
    """In the kernel (copy_file_range), by hand where it is refused (another file system, an old kernel: EXDEV),
    or where the system has none."""
    reference = checkpoint.with_name("reference.safetensors")
    convert_file(checkpoint, reference)
    out = checkpoint.with_name("out.safetensors")
    convert_file(checkpoint, out, with_syscalls(copy_file_range=copy))
    assert out.read_bytes() == reference.read_bytes()
    got, original = load_file(str(out)), load_file(str(checkpoint))
    for key in ("stem.bias", "proj.weight", "head.weight", "steps", "mask"):
        assert _bits(got[key]) == _bits(original[key])


@pytest.mark.parametrize(
    "pieces",
    [[(0, 0, 2), (16, 4, 8)], [(0, 0, 4), (8, 2, 8)], [(0, 0, 4)], [(0, 0, 8), (36, 0, 1)]],
    ids=["gap", "overlap", "short", "outside"],
)
def test_pieces_that_do_not_cover_the_tensor_are_refused(tmp_path: Path, pieces: list[tuple[int, int, int]]) -> None:
    from spectral_cli.statedict.keys import TensorSpec

    data = torch.arange(8, dtype=torch.float32)
    specs = {"w": TensorSpec((8,), "float32")}
    target = tmp_path / "out.safetensors"

    def write(given: list[tuple[int, int, int]]) -> None:
        def produce(name: str) -> Iterator[tuple[int, torch.Tensor]]:
            yield from [(o, data[a:b]) for o, a, b in given]

        with Output(target) as out:
            safetensors_io.write_safetensors(out.file(), specs, {}, produce)
            out.commit()

    with pytest.raises(ValueError, match="w: "):
        write(pieces)
    assert listing(tmp_path) == []
    write([(16, 4, 8), (0, 0, 4)])  # any order
    assert torch.equal(load_file(str(target))["w"], data)


# ---- sharded input and output ----------------------------------------------------------------------------------


def _write_shards(directory: Path, sd: dict[str, torch.Tensor], groups: list[list[str]]) -> Path:
    directory.mkdir()
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: sd[k] for k in keys}, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total, "origin": "test"}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _read_dir(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(index["weight_map"].values()):
        part = load_file(str(directory / shard))
        assert all(index["weight_map"][k] == shard for k in part)
        tensors.update(part)
    return index, tensors


GROUPS = [
    ["stem.weight", "stem.bias", "body.0.weight"],
    ["body.0.bias", "body.1.weight", "body.2.weight", "proj.weight"],
    ["body.3.weight", "seq.weight", "vol.weight", "head.weight", "steps", "mask", "large.weight", "long.weight"],
]


def test_sharded_directory_converts_shard_by_shard_with_its_index_rewritten(tmp_path: Path) -> None:
    sd = {k: v for k, v in _state_dict().items() if k not in ("nan.weight", "empty.weight")}
    source = _write_shards(tmp_path / "shards", sd, GROUPS)
    result = spectral("convert", source)
    assert result.exit_code == 0, result.stderr
    target = tmp_path / "shards.spectral"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())
    index, tensors = _read_dir(target)
    expected = convert_state_dict(sd)
    assert sorted(tensors) == sorted(expected.state_dict)
    for key, value in expected.state_dict.items():
        assert _bits(tensors[key]) == _bits(value), key
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["origin"] == "test"
    for i, keys in enumerate(GROUPS):  # each shard keeps its tensors, renamed, and the records of its own
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        renamed = {k.removesuffix(".weight") + f".{SUFFIX}" if k.removesuffix(".weight") + f".{SUFFIX}" in
                   expected.records else k for k in keys}  # fmt: skip
        assert {k for k, v in index["weight_map"].items() if v == name} == renamed
        assert _records(target / name) == {k: r for k, r in expected.records.items() if k in renamed}
    # and back, shard by shard
    assert spectral("bake", target, "-o", tmp_path / "baked").exit_code == 0
    index, baked = _read_dir(tmp_path / "baked")
    assert sorted(baked) == sorted(sd)
    for key, value in bake_state_dict(expected.state_dict).state_dict.items():
        assert _bits(baked[key]) == _bits(value), key
    for key, value in sd.items():
        assert torch.allclose(baked[key].double(), value.double(), rtol=0, atol=1e-2 if value.dtype in (
            torch.float16, torch.bfloat16) else 1e-5), key  # fmt: skip


def test_max_shard_size_writes_shards_within_the_limit_and_bakes_back(checkpoint: Path) -> None:
    out = checkpoint.parent / "out"
    limit = 4000
    result = spectral("convert", checkpoint, "--max-shard-size", f"{limit}B", "-o", out)
    assert result.exit_code == 0, result.stderr
    index, tensors = _read_dir(out)
    shards = sorted(p for p in out.iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) >= 3
    assert [p.name for p in shards] == [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for shard in shards:
        part = load_file(str(shard))
        data = sum(t.numel() * t.element_size() for t in part.values())
        assert data <= limit or len(part) == 1, (shard.name, data)  # only a single larger tensor may exceed it
    assert any(len(load_file(str(s))) == 1 and s.stat().st_size > limit for s in shards)  # stem: 6.4 KB alone
    expected = convert_state_dict(load_file(str(checkpoint)))
    assert sorted(tensors) == sorted(expected.state_dict)
    for key, value in expected.state_dict.items():
        assert _bits(tensors[key]) == _bits(value), key
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    merged: dict[str, Any] = {}
    for shard in shards:
        merged.update(_records(shard))
    assert merged == expected.records
    # bake back into one file, and into shards again
    baked = checkpoint.with_name("baked.safetensors")
    assert spectral("bake", out, "-o", baked).exit_code == 0, "sharded input, one output file"
    original = load_file(str(checkpoint))
    back = load_file(str(baked))
    assert sorted(back) == sorted(original)
    assert_bitwise(back, {k: bake_state_dict(expected.state_dict).state_dict[k] for k in back})
    assert spectral("bake", out, "--max-shard-size", "3KB", "-o", checkpoint.parent / "baked-shards").exit_code == 0
    _, back_sharded = _read_dir(checkpoint.parent / "baked-shards")
    assert_bitwise({k: back_sharded[k] for k in back}, back)


def test_shards_are_not_written_as_a_torch_file_and_torch_files_are_not_sharded(tmp_path: Path) -> None:
    sd = {k: v for k, v in _state_dict().items() if k not in ("nan.weight", "empty.weight")}
    source = _write_shards(tmp_path / "shards", sd, GROUPS)
    result = spectral("convert", source, "-o", tmp_path / "model.pt")
    assert result.exit_code == 5 and "safetensors" in one_line(result.stderr)
    torch.save(sd, tmp_path / "model.bin")
    result = spectral("convert", tmp_path / "model.bin", "--max-shard-size", "1MB", "-o", tmp_path / "out")
    assert result.exit_code == 5 and "--max-shard-size" in one_line(result.stderr)
    assert listing(tmp_path) == ["model.bin", "shards"]


def test_a_large_max_shard_size_still_writes_a_directory_with_an_index(checkpoint: Path) -> None:
    out = checkpoint.parent / "one"
    assert spectral("convert", checkpoint, "--max-shard-size", "2GB", "-o", out).exit_code == 0
    assert listing(out) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]


# ---- damaged shard indexes -------------------------------------------------------------------------------------


def _lie_missing_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["stem.weight"] = "model-00009-of-00009.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _lie_wrong_shard(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["stem.weight"] = "model-00002-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _lie_extra_key(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _lie_outside(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["stem.weight"] = "../model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _truncate_shard(d: Path) -> None:
    shard = d / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])


def _not_json(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')


def _no_weight_map(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')


def _two_indexes(d: Path) -> None:
    (d / "other.safetensors.index.json").write_text((d / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize(
    "damage",
    [
        _lie_missing_shard,
        _lie_wrong_shard,
        _lie_extra_key,
        _lie_outside,
        _truncate_shard,
        _not_json,
        _no_weight_map,
        _two_indexes,
    ],
)
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_lying_or_truncated_shards_exit_3_with_one_line(tmp_path: Path, damage: Any, command: str) -> None:
    sd = {k: v for k, v in _state_dict().items() if k not in ("nan.weight", "empty.weight")}
    source = _write_shards(tmp_path / "shards", sd, GROUPS)
    damage(source)
    result = spectral(command, source)
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert one_line(result.stderr).startswith("error:")
    assert listing(tmp_path) == ["shards"]


# ---- progress and quiet runs -----------------------------------------------------------------------------------


def test_progress_is_off_when_stderr_is_not_a_terminal(checkpoint: Path) -> None:
    with console.progress(True, "converting") as progress:  # pytest captures stderr: not a terminal
        assert progress is None
    for extra in ([], ["-q"], ["--json"]):
        out = checkpoint.with_name(f"p{len(extra)}{''.join(extra)}.safetensors")
        result = spectral("convert", checkpoint, "-o", out, *extra)
        assert result.exit_code == 0, result.stderr
        assert "converting" not in result.stderr and "━" not in result.stderr and "\r" not in result.stderr
        if extra == ["--json"]:
            assert json.loads(result.stdout)["written"] is True


def test_progress_bar_on_a_terminal_only_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    buffer = io.StringIO()
    monkeypatch.setattr(console, "stderr", lambda: Console(file=buffer, force_terminal=True, width=80))
    with console.progress(False, "converting") as progress:  # -q or --json
        assert progress is None
    with console.progress(True, "converting") as progress:  # done within SHOW_AFTER: no bar
        assert progress is not None
        progress(100, 100, 2, 2)
    assert buffer.getvalue() == ""
    monkeypatch.setattr(console, "SHOW_AFTER", 0.0)
    with console.progress(True, "converting") as progress:
        assert progress is not None
        progress(50, 100, 1, 2)
        progress(100, 100, 2, 2)
    assert "converting" in buffer.getvalue() and "2/2 tensors" in buffer.getvalue()


def test_streamed_convert_reports_progress_in_bytes_and_tensors(checkpoint: Path) -> None:
    calls: list[tuple[int, int, int, int]] = []
    convert_file(checkpoint, checkpoint.with_name("progress.safetensors"),
                 progress=lambda d, t, i, n: calls.append((d, t, i, n)))  # fmt: skip
    written = load_file(str(checkpoint.with_name("progress.safetensors")))
    done = [d for d, *_ in calls]
    assert done == sorted(done) and len({t for _, t, _, _ in calls}) == 1
    total = calls[-1][1]
    assert done[-1] == total == sum(t.numel() * t.element_size() for t in written.values())
    assert len(calls) > len(written)  # bytes reported piece by piece, not only when a tensor is done
    counted = [i for *_, i, _ in calls]  # each tensor counted once, when done
    assert {n for *_, n in calls} == {len(written)} and counted[-1] == len(written)
    assert all(b - a in (0, 1) for a, b in zip([0, *counted], counted, strict=False))


# ---- start-up: no torch for --help and for inspect of a safetensors file ---------------------------------------


def _imports_torch(*args: str) -> tuple[bool, str]:
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['spectral', *{list(args)!r}]\n"
        "try:\n    runpy.run_module('spectral_cli', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "sys.stderr.write(f'\\nTORCH={\"torch\" in sys.modules} EXIT={code}\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert "EXIT=0" in proc.stderr or "EXIT=None" in proc.stderr, proc.stderr
    return "TORCH=True" in proc.stderr, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("inspect_json", [False, True])
def test_help_and_inspect_of_safetensors_do_not_import_torch(tmp_path: Path, inspect_json: bool) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_state_dict(), str(path), metadata={"format": "pt"})
    convert_file(path, tmp_path / "m.spectral.safetensors")
    imported, _ = _imports_torch("--help")
    assert not imported
    for file in (path, tmp_path / "m.spectral.safetensors"):
        imported, out = _imports_torch("inspect", str(file), "--all", *(["--json"] if inspect_json else []))
        assert not imported
        assert "body.0" in out


def test_inspect_reads_only_the_header(tmp_path: Path) -> None:
    """A header that describes 10 GiB over a sparse hole: listed without reading (or needing) the data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    n = 4 * 1280 * 1280 * 9
    for i in range(190):
        header[f"block{i}.weight"] = {"dtype": "F32", "shape": [1280, 1280, 3, 3], "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
    os.truncate(path, 8 + len(text) + offset)
    assert path.stat().st_size > 10 * 2**30
    try:
        result = spectral("inspect", path, "--all", "--json")
    finally:
        path.unlink()  # sparse, but 10 GiB to anyone who copies pytest's temporary directories
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["totals"]["layers"] == 190 and doc["totals"]["bytes"] == offset


@pytest.fixture(autouse=True)
def _no_stray_threads() -> Iterator[None]:
    yield
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("spectral")]


def test_synced_while_writing_and_the_same_file(checkpoint: Path) -> None:
    reference = checkpoint.with_name("reference.safetensors")
    convert_file(checkpoint, reference, replace(TINY, writeback_bytes=1 << 40))
    calls: list[int] = []
    early = checkpoint.with_name("early.safetensors")
    convert_file(checkpoint, early, with_syscalls(fdatasync=lambda fd: calls.append(fd) or os.fsync(fd)))
    assert len(calls) >= 1  # more when each ends before the next is due: under load, one may last the whole write
    assert early.read_bytes() == reference.read_bytes()


def test_without_a_thread_for_early_writeback_the_file_is_still_written(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a tight address-space cap a new thread may not start: writing goes on, the final fsync does it all."""
    reference = checkpoint.with_name("reference.safetensors")
    convert_file(checkpoint, reference)
    started = safetensors_io.threading.Thread.start

    def refuse(thread: Any) -> None:
        if thread.name == "spectral-writeback":
            raise RuntimeError("can't start new thread")
        started(thread)

    monkeypatch.setattr(safetensors_io.threading.Thread, "start", refuse)
    capped = checkpoint.with_name("capped.safetensors")
    assert spectral("convert", capped.with_name(checkpoint.name), "-o", capped).exit_code == 0
    assert capped.read_bytes() == reference.read_bytes()
