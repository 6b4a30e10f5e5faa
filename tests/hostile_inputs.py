"""The registry of hostile inputs: every kind of broken, lying or malicious input, and what the command line must
answer to it.

Each :class:`Kind` names how to build the input (``build(work) -> path``, written into an empty working directory),
the exit code of each command it applies to (``spectral_cli/cli.py``: 1 failed write, 3 unreadable input,
5 refused, 6 nothing to do, 0 done), a fragment the error line must hold, and the fault injected while writing.
``tests/test_errors.py`` runs every kind with every command and checks the whole contract; other tests take
single builders from :data:`KINDS` by name.

A malicious pickle's ``__reduce__`` creates :data:`MARKER` beside the working directory: it never appears.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from models import (
    Evil,
    after_calls,
    copy_samples,
    failing_pwrite,
    faulty,
    make_samples,
    raising,
    read,
    rel_err,
    signal_self,
)
from torch import nn
from typer.testing import Result

from spectral_cli import bake_state_dict
from spectral_cli.files.checkpoint import Io
from spectral_cli.files.convert import convert_file
from spectral_cli.files.syscalls import SYSCALLS

MARKER = "pwned"


# ---- input builders: each takes the working directory and returns the input path ------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _sample(name: str) -> Callable[[Path], Path]:
    def build(work: Path) -> Path:
        copy_samples(work, [name])
        return work / name

    return build


def conv_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "head.weight": torch.randn(2, 4, 5, 5, generator=g),
    }


def _safetensors(header: Any, data: bytes, *, declared: int | None = None) -> bytes:
    """A safetensors file with this (possibly lying) header; ``declared`` overrides the header length."""
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


def _entry(begin: int, end: int, shape: list[int] | None = None, dtype: str = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape or [2, 2, 3, 3], "data_offsets": [begin, end]}


_KERNEL = 2 * 2 * 3 * 3 * 4  # bytes of one float32 (2, 2, 3, 3) kernel


def _lying(name: str, header: Any, data: bytes, declared: int | None = None) -> Callable[[Path], Path]:
    return lambda work: _write(work / f"{name}.safetensors", _safetensors(header, data, declared=declared))


def _missing(work: Path) -> Path:
    return work / "nope.pt"


def _directory(work: Path) -> Path:
    (work / "ckpt.pt").mkdir()
    (work / "ckpt.pt" / "readme.txt").write_text("not a checkpoint")
    return work / "ckpt.pt"


def _empty(work: Path) -> Path:
    return _write(work / "empty.pt", b"")


def _random_bytes(work: Path) -> Path:
    return _write(work / "random.safetensors", random.Random(0).randbytes(4096))


def _truncated_safetensors_header(work: Path) -> Path:
    data = (make_samples.HERE / "balle.safetensors").read_bytes()
    return _write(work / "head.safetensors", data[:200])


def _truncated_safetensors_data(work: Path) -> Path:
    data = (make_samples.HERE / "balle.safetensors").read_bytes()
    return _write(work / "cut.safetensors", data[: len(data) - 1000])


def _truncated_torch(work: Path) -> Path:
    data = (make_samples.HERE / "balle.pt").read_bytes()
    return _write(work / "cut.pt", data[: len(data) * 2 // 3])


def _zip_not_torch(work: Path) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"not a pickle at all")
        archive.writestr("archive/version", "3\n")
    return _write(work / "archive.pt", buffer.getvalue())


def _cut_sample(sample: str, name: str, keep: Callable[[int], int]) -> Callable[[Path], Path]:
    """The first ``keep(size)`` bytes of a sample checkpoint, as ``name``."""

    def build(work: Path) -> Path:
        data = (make_samples.HERE / sample).read_bytes()
        return _write(work / name, data[: keep(len(data))])

    return build


def _empty_directory(work: Path) -> Path:
    (work / "ckpt.pt").mkdir()
    return work / "ckpt.pt"


def _zip_of_a_text_file(work: Path) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    return _write(work / "archive.pt", buffer.getvalue())


def _json_file(work: Path) -> Path:
    return _write(work / "config.pt", json.dumps({"layers": [1, 2, 3], "lr": 1e-4}).encode())


def _no_state_dict(work: Path) -> Path:
    torch.save({"epoch": 3, "notes": "no tensors here"}, work / "meta.pt")
    return work / "meta.pt"


def _header_missing_its_brace(work: Path) -> Path:
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    return _write(work / "bad.safetensors", len(header).to_bytes(8, "little") + header + bytes(8))


class _EvilEval:
    """Unpickling this calls ``eval`` on a source that creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))


def _malicious_zip(work: Path) -> Path:
    path = work / "evil.pt"
    torch.save({"state_dict": conv_state(), "payload": Evil(work.parent / MARKER)}, path)
    return path


def _malicious_legacy(work: Path) -> Path:
    path = work / "evil.pth"
    path.write_bytes(pickle.dumps({"conv.weight": _EvilEval(work.parent / MARKER)}, protocol=2))
    return path


def _pickled_module(work: Path) -> Path:
    torch.manual_seed(0)
    path = work / "module.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)), path)
    return path


def _pickled_module_with_a_head(work: Path) -> Path:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    path = work / "module.pt"
    torch.save(module, path)
    return path


def _malicious_beside_a_conv1d_state_dict(work: Path) -> Path:
    path = work / "evil.pt"
    state = make_samples.build("conv1d").state_dict()
    torch.save({"state_dict": state, "payload": Evil(work.parent / MARKER)}, path)
    return path


def _malicious_bare_legacy(work: Path) -> Path:
    """A bare pickle stream (no zip): read by torch's legacy loader."""
    path = work / "evil.pth"
    path.write_bytes(pickle.dumps(Evil(work.parent / MARKER), protocol=2))
    return path


def _malicious_state_dict_entry(work: Path) -> Path:
    path = work / "evil.bin"
    torch.save({"conv.weight": torch.zeros(2, 2, 3, 3), "conv.bias": Evil(work.parent / MARKER)}, path)
    return path


def _torchscript(work: Path) -> Path:
    path = work / "scripted.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated, but such files exist
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))), str(path))
    return path


def _no_conv(work: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4), nn.Conv2d(4, 4, 1))
    torch.save(model.state_dict(), work / "mlp.pt")
    return work / "mlp.pt"


def _odd_conv(make: Callable[[torch.Tensor], torch.Tensor], name: str) -> Callable[[Path], Path]:
    """A state dict whose only conv kernel is of a dtype or layout that cannot be transformed."""

    def build(work: Path) -> Path:
        weight = make(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)))
        torch.save({"conv.weight": weight, "conv.bias": torch.zeros(4)}, work / f"{name}.pt")
        return work / f"{name}.pt"

    return build


def quantize(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(w, 0.05, 0, torch.qint8)


def _complex_safetensors(work: Path) -> Path:
    from safetensors.torch import save_file

    weight = torch.randn(4, 3, 3, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    save_file({"conv.weight": weight}, str(work / "complex.safetensors"))
    return work / "complex.safetensors"


def _nan_state() -> dict[str, torch.Tensor]:
    state = conv_state()
    state["conv.weight"][1, 2, 0, 1] = float("nan")
    state["head.weight"][0, 3, 4, 4] = float("inf")
    return state


def _nan_weights(work: Path) -> Path:
    torch.save(_nan_state(), work / "nan.pt")
    return work / "nan.pt"


def _nan_spectral(work: Path) -> Path:
    torch.save(_nan_state(), work / "nan_src.pt")
    convert_file(work / "nan_src.pt", output=work / "nan.spectral.pt")
    (work / "nan_src.pt").unlink()
    return work / "nan.spectral.pt"


def _spectral_safetensors(work: Path) -> Path:
    copy_samples(work, ["balle.safetensors"])
    convert_file(work / "balle.safetensors", output=work / "balle.spectral.safetensors")
    (work / "balle.safetensors").unlink()
    return work / "balle.spectral.safetensors"


def _damaged_record(work: Path) -> Path:
    from safetensors.torch import save_file

    record = {"layers": {"conv.parametrizations.weight.original": {"basis": "fft", "kernel_size": [3, 3]}}}
    tensors = {"conv.parametrizations.weight.original": torch.zeros(2, 4, 3, 3, 2)}
    save_file(tensors, str(work / "record.safetensors"), metadata={"format": "pt", "spectral_cli": json.dumps(record)})
    return work / "record.safetensors"


def _record_does_not_fit(work: Path) -> Path:
    source = _spectral_safetensors(work)
    text = source.read_bytes()
    (n,) = struct.unpack("<Q", text[:8])
    header = json.loads(text[8 : 8 + n])
    records = json.loads(header["__metadata__"]["spectral_cli"])
    for record in records["layers"].values():
        record["kernel_size"] = [3, 3]  # the tensors hold 5x5 kernels
    header["__metadata__"]["spectral_cli"] = json.dumps(records)
    new = json.dumps(header).encode()
    return _write(source, struct.pack("<Q", len(new)) + new + text[8 + n :])


def _output_taken(name: str) -> Callable[[Path], Path]:
    """A sample, and a file already where the output is to go (which must survive)."""

    def build(work: Path) -> Path:
        (work / "taken.pt").write_bytes(b"someone's only copy")
        return _sample(name)(work)

    return build


def _control_characters(work: Path) -> Path:
    return work / "line\nbreak\x1b[2J.pt"


# ---- headers that lie in ways safetensors itself refuses ------------------------------------------------------

_WEIGHT = 2 * 4 * 3 * 3 * 4  # bytes of the float32 (2, 4, 3, 3) kernels below


def _raw_header(name: str, text: bytes, data: bytes) -> Callable[[Path], Path]:
    return lambda work: _write(work / f"{name}.safetensors", struct.pack("<Q", len(text)) + text + data)


def _shape(name: str, shape: str, offsets: str = f"[0,{_WEIGHT}]", data: int = _WEIGHT) -> Callable[[Path], Path]:
    text = b'{"conv.weight":{"dtype":"F32","shape":%s,"data_offsets":%s}}' % (shape.encode(), offsets.encode())
    return _raw_header(name, text, bytes(data))


_ENTRY = b'{"dtype":"F32","shape":[2,4,3,3],"data_offsets":[0,%d]}' % _WEIGHT


# ---- records that lie ------------------------------------------------------------------------------------------


def _recorded(name: str, record: Any, stored: torch.Tensor) -> Callable[[Path], Path]:
    """A safetensors file whose one spectral tensor is ``stored``, recorded with ``record``."""

    def build(work: Path) -> Path:
        from safetensors.torch import save_file

        key = "conv.parametrizations.weight.original"
        doc = {"version": "0.1.0", "layers": {key: record}}
        path = work / f"{name}.safetensors"
        save_file({key: stored}, str(path), metadata={"format": "pt", "spectral_cli": json.dumps(doc)})
        return path

    return build


def _record(kernel_size: Any, dtype: str = "float32") -> dict[str, Any]:
    return {"basis": "rfft", "kernel_size": kernel_size, "dtype": dtype}


_RFFT = (2, 4, 3, 3, 2)


def _record_in_torch_file(work: Path) -> Path:
    from spectral_cli import convert_state_dict

    state = convert_state_dict(conv_state()).state_dict
    state._metadata["spectral_cli"]["layers"]["conv.parametrizations.weight.original"]["kernel_size"] = [0, 3]
    torch.save(state, work / "record.pt")
    return work / "record.pt"


# ---- limits --------------------------------------------------------------------------------------------------


def _deeply_nested(work: Path) -> Path:
    """A torch file whose container nests 20,000 lists (written by hand: torch.save itself cannot)."""
    base = work / "base.pt"
    torch.save({"state_dict": conv_state(), "deep": [1]}, base)
    with zipfile.ZipFile(base) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    base.unlink()
    pickled = next(n for n in members if n.endswith("data.pkl"))
    shallow = pickle.dumps([1], protocol=2)[2:-1]  # EMPTY_LIST, BINPUT, BININT1, APPEND
    assert members[pickled].count(shallow[:1]) and b"K\x01a" in members[pickled]
    start = members[pickled].rindex(b"]", 0, members[pickled].index(b"K\x01a"))
    end = members[pickled].index(b"K\x01a") + 3
    members[pickled] = members[pickled][:start] + b"]" * 20_000 + b"a" * 19_999 + members[pickled][end:]
    path = work / "deep.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _fifo(work: Path) -> Path:
    os.mkfifo(work / "model.pt")
    return work / "model.pt"


def _fifo_index(work: Path) -> Path:
    (work / "shards").mkdir()
    os.mkfifo(work / "shards" / "model.safetensors.index.json")
    return work / "shards"


def _device(work: Path) -> Path:
    (work / "model.pt").symlink_to("/dev/zero")
    return work / "model.pt"


def _dangling_output(work: Path) -> Path:
    (work / "out.pt").symlink_to(work / "nowhere.pt")
    return _sample("balle.pt")(work)


def _fifo_output(work: Path) -> Path:
    """A FIFO where the output would go (standing for any device, which an output must never replace)."""
    os.mkfifo(work / "out.pt")
    return _sample("balle.pt")(work)


def _symlinked_shards(work: Path) -> Path:
    """``ckpt/`` holds an index and symlinks to shards that live in ``store/``."""
    from safetensors.torch import save_file

    (work / "store").mkdir()
    (work / "ckpt").mkdir()
    state = conv_state()
    groups = {"model-00001-of-00002.safetensors": ["conv.weight", "conv.bias"],
              "model-00002-of-00002.safetensors": ["head.weight"]}  # fmt: skip
    for shard, keys in groups.items():
        save_file({k: state[k] for k in keys}, str(work / "store" / shard), metadata={"format": "pt"})
        (work / "ckpt" / shard).symlink_to(work / "store" / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in groups.items() for k in keys}}
    (work / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    return work / "ckpt"


def _usage(option: str, value: str) -> Kind:
    return Kind(_sample("balle.safetensors"), {"convert": 2}, args={"convert": [option, value]}, says=option)


# ---- faults injected while writing, through the system calls of Io ------------------------------------------

#: ``fault(work)``: the Io of the run
Fault = Callable[[Path], Io]


def disk_full(work: Path) -> Io:
    return faulty(pwrite=failing_pwrite(20_000, raising(OSError(28, "No space left on device"))))


def io_error_after(nbytes: int) -> Fault:
    """An I/O error once ``nbytes`` are written (past a safetensors header: in the middle of a tensor)."""
    return lambda work: faulty(pwrite=failing_pwrite(nbytes, raising(OSError(5, "Input/output error"))))


def replace_refused(work: Path) -> Io:
    """The rename of the finished output into place is refused."""

    def fail(*args: Any) -> None:
        raise PermissionError(13, "Permission denied", str(args[1]))

    return faulty(replace=fail)


def signal_while_writing(signum: int) -> Fault:
    """The process receives ``signum`` in the middle of writing."""
    return lambda work: faulty(pwrite=failing_pwrite(20_000, signal_self(signum)))


def _io_error_in_copy_range(work: Path) -> Io:
    assert SYSCALLS.copy_file_range is not None
    return faulty(copy_file_range=after_calls(2, SYSCALLS.copy_file_range, OSError(5, "Input/output error")))


def _io_error_in_background_writeback(work: Path) -> Io:
    """The early fdatasync (on its own thread) fails: reported once by the kernel, so it must be raised by us. The
    first one fails: how many start depends on how soon each ends (under load one may last the whole write)."""
    return faulty(writeback_bytes=1, fdatasync=after_calls(0, os.fsync, OSError(5, "Input/output error")))


def _read_only_directory(work: Path) -> Io:
    """``work/ro`` is made read-only; where that does not bind (root), creating in it is refused instead."""
    readonly = work / "ro"
    readonly.chmod(0o555)

    def refuse(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Path, *args: Any) -> Any:
            if readonly.resolve() in (Path(path).resolve(), Path(path).parent.resolve()):  # in it, or O_TMPFILE
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args)

        return call

    return faulty(open=refuse(SYSCALLS.open), mkdir=refuse(SYSCALLS.mkdir))


def _with_readonly_dir(build: Callable[[Path], Path]) -> Callable[[Path], Path]:
    def wrapped(work: Path) -> Path:
        (work / "ro").mkdir()
        return build(work)

    return wrapped


# ---- the matrix -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of hostile input: how to build it, the exit code of each command, and what else to do."""

    build: Callable[[Path], Path]
    codes: dict[str, int]
    #: extra arguments per command; ``{out}`` is replaced by the working directory
    args: dict[str, list[str]] = field(default_factory=dict)
    fault: Fault | None = None
    #: the error message must contain this
    says: str = ""
    #: a successful run's stdout must contain this
    prints: str = ""
    #: checks of a successful run (exit 0) that writes an output
    after: Callable[[Path, Result], None] | None = None
    #: also run through a real ``python -m spectral_cli`` process with these commands
    subprocess: tuple[str, ...] = ()


ALL = ("convert", "bake", "inspect")


def _failed_write(build: Callable[[Path], Path], command: str, output: list[str], fault: Fault, says: str) -> Kind:
    """A run of ``command`` whose write to ``-o output`` fails under ``fault``: exit 1, the failure named."""
    return Kind(build, {command: 1}, args={command: ["-o", *output]}, fault=fault, says=says)


def _codes(code: int, commands: tuple[str, ...] = ALL) -> dict[str, int]:
    return dict.fromkeys(commands, code)


#: nothing to convert, nothing to bake; ``inspect --all`` lists the file (and crashes on nothing)
NOTHING = {"convert": 6, "bake": 6, "inspect": 0}
INSPECT_ALL = {"inspect": ["--all"]}


def _check_nan_convert(work: Path, result: Result) -> None:
    state = _nan_state()
    converted = read(work / "out.pt")
    assert torch.equal(converted["conv.bias"], state["conv.bias"])
    _check_nan_baked(bake_state_dict(converted).state_dict, state)
    assert "conv.weight" in result.stderr and "head.weight" in result.stderr


def _check_nan_bake(work: Path, result: Result) -> None:
    _check_nan_baked(read(work / "out.pt"), _nan_state())


def _check_nan_baked(baked: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Only the kernels that hold NaN or Inf are lost to them; every other kernel comes back."""
    for key in ("conv.weight", "head.weight"):
        original, back = state[key], baked[key]
        bad = ~torch.isfinite(original).flatten(2).all(-1)
        assert bad.sum() == 1 and not torch.isfinite(back[bad]).any()
        assert rel_err(back[~bad], original[~bad]) <= 1e-6, key


KINDS: dict[str, Kind] = {
    "missing-path": Kind(_missing, _codes(3), says="no such file", subprocess=("inspect",)),
    "directory": Kind(_directory, _codes(3), says="directory"),
    "empty-directory": Kind(_empty_directory, _codes(3), says="directory"),
    "empty-file": Kind(_empty, _codes(3), says="empty.pt"),
    "random-bytes": Kind(_random_bytes, _codes(3)),
    "truncated-safetensors-header": Kind(_truncated_safetensors_header, _codes(3), says="truncated"),
    "truncated-safetensors-data": Kind(_truncated_safetensors_data, _codes(3), says="truncated"),
    "safetensors-offsets-beyond-file": Kind(
        _lying("beyond", {"a.weight": _entry(0, _KERNEL), "b.weight": _entry(_KERNEL, 2 * _KERNEL)}, bytes(_KERNEL)),
        _codes(3),
        says="truncated",
        subprocess=("inspect",),
    ),
    "safetensors-overlapping-offsets": Kind(
        _lying("overlap", {"a.weight": _entry(0, _KERNEL), "b.weight": _entry(16, _KERNEL + 16)}, bytes(_KERNEL + 16)),
        _codes(3),
        says="overlaps",
    ),
    "safetensors-gap": Kind(
        _lying(
            "gap",
            {"a.weight": _entry(0, _KERNEL), "b.weight": _entry(_KERNEL + 8, 2 * _KERNEL + 8)},
            bytes(2 * _KERNEL + 8),
        ),
        _codes(3),
        says="gap",
    ),
    "safetensors-size-not-dtype-times-shape": Kind(
        _lying("size", {"a.weight": _entry(0, _KERNEL - 4)}, bytes(_KERNEL - 4)), _codes(3), says="lies"
    ),
    "safetensors-unknown-dtype": Kind(
        _lying("dtype", {"a.weight": _entry(0, _KERNEL, dtype="Q4_K")}, bytes(_KERNEL)), _codes(3), says="Q4_K"
    ),
    "safetensors-header-longer-than-file": Kind(
        _lying("long", {"a.weight": _entry(0, _KERNEL)}, bytes(_KERNEL), declared=10**6), _codes(3), says="header"
    ),
    "safetensors-header-not-json": Kind(
        _lying("notjson", b'{"a.weight": {"dtype": "F32", nope}}', bytes(8)), _codes(3), says="not JSON"
    ),
    "safetensors-header-nested-too-deep": Kind(
        _lying("deep", b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", b""), _codes(3), says="not JSON"
    ),
    "safetensors-offset-1e400": Kind(
        _lying("inf", b'{"a.weight":{"dtype":"F32","shape":[2,2,3,3],"data_offsets":[0,1e400]}}', bytes(_KERNEL)),
        _codes(3),
    ),
    "safetensors-metadata-not-str-to-str": Kind(
        _lying("meta", {"__metadata__": {"format": "pt", "step": 12}, "a.weight": _entry(0, _KERNEL)}, bytes(_KERNEL)),
        _codes(3),
        says="__metadata__",
    ),
    "safetensors-spectral-record-damaged": Kind(_damaged_record, _codes(3), says="record"),
    "safetensors-spectral-record-does-not-fit": Kind(_record_does_not_fit, _codes(3), says="does not fit"),
    "truncated-torch-zip": Kind(_truncated_torch, _codes(3)),
    "truncated-torch-zip-at-half": Kind(
        _cut_sample("balle.pt", "truncated.pt", lambda n: n // 2), _codes(3), says="truncated.pt"
    ),
    "truncated-safetensors-data-at-half": Kind(
        _cut_sample("balle.safetensors", "truncated.safetensors", lambda n: n // 2), _codes(3), says="truncated"
    ),
    "safetensors-header-cut-at-100-bytes": Kind(
        _cut_sample("balle.safetensors", "header.safetensors", lambda n: 100), _codes(3), says="header.safetensors"
    ),
    "safetensors-header-missing-its-brace": Kind(_header_missing_its_brace, _codes(3), says="bad.safetensors"),
    "random-bytes-named-pt": Kind(
        lambda work: _write(work / "random.pt", random.Random(0).randbytes(4096)), _codes(3), says="random.pt"
    ),
    "zip-not-a-torch-checkpoint": Kind(_zip_not_torch, _codes(3)),
    "zip-of-a-text-file": Kind(_zip_of_a_text_file, _codes(3), says="archive.pt"),
    "json-file": Kind(_json_file, _codes(3), says="config.pt"),
    "torch-file-without-a-state-dict": Kind(_no_state_dict, _codes(3), says="meta.pt"),
    "malicious-pickle-zip": Kind(_malicious_zip, _codes(5), says="--trust-pickle", subprocess=("convert",)),
    "malicious-pickle-legacy": Kind(_malicious_legacy, _codes(5), says="--trust-pickle"),
    "malicious-pickle-beside-a-conv1d-state-dict": Kind(_malicious_beside_a_conv1d_state_dict, _codes(5)),
    "malicious-pickle-bare-legacy-stream": Kind(_malicious_bare_legacy, _codes(5)),
    "malicious-pickle-as-a-state-dict-entry": Kind(_malicious_state_dict_entry, _codes(5)),
    "pickled-module-without-trust": Kind(_pickled_module, _codes(5), says="--trust-pickle"),
    "pickled-module-with-a-linear-head-without-trust": Kind(_pickled_module_with_a_head, _codes(5),
                                                            says="--trust-pickle"),
    "torchscript": Kind(_torchscript, _codes(5), says="TorchScript"),
    "torchscript-even-with-trust": Kind(
        _torchscript, _codes(5), args={command: ["--trust-pickle"] for command in ALL}, says="TorchScript"
    ),
    "no-conv-kernels": Kind(_no_conv, NOTHING, args=INSPECT_ALL, says="nothing to"),
    "int8-conv-weight": Kind(_odd_conv(lambda w: (w * 20).to(torch.int8), "int8"), NOTHING, args=INSPECT_ALL),
    "quantized-conv-weight": Kind(_odd_conv(quantize, "quantized"), NOTHING, args=INSPECT_ALL),
    "complex64-conv-weight": Kind(_odd_conv(lambda w: w.to(torch.complex64), "complex"), NOTHING, args=INSPECT_ALL),
    "complex64-conv-weight-safetensors": Kind(_complex_safetensors, NOTHING, args=INSPECT_ALL),
    "sparse-conv-weight": Kind(_odd_conv(lambda w: w.to_sparse(), "sparse"), NOTHING, args=INSPECT_ALL),
    "meta-conv-weight": Kind(
        _odd_conv(lambda w: torch.empty_like(w, device="meta"), "meta"), NOTHING, args=INSPECT_ALL
    ),
    "nan-inf-weights": Kind(
        _nan_weights, {"convert": 0}, args={"convert": ["-o", "{out}/out.pt"]}, after=_check_nan_convert
    ),
    "nan-inf-spectral-weights": Kind(
        _nan_spectral, {"bake": 0}, args={"bake": ["-o", "{out}/out.pt"]}, after=_check_nan_bake
    ),
    "already-converted": Kind(_sample("balle.spectral.pt"), {"convert": 0}, prints="already spectral"),
    "already-converted-safetensors": Kind(_spectral_safetensors, {"convert": 0}, prints="already spectral"),
    "already-baked": Kind(_sample("balle.pt"), {"bake": 6}, says="nothing to bake"),
    "output-is-input": Kind(
        _sample("balle.pt"), {"convert": 5}, args={"convert": ["-o", "{out}/balle.pt", "--force"]}, says="input"
    ),
    "output-is-input-bake": Kind(
        _sample("balle.spectral.pt"),
        {"bake": 5},
        args={"bake": ["-o", "{out}/./balle.spectral.pt", "--force"]},
        says="input",
    ),
    "output-exists": Kind(
        _output_taken("balle.pt"), {"convert": 5}, args={"convert": ["-o", "{out}/taken.pt"]}, says="--force"
    ),
    "output-exists-bake": Kind(
        _output_taken("balle.spectral.pt"), {"bake": 5}, args={"bake": ["-o", "{out}/taken.pt"]}, says="--force"
    ),
    "output-exists-safetensors": Kind(
        _output_taken("balle.safetensors"), {"convert": 5}, args={"convert": ["-o", "{out}/taken.pt"]}, says="--force"
    ),
    "read-only-output-directory": _failed_write(
        _with_readonly_dir(_sample("balle.pt")), "convert", ["{out}/ro/out.pt"],
        _read_only_directory, "Permission denied"),
    "read-only-output-directory-sharded": _failed_write(
        _with_readonly_dir(_sample("balle.safetensors")), "convert", ["{out}/ro/shards", "--max-shard-size", "40KB"],
        _read_only_directory, "Permission denied"),
    "disk-full-in-torch-save": _failed_write(
        _sample("balle.pt"), "convert", ["{out}/out.pt"], disk_full, "No space left"),
    "disk-full-in-torch-save-bake": _failed_write(
        _sample("balle.spectral.pt"), "bake", ["{out}/out.pt"], disk_full, "No space left"),
    "io-error-streaming-a-converted-tensor": _failed_write(
        _sample("balle.safetensors"), "convert", ["{out}/out.safetensors"],
        io_error_after(3_000), "Input/output error"),
    "io-error-streaming-a-baked-tensor": _failed_write(
        _spectral_safetensors, "bake", ["{out}/out.safetensors"], io_error_after(3_000), "Input/output error"),
    "io-error-copying-an-untouched-tensor": _failed_write(
        _sample("balle.safetensors"), "convert", ["{out}/out.safetensors"],
        _io_error_in_copy_range, "Input/output error"),
    "io-error-in-background-writeback": _failed_write(
        _sample("balle.safetensors"), "convert", ["{out}/out.safetensors"],
        _io_error_in_background_writeback, "Input/output error"),
    "io-error-writing-shards": _failed_write(
        _sample("balle.safetensors"), "convert", ["{out}/shards", "--max-shard-size", "40KB"],
        io_error_after(3_000), "Input/output error"),
    "control-characters-in-the-name": Kind(_control_characters, _codes(3), says="line\\nbreak\\x1b[2J"),
    # headers that lie: refused before any work, as safetensors itself refuses them
    "safetensors-shape-overflows": Kind(_shape("overflow", "[0,4611686018427387904,3,3]", "[0,0]", 0), _codes(3),
                                        says="more bytes than any file"),
    "safetensors-shape-not-integer": Kind(_shape("float", "[2.7,4,3,3]"), _codes(3), says="shape"),
    "safetensors-shape-string": Kind(_shape("string", '["2",4,3,3]'), _codes(3), says="shape"),
    "safetensors-shape-bool": Kind(_shape("bool", "[true,4,3,3]"), _codes(3), says="shape"),
    "safetensors-shape-negative": Kind(_shape("negative", "[-2,4,3,3]"), _codes(3), says="shape"),
    "safetensors-offsets-not-integer": Kind(_shape("offsets", "[2,4,3,3]", f"[0.0,{_WEIGHT}]"), _codes(3),
                                            says="data_offsets"),
    "safetensors-name-lone-surrogate": Kind(_raw_header("surrogate", b'{"conv\\ud800.weight":' + _ENTRY + b"}",
                                                        bytes(_WEIGHT)), _codes(3), says="UTF-8"),
    "safetensors-name-not-utf8": Kind(_raw_header("utf8", b'{"conv\xff.weight":' + _ENTRY + b"}", bytes(_WEIGHT)),
                                      _codes(3), says="UTF-8"),
    "safetensors-duplicate-name": Kind(_raw_header("twice", b'{"conv.weight":' + _ENTRY + b',"conv.weight":' + _ENTRY
                                                   + b"}", bytes(_WEIGHT)), _codes(3), says="twice"),
    # records that lie: exit 3 naming the file, never exit 2 or an internal error
    "record-zero-size-kernel": Kind(_recorded("zero", _record([0, 3]), torch.zeros(_RFFT)), _codes(3), says="record"),
    "record-empty-kernel": Kind(_recorded("empty", _record([]), torch.zeros(_RFFT)), _codes(3), says="record"),
    "record-bool-kernel": Kind(_recorded("boolk", _record([True, 3]), torch.zeros(_RFFT)), _codes(3), says="record"),
    "record-huge-kernel": Kind(_recorded("huge", _record([2**70, 3]), torch.zeros(_RFFT)), _codes(3),
                               says="does not fit"),
    "record-float8-dtype": Kind(_recorded("f8", _record([3, 3], "float8_e4m3fn"), torch.zeros(_RFFT)), _codes(3),
                                says="record"),
    "record-no-layers": Kind(_recorded("nolayers", None, torch.zeros(_RFFT)), _codes(3), says="layers"),
    "record-on-int-tensor": Kind(_recorded("int", _record([3, 3]), torch.zeros(_RFFT, dtype=torch.int32)),
                                 _codes(3), says="int32"),
    "record-on-bool-tensor": Kind(_recorded("bool", _record([3, 3]), torch.zeros(_RFFT, dtype=torch.bool)),
                                  _codes(3), says="bool"),
    "record-on-complex-tensor": Kind(_recorded("cplx", _record([3, 3]), torch.zeros(_RFFT, dtype=torch.complex64)),
                                     _codes(3), says="complex64"),
    "record-on-float8-tensor": Kind(_recorded("f8t", _record([3, 3]),
                                              torch.zeros(_RFFT).to(torch.float8_e4m3fn)), _codes(3), says="float8"),
    "record-damaged-in-torch-file": Kind(_record_in_torch_file, _codes(3), says="record.pt"),
    # limits
    "torch-containers-nested-20000-deep": Kind(_deeply_nested, _codes(3), says="nested"),
    "fifo-as-input": Kind(_fifo, _codes(3), says="FIFO", subprocess=("convert",)),
    "fifo-as-shard-index": Kind(_fifo_index, _codes(3), says="FIFO"),
    "device-as-input": Kind(_device, _codes(3), says="character device"),
    "max-shard-size-inf": _usage("--max-shard-size", "inf"),
    "max-shard-size-1e400": _usage("--max-shard-size", "1e400"),
    "max-shard-size-abc": _usage("--max-shard-size", "abc"),
    "max-shard-size-0": _usage("--max-shard-size", "0"),
    "max-shard-size-negative": _usage("--max-shard-size", "-1"),
    "basis-unknown": _usage("--basis", "dct"),
    "output-dangling-symlink": Kind(_dangling_output, {"convert": 5}, args={"convert": ["-o", "{out}/out.pt"]},
                                    says="--force"),
    "output-is-a-fifo": Kind(_fifo_output, {"convert": 5}, args={"convert": ["-o", "{out}/out.pt", "--force"]},
                             says="FIFO"),
    # data loss: no output may replace or remove the input, a directory holding it, or what it resolves to
    "output-directory-holds-the-input": Kind(
        _sample("balle.safetensors"), {"convert": 5},
        args={"convert": ["-o", "{out}", "--force", "--max-shard-size", "40KB"]}, says="holds the input"),
    "output-directory-holds-symlinked-shards": Kind(
        _symlinked_shards, {"convert": 5}, args={"convert": ["-o", "{out}/store", "--force"]}, says="holds the input"),
    "output-is-the-input-directory": Kind(
        _symlinked_shards, {"convert": 5}, args={"convert": ["-o", "{out}/ckpt", "--force"]}, says="input"),
}  # fmt: skip
