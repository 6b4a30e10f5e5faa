"""torch.save files: the source (loaded safely and whole; containers and the state dicts in them) and the
writer of every ``.pt`` output.

Everything is loaded with ``torch.load(..., weights_only=True)``, read into memory (not mapped: a file truncated
or rewritten while mapped would kill the process with SIGBUS). A pickled ``nn.Module`` needs code execution and
is loaded only with ``trust_pickle=True``; its state dict is used from then on. TorchScript archives are refused.
Containers nested deeper than :data:`MAX_DEPTH` are refused: torch.save could not write them back.

The writer hands ``torch.save`` a file object of the output (:class:`~spectral_cli.files.atomic.Stream`) and
raises the error a write met (a full disk, a signal) instead of the RuntimeError torch.save turns it into. The
written file is read back and compared tensor by tensor before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import OOM_FIX, CheckpointError, OutOfMemoryError, RefusedError, first_line, is_out_of_memory
from ..statedict.surgery import InMemory, records_of, spec_of, specs_of
from .atomic import OutFile
from .formats import TORCH
from .safetensors_io import value_bytes
from .sources import Fingerprint, Part

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
#: containers nested deeper than this are refused (torch.save recurses per level)
MAX_DEPTH = 400
#: the first torch whose weights_only loader has no known way to run code (CVE-2025-32434, CVE-2026-24747)
SAFE_TORCH = (2, 10)


class MemoryTensor(InMemory):
    """A tensor of a loaded torch file, as a source gives it."""

    def copy_to(self, out: OutFile, offset: int) -> None:
        out.write(value_bytes(self.tensor), offset)


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
    """A str-keyed mapping holding at least one tensor, and no mapping but torch's ``_extra_state``: a module's
    state dict may also hold other values (a quantized linear's ``_packed_params``: a dtype, a tuple of tensors),
    while a trainer's container holds its state dicts as mappings."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    has_tensor = False
    for key, value in obj.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, torch.Tensor):
            has_tensor = True
        elif isinstance(value, Mapping) and not key.endswith("_extra_state"):
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


def optimizer_keys(obj: Any) -> list[str]:
    """The container's entries that hold optimizer state (dropped once weights change)."""
    if not isinstance(obj, Mapping):
        return []
    return [k for k, v in obj.items() if isinstance(k, str) and is_optimizer_state(v)]


def _depth(obj: Any, limit: int) -> int:
    """How deeply ``obj``'s containers nest, counted up to ``limit + 1`` (without recursion)."""
    deepest, stack, seen = 0, [(obj, 1)], set()
    while stack:
        item, depth = stack.pop()
        if isinstance(item, torch.Tensor) or id(item) in seen:
            continue
        if isinstance(item, Mapping):
            children: Any = [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple | set | frozenset):
            children = item
        else:
            continue
        seen.add(id(item))
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _unsupported_global(message: str) -> str | None:
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in message:
            return message.split(marker, 1)[1].split()[0].rstrip(".,")
    return None


def _check_torch_version() -> None:
    """Refuse to unpickle with a torch whose weights_only loader is known to run code (pip metadata can be bypassed)."""
    found = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if found is None or (int(found[1]), int(found[2])) < SAFE_TORCH:
        raise RefusedError(
            f"torch {torch.__version__} can run code from a checkpoint even with weights_only=True "
            f"(CVE-2025-32434, CVE-2026-24747); install torch>={'.'.join(map(str, SAFE_TORCH))}"
        )


def load(path: Path, fmt: str, trust_pickle: bool) -> Any:
    """``torch.load`` to the CPU, weights only unless ``trust_pickle``; every failure one line, with the fix."""
    try:
        with zipfile.ZipFile(path) if fmt == TORCH else contextlib.nullcontext() as archive:
            names = archive.namelist() if archive is not None else []
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: is damaged or truncated ({first_line(e)})") from None
    if any(n.endswith("/constants.pkl") for n in names):
        raise RefusedError(
            f"{path}: is a TorchScript archive, which runs code when loaded; "
            "save model.state_dict() with torch.save and convert that"
        )
    if not trust_pickle:
        _check_torch_version()
    try:
        # torch warns while rebuilding some tensors (TypedStorage for quantized ones, an O(nnz) scan for sparse
        # ones): noise to the user, and it would turn the command line's one-line report into several lines.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except ModuleNotFoundError as e:  # trusted: the pickle names a class of a package that is not installed
        raise CheckpointError(f"{path}: its pickle needs the module {e.name!r}, which is not installed here; "
                              "install it, or save model.state_dict() instead") from None  # fmt: skip
    except AttributeError as e:  # trusted: the module is there, the class is not (renamed, or defined in a script)
        if not trust_pickle:
            raise CheckpointError(f"{path}: is damaged or not a torch checkpoint ({first_line(e)})") from None
        raise CheckpointError(f"{path}: its pickle needs a class this Python cannot find ({first_line(e)}); import "
                              "the code that defines it, or save model.state_dict() instead") from None  # fmt: skip
    except pickle.UnpicklingError as e:
        name = _unsupported_global(str(e))
        if name is None or trust_pickle:
            raise CheckpointError(f"{path}: is damaged or not a torch checkpoint ({first_line(e)})") from None
        raise RefusedError(
            f"{path}: holds pickled Python objects ({name}) whose loading runs code; "
            "if you trust this file, rerun with --trust-pickle"
        ) from None
    except (CheckpointError, RefusedError):
        raise
    except Exception as e:  # every parser failure of a damaged file ends here
        if is_out_of_memory(e):  # an allocation refused: the machine's limit, not the file
            message = f"{path}: out of memory while loading it ({first_line(e)}); {OOM_FIX}; a torch checkpoint is "
            raise OutOfMemoryError(message + "loaded whole, safetensors files stream") from None
        raise CheckpointError(f"{path}: is damaged or truncated ({first_line(e)})") from None


def _tensors_of(state_dict: Mapping[str, Any]) -> Callable[[str], MemoryTensor]:
    return lambda key: MemoryTensor(state_dict[key])


def _refuse_lazy(path: Path, *named: Iterable[tuple[str, Any]]) -> None:
    """Refuse parameters of a lazy module (``nn.LazyConv2d``) saved before its first forward: they have no shape."""
    for name, value in itertools.chain(*named):
        if isinstance(value, torch.nn.parameter.UninitializedTensorMixin):  # type: ignore[attr-defined]
            raise CheckpointError(f"{path}: {name} belongs to a lazy module not initialized (it has no shape yet); "
                                  "run one forward pass before saving the model")  # fmt: skip


class TorchSource:
    """A torch file as a source: loaded whole; every state dict in its container is a :class:`Part`."""

    def __init__(self, path: Path, fmt: str, trust_pickle: bool = False) -> None:
        self.path, self.format, self.trust_pickle = path, fmt, trust_pickle
        fingerprint = Fingerprint([path])
        obj = load(path, fmt, trust_pickle)
        fingerprint.check(path)  # rewritten while torch read it: what was read may be torn
        if _depth(obj, MAX_DEPTH) > MAX_DEPTH:
            raise CheckpointError(f"{path}: its containers are nested more than {MAX_DEPTH} levels deep; it is "
                                  "damaged or hostile")  # fmt: skip
        conv_modules = None
        if isinstance(obj, torch.nn.Module):
            _refuse_lazy(path, obj.named_parameters(remove_duplicate=False), obj.named_buffers(remove_duplicate=False))
            from ..parametrization import CONV_TYPES

            conv_modules = frozenset(n for n, m in obj.named_modules() if isinstance(m, CONV_TYPES))
            obj = obj.state_dict()
        self.obj = obj
        locations = find_state_dicts(obj)
        if not locations:
            raise CheckpointError(
                f"{path}: holds no state dict (a mapping of names to tensors, bare or under one of "
                f"{', '.join(STATE_DICT_KEYS[:4])}...); save model.state_dict()"
            )
        self.parts = []
        for loc in locations:
            sd = get_at(obj, loc)
            _refuse_lazy(path, sd.items())
            where = f"{path}" + (f" ({'/'.join(loc)})" if loc else "")
            self.parts.append(Part(loc, specs_of(sd), records_of(sd, where), _tensors_of(sd), values=sd,
                                   conv_modules=conv_modules))  # fmt: skip

    def inputs(self) -> list[Path]:
        return [self.path]

    def metadata(self, name: str | None = None) -> dict[str, str]:
        return {}

    def check_unchanged(self) -> None:
        """Loaded whole: what was read is a snapshot, whatever happens to the file since."""

    def close(self) -> None:
        pass


def write_torch(out: OutFile, obj: Any) -> None:
    """``torch.save(obj)`` into ``out``, raising what a write met rather than torch's RuntimeError about it."""
    stream = out.stream()
    try:
        torch.save(obj, stream)  # type: ignore[arg-type]
    except RecursionError:  # shared containers can hide their depth from the check at loading
        raise CheckpointError(f"{out.target}: the input's containers are nested too deeply to be written") from None
    except BaseException:
        if stream.error is not None:
            raise stream.error from None
        raise


def same(a: torch.Tensor, b: Any) -> bool:
    """Same dtype, shape and values; NaN equals NaN (a checkpoint's NaNs are carried over, not an error).

    Sparse, nested and meta tensors (carried over, never transformed) are compared by what they hold.
    """
    if not (isinstance(b, torch.Tensor) and spec_of(a) == spec_of(b)):
        return False
    kind = spec_of(a).kind
    if kind == "meta":  # no data
        return True
    if kind == "nested":
        parts_a, parts_b = a.unbind(), b.unbind()
        return len(parts_a) == len(parts_b) and all(same(x, y) for x, y in zip(parts_a, parts_b, strict=True))
    if kind != "dense":
        return same(a.to_dense(), b.to_dense())
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
