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
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import OOM_FIX, CheckpointError, OutOfMemoryError, RefusedError, first_line, is_out_of_memory
from .formats import SAFETENSORS, TORCH, atomic_file, detect_format
from .layout import METADATA_KEY
from .stream import read_header

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


def key_prefix(keys: Iterable[str]) -> str:
    """The wrapper prefix (``module.``, ``_orig_mod.``, ...) shared by every key, possibly nested."""
    keys = list(keys)
    prefix = ""
    while keys:
        for p in KEY_PREFIXES:
            if all(k.startswith(prefix + p) for k in keys):
                prefix += p
                break
        else:
            return prefix
    return prefix


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


def _quiet_load(path: Path, **kwargs: Any) -> Any:
    """``torch.load`` to the CPU without its warnings.

    torch warns while rebuilding some tensors (TypedStorage for quantized ones, an O(nnz) scan for sparse ones):
    noise to the user, and it would turn the command line's one-line report into several lines.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", **kwargs)


#: the first torch whose weights_only loader has no known way to run code (CVE-2025-32434, CVE-2026-24747)
SAFE_TORCH = (2, 10)


def _check_torch_version() -> None:
    """Refuse to unpickle with a torch whose weights_only loader is known to run code (pip metadata can be bypassed)."""
    found = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if found is None or (int(found[1]), int(found[2])) < SAFE_TORCH:
        raise RefusedError(
            f"torch {torch.__version__} can run code from a checkpoint even with weights_only=True "
            f"(CVE-2025-32434, CVE-2026-24747); install torch>={'.'.join(map(str, SAFE_TORCH))}"
        )


def _torch_load(path: Path, fmt: str, trust_pickle: bool) -> Any:
    with zipfile.ZipFile(path) if fmt == TORCH else contextlib.nullcontext() as archive:
        if archive is not None and any(n.endswith("/constants.pkl") for n in archive.namelist()):
            raise RefusedError(
                f"{path}: is a TorchScript archive, which runs code when loaded; "
                "save model.state_dict() with torch.save and convert that"
            )
    if trust_pickle:
        return _quiet_load(path, weights_only=False)
    _check_torch_version()
    try:
        return _quiet_load(path, weights_only=True, mmap=fmt == TORCH)
    except pickle.UnpicklingError as e:
        name = _unsupported_global(str(e))
        if name is None:
            raise CheckpointError(f"{path}: is damaged or not a torch checkpoint ({first_line(e)})") from None
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
        if is_out_of_memory(e):  # a mapping or an allocation refused: the machine's limit, not the file
            whole = "" if fmt == SAFETENSORS else "; a torch checkpoint is loaded whole, safetensors files stream"
            message = f"{path}: out of memory while loading it ({first_line(e)}); {OOM_FIX}{whole}"
            raise OutOfMemoryError(message) from None
        raise CheckpointError(f"{path}: is damaged or truncated ({first_line(e)})") from None
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


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    metadata = read_header(path).metadata
    raw = metadata.get(METADATA_KEY)
    if raw:
        try:
            json.loads(raw)
        except (ValueError, RecursionError):
            raise CheckpointError(f"{path}: unreadable {METADATA_KEY} metadata: {raw[:80]!r}") from None
    with safe_open(str(path), framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, metadata


def write_atomic(
    target: Path,
    fmt: str,
    obj: Any,
    metadata: Mapping[str, str] | None = None,
    verify: Callable[[Path], None] | None = None,
) -> None:
    """Write ``obj`` with ``torch.save`` (or safetensors) to ``target`` atomically; see :class:`atomic_file`."""
    with atomic_file(target, verify) as f:
        if fmt == SAFETENSORS:
            from safetensors.torch import save

            f.write(save({k: v.contiguous() for k, v in obj.items()}, metadata=dict(metadata or {})))
        else:
            torch.save(obj, f)
