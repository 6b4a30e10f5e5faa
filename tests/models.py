"""Helpers of the tests: the sample models, running ``spectral`` (in-process or as a child), reading and checking
outputs, comparing tensors.

The sample model classes are defined in ``sample_models/make_samples.py`` (never in the package); this module
imports that script by its path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from typer.testing import CliRunner, Result

from spectral_cli.cli import app
from spectral_cli.files.convert import Io
from spectral_cli.files.syscalls import SYSCALLS

REPO = Path(__file__).resolve().parents[1]
SAMPLES_DIR = REPO / "sample_models"

#: the environment every in-process run gets: a pinned terminal width, no forced colours, no tracebacks
ENV: dict[str, str | None] = {
    "COLUMNS": "120",
    "LINES": "50",
    "NO_COLOR": "1",
    "FORCE_COLOR": None,
    "TTY_COMPATIBLE": None,
    "TTY_INTERACTIVE": None,
    "SPECTRAL_DEBUG": None,
}

#: sample file -> name of its model in make_samples.MODELS
SAMPLE_MODEL = {
    "balle.pt": "balle",
    "balle.safetensors": "balle",
    "lightning.ckpt": "balle",
    "conv1d.pt": "conv1d",
    "conv3d.pt": "conv3d",
}
SPATIAL_SAMPLES = tuple(SAMPLE_MODEL)
ALL_SAMPLES = (*SPATIAL_SAMPLES, "balle.spectral.pt")
SUFFIX = "parametrizations.weight.original"


def _import_make_samples() -> ModuleType:
    name = "spectral_sample_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SAMPLES_DIR / "make_samples.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make_samples = _import_make_samples()


class Evil:
    """Unpickling this runs ``open(marker, "w")``: the marker file appears if the loader runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


# ---- faults: system calls that fail, passed to convert and bake through Io (the CLI's context object) ----------


def faulty(**calls: Any) -> Io:
    """An :class:`Io` whose named system calls are replaced (``pwrite=...``, ``fdatasync=...``, ``writeback_bytes``
    and ``slab_bytes`` too)."""
    sizes = {k: calls.pop(k) for k in ("writeback_bytes", "slab_bytes") if k in calls}
    return Io(syscalls=dataclasses.replace(SYSCALLS, **calls), **sizes)


def raising(error: BaseException) -> Callable[[], None]:
    def fail() -> None:
        raise error

    return fail


def signal_self(signum: int) -> Callable[[], None]:
    """A real signal to this process: its handler runs (and raises) as soon as the call returns."""
    return lambda: os.kill(os.getpid(), signum)


def failing_pwrite(after: int, fail: Callable[[], None]) -> Callable[[int, Any, int], int]:
    """``os.pwrite`` that writes ``after`` bytes in all, then part of the next call's bytes, then ``fail()``s."""
    written = 0

    def pwrite(fd: int, data: Any, offset: int) -> int:
        nonlocal written
        view = memoryview(data).cast("B")
        if written + len(view) <= after:
            n = os.pwrite(fd, view, offset)
            written += n
            return n
        room = os.pwrite(fd, view[: max(0, after - written)], offset) if after > written else 0
        written += room
        fail()
        return room

    return pwrite


def corrupting_pwrite(minimum: int = 4096) -> Callable[[int, Any, int], int]:
    """``os.pwrite`` that flips the last byte of the first write of at least ``minimum`` bytes (a tensor's data),
    silently: what the disk holds is not what was written."""
    done = False

    def pwrite(fd: int, data: Any, offset: int) -> int:
        nonlocal done
        view = memoryview(data).cast("B")
        if not done and len(view) >= minimum:
            done = True
            changed = bytearray(view)
            changed[-1] ^= 0xFF
            return os.pwrite(fd, changed, offset)
        return os.pwrite(fd, view, offset)

    return pwrite


def after_calls(n: int, real: Callable[..., Any], error: BaseException) -> Callable[..., Any]:
    """``real`` for the first ``n`` calls; from then on the call is made, then ``error`` raised."""
    calls = 0

    def call(*args: Any) -> Any:
        nonlocal calls
        result = real(*args)
        calls += 1
        if calls > n:
            raise error
        return result

    return call


def spectral(*args: Any, env: Mapping[str, str | None] | None = None, io: Any = None) -> Result:
    """Run the ``spectral`` app in-process; unexpected exceptions propagate (they are bugs). ``io``: a
    :class:`spectral_cli.files.convert.Io` (the system calls and piece sizes of convert and bake)."""
    return CliRunner().invoke(app, [str(a) for a in args], env={**ENV, **(env or {})}, catch_exceptions=False, obj=io)


def child_env(**extra: str | None) -> dict[str, str]:
    """The environment of a ``spectral`` subprocess: this one's, with the pinned values of :data:`ENV` and ``extra``
    (``None`` removes a variable), and this checkout's package first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ENV and k not in extra}
    env.update({k: v for k, v in {**ENV, **extra}.items() if v is not None})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


#: ``spectral ARGS`` in a process that first sets a resource limit: ``python -c LIMITED RLIMIT_NAME VALUE ARGS...``
LIMITED = """
import resource, sys
limit = int(sys.argv[2])
resource.setrlimit(getattr(resource, sys.argv[1]), (limit, limit))
from spectral_cli.cli import app
app(args=sys.argv[3:], prog_name="spectral")
"""


def spectral_limited(name: str, limit: int, *args: Any, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``spectral ARGS`` in a real process under ``resource.setrlimit(name, limit)``."""
    return subprocess.run([sys.executable, "-c", LIMITED, name, str(limit), *map(str, args)], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory: Path) -> list[str]:
    """Every file name in ``directory``, hidden ones (temporary files) included."""
    return sorted(p.name for p in directory.iterdir())


def snapshot(directory: Path) -> dict[str, str]:
    """Every entry under ``directory``, hidden ones included -> sha256 of a file, ``"<dir>"`` for a directory, the
    target of a symlink (never followed: it may point at a device or at an input elsewhere), the type of anything
    else (a FIFO is never opened: reading it would block)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_symlink():
            out[key] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            out[key] = "<dir>"
        elif not path.is_file():
            out[key] = f"<{stat.S_IFMT(path.lstat().st_mode):o}>"
        else:
            out[key] = sha256(path)
    return out


def temp_files(directory: Path) -> list[str]:
    return [name for name in listing(directory) if name.startswith(".") and name.endswith(".tmp")]


def one_line(text: str) -> str:
    """The single line of an error report; fails on tracebacks and multi-line output."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def read(path: Path) -> Any:
    """A written checkpoint, loaded safely (weights_only for torch files)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
        return dict(f.metadata() or {})


def model_state(obj: Any) -> dict[str, torch.Tensor]:
    """The model's own state dict from a sample: a bare state dict, or Lightning's with ``model.`` removed."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return {k.removeprefix("model."): v for k, v in obj["state_dict"].items()}
    return dict(obj)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed on the CPU in float64 (complex128 for complex tensors);
    the plain difference where ``expected`` is all zeros."""
    dtype = torch.complex128 if actual.is_complex() or expected.is_complex() else torch.float64
    a, e = actual.detach().to("cpu", dtype), expected.detach().to("cpu", dtype)
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def spawn_ranks(worker: Callable[..., None], args: tuple[Any, ...], nprocs: int, outputs: Sequence[Path]) -> None:
    """``torch.multiprocessing.spawn`` of ``worker`` on ``nprocs`` ranks, which write ``outputs``. gloo's ranks on
    a small loaded machine now and then abort as they exit ("terminate called without an active exception", a
    thread of theirs still running): once every output is written the work is done, and the test checks it."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(worker, args=args, nprocs=nprocs, join=True)
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGABRT" or not all(path.exists() for path in outputs):
            raise


def rendezvous(directory: Path) -> str:
    """The ``init_method`` of a distributed test run: a file in ``directory``, so that no TCP port is chosen ahead
    of time (a free port found by one process can be taken by another before the ranks bind it)."""
    return f"file://{directory / 'rendezvous'}"


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape
    assert rel_err(actual, expected) <= tol, (rel_err(actual, expected), tol)


def assert_same_tensors(
    actual: Mapping[str, Any], expected: Mapping[str, Any], tol: float = 1e-6, *, ordered: bool = True
) -> None:
    """Same keys (in the same order), same dtypes and shapes, values within ``tol`` relative (per tensor)."""
    if ordered:
        assert list(actual) == list(expected)
    else:
        assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        got = actual[key]
        if not isinstance(value, torch.Tensor):
            assert got == value, key
            continue
        assert isinstance(got, torch.Tensor), key
        assert got.dtype == value.dtype, (key, got.dtype, value.dtype)
        assert got.shape == value.shape, (key, got.shape, value.shape)
        if value.is_floating_point() or value.is_complex():
            assert rel_err(got, value) <= tol, (key, rel_err(got, value), tol)
        else:
            assert torch.equal(got, value), key


def assert_equal_tensors(actual: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    """The same keys, and every tensor bit-equal (dtype, shape and values)."""
    expected = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype and got.shape == value.shape, (key, got.dtype, got.shape, value.shape)
        assert torch.equal(got, value), f"{key}: the values written are not the values given"


def assert_same_outputs(model: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor, tol: float = 1e-4) -> None:
    with torch.no_grad():
        got, want = model(x), reference(x)
    if isinstance(want, Mapping):  # CompressAI models return {"x_hat": ..., "likelihoods": ...}
        got, want = got["x_hat"], want["x_hat"]
    assert got.shape == want.shape
    assert rel_err(got, want) <= tol, rel_err(got, want)


def build_registered(name: str, basis: str = "rfft") -> torch.nn.Module:
    """A fresh sample model (different seed: its own weights must be replaced) with the spectral parametrization."""
    from spectral_cli import register_spectral_parametrization

    model = make_samples.build(name, seed=123)
    register_spectral_parametrization(model, basis=basis)  # type: ignore[arg-type]
    return model


# ---- the JSON schema of render.py, checked field by field ----


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inspect_json(doc: Mapping[str, Any]) -> None:
    assert doc["schema"] == 1 and doc["command"] == "inspect"
    assert isinstance(doc["file"], str)
    assert doc["format"] in ("torch", "torch-legacy", "safetensors", "safetensors-sharded", "dcp", "directory")
    for layer in doc["layers"]:
        for name in ("name", "location", "key", "dtype"):
            assert isinstance(layer[name], str), (name, layer)
        assert layer["domain"] in ("spectral", "spatial", "weight_norm", "spectral_norm", "parametrized")
        assert layer["basis"] in ("rfft", "rdft", None)
        assert layer["kernel_size"] is None or _is_int_list(layer["kernel_size"])
        assert _is_int_list(layer["shape"]) and _is_int(layer["params"])
        assert layer["params"] == math.prod(layer["shape"])
        assert isinstance(layer["inferred"], bool)
        energy = layer["energy"]
        assert energy is None or (isinstance(energy, list) and all(isinstance(e, float) for e in energy))
        if energy:
            assert abs(sum(energy) - 1) < 1e-6
        if layer["domain"] == "spectral":
            assert layer["basis"] is not None and layer["kernel_size"] is not None
    totals = doc["totals"]
    assert set(totals) >= {"layers", "spectral", "params", "bytes"}
    assert all(_is_int(v) for v in totals.values())
    assert totals["layers"] == len(doc["layers"])
    assert totals["spectral"] == sum(1 for layer in doc["layers"] if layer["domain"] == "spectral")


def check_file_report_json(doc: Mapping[str, Any], command: str) -> None:
    assert doc["schema"] == 1 and doc["command"] == command
    assert isinstance(doc["file"], str)
    assert doc["output"] is None or isinstance(doc["output"], str)
    assert isinstance(doc["written"], bool) and isinstance(doc["dry_run"], bool)
    assert isinstance(doc["message"], str)
    domain = "spectral" if command == "convert" else "spatial"
    for layer in doc["layers"]:
        for name in ("name", "location", "source_key", "key", "dtype"):
            assert isinstance(layer[name], str), (name, layer)
        assert layer["domain"] == domain
        assert layer["basis"] in ("rfft", "rdft")
        assert _is_int_list(layer["kernel_size"])
        assert _is_int_list(layer["shape_before"]) and _is_int_list(layer["shape"])
        assert layer["params_before"] == math.prod(layer["shape_before"])
        assert layer["params"] == math.prod(layer["shape"])
        assert layer["max_error"] is None or isinstance(layer["max_error"], float)
        assert isinstance(layer["inferred"], bool)
    for skipped in doc["skipped"]:
        assert set(skipped) >= {"location", "key", "reason"}
        assert all(isinstance(v, str) for v in skipped.values())
    assert all(isinstance(d, str) for d in doc["dropped"])
    assert all(isinstance(w, str) for w in doc["warnings"])
    for optimizer in doc["optimizer"]:
        assert isinstance(optimizer["location"], str) and isinstance(optimizer["optimizer"], str)
        assert _is_int(optimizer["parameters"]) and isinstance(optimizer["removed"], bool)
        assert all(isinstance(n, str) for n in optimizer["converted"] + optimizer["approximated"])
        assert set(optimizer["approximated"]) <= set(optimizer["converted"])
        assert optimizer["reaged_to"] is None or _is_int(optimizer["reaged_to"])
        assert all(set(d) == {"parameter", "reason"} for d in optimizer["dropped"])
    errors = [layer["max_error"] for layer in doc["layers"]]
    if errors and None not in errors:
        assert doc["max_error"] == max(errors)


def _no_constant(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON")


def parse_json(stdout: str) -> Any:
    """Strict JSON: NaN and Infinity (which Python's json writes and accepts) fail the test."""
    return json.loads(stdout, parse_constant=_no_constant)


def names(doc: Mapping[str, Any]) -> list[str]:
    return [layer["name"] for layer in doc["layers"]]


def conv_names(model: torch.nn.Module, prefix: str = "") -> list[str]:
    """Module names of the convs with more than one tap: what convert changes."""
    from spectral_cli.parametrization import CONV_TYPES

    return [
        prefix + n
        for n, m in model.named_modules()
        if isinstance(m, CONV_TYPES) and math.prod(m.kernel_size) > 1  # type: ignore[arg-type]
    ]


def copy_samples(target: Path, files: Sequence[str] = ALL_SAMPLES) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
        (target / name).write_bytes((SAMPLES_DIR / name).read_bytes())
    return target
