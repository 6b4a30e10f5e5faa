"""Checkpoint files: format detection by content, containers, safe loading, atomic writing.

Formats, detected from the bytes, never from the extension:

* ``safetensors`` -- 8-byte little-endian header length, then a JSON header;
* ``torch`` -- ``torch.save``'s zip archive (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), opened with ``mmap=True``;
* ``torch-legacy`` -- the pre-1.6 pickle stream; read, and written back as a zip archive;
* TorchScript archives are refused: loading them runs code.

Everything is loaded with ``torch.load(..., weights_only=True)``. A pickled ``nn.Module`` needs code execution
and is loaded only with ``trust_pickle=True``; its state dict is used from then on.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, RefusedError

SAFETENSORS = "safetensors"
TORCH = "torch"
TORCH_LEGACY = "torch-legacy"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

#: keys under which trainers (timm, Lightning, DeepSpeed, plain scripts) keep weights, in search order
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_ema",
    "state_dict_ema",
    "ema",
    "ema_state_dict",
)
#: prefixes that wrappers add to every key (DDP/DataParallel, torch.compile, Lightning's ``self.model``)
KEY_PREFIXES = ("module.", "_orig_mod.", "model.")

_MAX_SAFETENSORS_HEADER = 100_000_000


def detect_format(path: Path) -> str:
    """The checkpoint format of ``path``, read from its first bytes."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass a checkpoint file")
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    if not head:
        raise CheckpointError(f"{path}: is empty; pass a checkpoint written by torch.save or safetensors")
    if head.startswith(b"PK\x03\x04"):
        return TORCH
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return TORCH_LEGACY
    if len(head) == 9 and head[8:9] == b"{":
        (size,) = struct.unpack("<Q", head[:8])
        if 0 < size <= _MAX_SAFETENSORS_HEADER:
            return SAFETENSORS
    raise CheckpointError(f"{path}: not a checkpoint spectral_cli can read (expected a torch.save file or safetensors)")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the whole object as read, and where its state dicts sit inside it."""

    path: Path
    format: str
    obj: Any
    #: container keys leading to each state dict; ``()`` when ``obj`` itself is the state dict
    locations: list[tuple[str, ...]]
    #: safetensors ``__metadata__`` (str to str)
    metadata: dict[str, str] = field(default_factory=dict)
    #: names of the real conv modules, when a trusted pickled module was walked
    conv_modules: frozenset[str] | None = None

    def state_dicts(self) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
        for loc in self.locations:
            yield loc, get_at(self.obj, loc)


def get_at(obj: Any, loc: tuple[str, ...]) -> Any:
    for key in loc:
        obj = obj[key]
    return obj


def set_at(obj: Any, loc: tuple[str, ...], value: Any) -> Any:
    """``obj`` with the item at ``loc`` replaced (containers are copied, never changed in place)."""
    if not loc:
        return value
    copy = type(obj)(obj) if isinstance(obj, dict) else dict(obj)
    copy[loc[0]] = set_at(obj[loc[0]], loc[1:], value)
    return copy


def is_state_dict(obj: Any) -> bool:
    """A str-keyed mapping holding at least one tensor, and nothing but tensors and torch's ``_extra_state``."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    has_tensor = False
    for key, value in obj.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, torch.Tensor):
            has_tensor = True
        elif not key.endswith("_extra_state"):
            return False
    return has_tensor


def find_state_dicts(obj: Any) -> list[tuple[str, ...]]:
    """Where the state dicts are: the object itself, or under the usual container keys (one level deep)."""
    if is_state_dict(obj):
        return [()]
    found: list[tuple[str, ...]] = []
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            value = obj.get(key)
            if is_state_dict(value):
                found.append((key,))
            elif isinstance(value, Mapping):
                found.extend((key, inner) for inner in STATE_DICT_KEYS if is_state_dict(value.get(inner)))
    return found


def is_optimizer_state(value: Any) -> bool:
    """An optimizer ``state_dict()``, or a list of them (Lightning's ``optimizer_states``)."""
    if isinstance(value, Mapping):
        return "state" in value and "param_groups" in value
    return isinstance(value, list | tuple) and bool(value) and all(is_optimizer_state(v) for v in value)


def _unsupported_global(message: str) -> str | None:
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in message:
            return message.split(marker, 1)[1].split()[0].rstrip(".,")
    return None


def _torch_load(path: Path, fmt: str, trust_pickle: bool) -> Any:
    with zipfile.ZipFile(path) if fmt == TORCH else contextlib.nullcontext() as archive:
        if archive is not None and any(n.endswith("/constants.pkl") for n in archive.namelist()):
            raise RefusedError(
                f"{path}: is a TorchScript archive, which runs code when loaded; "
                "save model.state_dict() with torch.save and convert that"
            )
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == TORCH)
    except pickle.UnpicklingError as e:
        name = _unsupported_global(str(e))
        if name is None:
            raise CheckpointError(f"{path}: is damaged or not a torch checkpoint ({str(e).splitlines()[0]})") from None
        raise RefusedError(
            f"{path}: holds pickled Python objects ({name}) whose loading runs code; "
            "if you trust this file, rerun with --trust-pickle"
        ) from None


def load_checkpoint(path: Path | str, *, trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint safely; raise :class:`CheckpointError` / :class:`RefusedError` with the fix."""
    path = Path(path)
    fmt = detect_format(path)
    metadata: dict[str, str] = {}
    conv_modules = None
    try:
        if fmt == SAFETENSORS:
            obj, metadata = read_safetensors(path)
        else:
            obj = _torch_load(path, fmt, trust_pickle)
    except (CheckpointError, RefusedError):
        raise
    except Exception as e:  # every parser failure of a damaged file ends here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: is damaged or truncated ({first[:200]})") from None
    if isinstance(obj, torch.nn.Module):
        from .parametrization import CONV_TYPES

        conv_modules = frozenset(n for n, m in obj.named_modules() if isinstance(m, CONV_TYPES))
        obj = obj.state_dict()
    locations = find_state_dicts(obj)
    if not locations:
        raise CheckpointError(
            f"{path}: holds no state dict (a mapping of names to tensors, bare or under one of "
            f"{', '.join(STATE_DICT_KEYS[:4])}...); save model.state_dict()"
        )
    return Checkpoint(path, fmt, obj, locations, metadata, conv_modules)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor entries and ``__metadata__`` of a safetensors file, from its header alone."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors header")
        (size,) = struct.unpack("<Q", raw)
        header_bytes = f.read(size)
    if len(header_bytes) != size:
        raise CheckpointError(f"{path}: truncated safetensors header ({len(header_bytes)} of {size} bytes)")
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise CheckpointError(f"{path}: damaged safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    return header, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    _, metadata = read_safetensors_header(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, metadata


def output_format(path: Path, input_format: str) -> str:
    """The format to write: from the output's extension when it names one, else the input's."""
    if path.suffix == ".safetensors":
        return SAFETENSORS
    if path.suffix in TORCH_SUFFIXES:
        return TORCH
    return TORCH if input_format == TORCH_LEGACY else input_format


def check_output(source: Path, target: Path, *, force: bool) -> None:
    """Refuse writing over the input, into a missing directory, or over an existing file without ``force``."""
    if target.exists() and (target.resolve() == source.resolve() or os.path.samefile(target, source)):
        raise RefusedError(f"{target}: is the input file; choose another output with -o")
    if target.is_dir():
        raise RefusedError(f"{target}: is a directory; give a file name with -o")
    if not target.parent.is_dir():
        raise RefusedError(f"{target}: its directory does not exist; create it or choose another -o")
    if target.exists() and not force:
        raise RefusedError(f"{target}: already exists; pass --force to overwrite it")


def write_atomic(target: Path, fmt: str, obj: Any, metadata: Mapping[str, str] | None = None) -> None:
    """Write to a temporary file beside ``target``, flush it to disk, then rename it over ``target``.

    A crash or error at any point leaves no partial file; the temporary file is removed.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file readable by its owner only; give it the mode any new file gets.
            os.chmod(tmp, _new_file_mode())
            if fmt == SAFETENSORS:
                from safetensors.torch import save

                f.write(save(_contiguous(obj), metadata=dict(metadata or {})))
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """``0o666`` less the process umask: the permissions ``open(path, "w")`` would give a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}
