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
from ..statedict.surgery import MemoryTensor, assemble, records_of, spec_of, specs_of, with_records
from .atomic import OutFile, Output
from .checkpoint import Fingerprint, Planned, Reading, Run, Sink, Source, StoredStateDict, Tick, Writing
from .formats import TORCH
from .optimizer_state import OptimizerReport, convert_container

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


# ---- looking into a pickle without running it ----------------------------------------------------------------

#: the largest pickle read by :func:`pickled_modules` (torch keeps tensor data out of it: a few MB for big models;
#: each opcode read becomes a Python object, so a larger one could take GBs of memory)
MAX_SCANNED_PICKLE = 64 * 2**20


class _Global(str):
    """A class or function a pickle names (``module.name``), as opposed to a string it holds."""


class _Object:
    """What a pickle builds by calling something: the class (or function) called, its state and items."""

    def __init__(self, cls: Any) -> None:
        self.cls: Any = cls
        self.state: Any = None
        self.items: list[Any] = []

    def class_name(self) -> str:
        return str(self.cls) if isinstance(self.cls, _Global) else "?"


class _Container:
    """A dict (its ``items``: key-value pairs), list, tuple or set as a pickle builds it."""

    def __init__(self, items: list[Any] | None = None, mapping: bool = False) -> None:
        self.items: list[Any] = items if items is not None else []
        self.mapping = mapping


_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_EMPTY = {"EMPTY_DICT": True, "EMPTY_LIST": False, "EMPTY_TUPLE": False, "EMPTY_SET": False}


def _simulate(data: bytes) -> Any:
    """The object a pickle builds, with every call replaced by an :class:`_Object` naming what it calls: the
    opcodes are read (:func:`pickletools.genops`), nothing is imported or run."""
    import pickletools

    stack: list[Any] = []
    marks: list[int] = []  # where each open MARK is on the stack
    memo: dict[Any, Any] = {}

    def pop_mark() -> list[Any]:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def pairs(items: list[Any]) -> list[tuple[Any, Any]]:
        return list(zip(items[::2], items[1::2], strict=False))

    for opcode, arg, _ in pickletools.genops(data):
        op = opcode.name
        if op in ("PROTO", "FRAME", "NEXT_BUFFER", "READONLY_BUFFER"):
            continue
        if op == "STOP":
            break
        if op == "MARK":
            marks.append(len(stack))
        elif op == "POP":
            stack.pop()
        elif op == "POP_MARK":
            pop_mark()
        elif op == "DUP":
            stack.append(stack[-1])
        elif op in _CONSTANTS:
            stack.append(_CONSTANTS[op])
        elif op in _EMPTY:
            stack.append(_Container(mapping=_EMPTY[op]))
        elif op == "DICT":
            stack.append(_Container(pairs(pop_mark()), mapping=True))
        elif op in ("LIST", "TUPLE", "FROZENSET"):
            stack.append(_Container(pop_mark()))
        elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(op[-1])
            items, stack[-n:] = stack[-n:], []
            stack.append(_Container(items))
        elif op == "APPEND":
            value = stack.pop()
            if isinstance(stack[-1], _Container):
                stack[-1].items.append(value)
        elif op in ("APPENDS", "ADDITEMS"):
            items = pop_mark()
            if isinstance(stack[-1], _Container):
                stack[-1].items.extend(items)
        elif op in ("SETITEM", "SETITEMS"):
            items = [stack.pop(-2), stack.pop()] if op == "SETITEM" else pop_mark()
            if isinstance(stack[-1], _Container | _Object):  # an OrderedDict is a called class given items
                stack[-1].items.extend(pairs(items))
        elif op in ("GLOBAL", "INST"):
            name = _Global(".".join(str(arg).split(" ", 1)))
            if op == "INST":
                pop_mark()
            stack.append(name if op == "GLOBAL" else _Object(name))
        elif op == "STACK_GLOBAL":
            name = stack.pop()
            stack.append(_Global(f"{stack.pop()}.{name}"))
        elif op == "OBJ":
            items = pop_mark()
            stack.append(_Object(items[0] if items else None))
        elif op in ("REDUCE", "NEWOBJ"):
            args = stack.pop()
            called = stack.pop()
            if called in ("copyreg._reconstructor", "copyreg.__newobj__") and isinstance(args, _Container):
                called = args.items[0] if args.items else None
            stack.append(_Object(called))
        elif op == "NEWOBJ_EX":
            del stack[-2:]
            stack.append(_Object(stack.pop()))
        elif op == "BUILD":
            state = stack.pop()
            if isinstance(stack[-1], _Object):
                stack[-1].state = state
        elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif op == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif op == "BINPERSID":
            stack[-1] = _Object("persistent")
        elif op in ("PERSID", "EXT1", "EXT2", "EXT4"):
            stack.append(_Object("persistent"))
        elif opcode.arg is not None:  # a number, a string, bytes
            stack.append(arg)
        else:
            raise ValueError(f"unexpected opcode {op}")
    return stack[-1] if stack else None


def _is_module(node: Any) -> bool:
    """An ``nn.Module``, known by the ``__dict__`` it pickles: its ``_parameters`` and ``_modules``."""
    if not isinstance(node, _Object) or not isinstance(node.state, _Container):
        return False
    keys = {k for k, _ in node.state.items if isinstance(k, str)} if node.state.mapping else set()
    return {"_parameters", "_modules"} <= keys


def _modules_in(root: Any, limit: int = 10_000) -> list[tuple[tuple[Any, ...], str]]:
    """``(location, class)`` of every module in the container ``root`` (not those inside another module)."""
    found: list[tuple[tuple[Any, ...], str]] = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(root, ())]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        node, loc = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if _is_module(node):
            found.append((loc, node.class_name()))
        elif isinstance(node, _Container):
            if node.mapping:
                stack.extend((v, (*loc, k)) for k, v in reversed(node.items) if isinstance(k, str | int))
            else:
                stack.extend((v, (*loc, i)) for i, v in reversed(list(enumerate(node.items))))
    return found


def _holds_a_mapping_of_weights(root: Any) -> bool:
    """Whether the container has a mapping under one of :data:`STATE_DICT_KEYS` (what :func:`find_state_dicts`
    looks at), the pickle's way: a dict, or a called ``OrderedDict``."""

    def mapping(node: Any) -> bool:
        return (isinstance(node, _Container) and node.mapping) or (
            isinstance(node, _Object) and node.cls == "collections.OrderedDict"
        )

    def entries(node: Any) -> dict[str, Any]:
        items = node.items if mapping(node) else []
        return {k: v for k, v in items if isinstance(k, str)}

    top = entries(root)
    return any(mapping(top.get(k)) or any(mapping(entries(top.get(k)).get(i)) for i in STATE_DICT_KEYS)
               for k in STATE_DICT_KEYS)  # fmt: skip


def pickled_modules(path: Path) -> list[tuple[tuple[Any, ...], str]]:
    """Where a torch.save file's container holds pickled ``nn.Module`` objects and no state dict: ``(location,
    class)`` of each, found from the pickle's opcodes without running it; empty for anything else (a state dict, a
    container with one, a module saved whole, a pickle this cannot follow)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist() if i.filename.endswith("data.pkl") and i.filename.count("/") <= 1]
            if len(pickles) != 1 or pickles[0].file_size > MAX_SCANNED_PICKLE:
                return []
            root = _simulate(archive.read(pickles[0]))
    except Exception:  # a pickle this cannot follow: torch.load says what is wrong with it
        return []
    if _is_module(root) or _holds_a_mapping_of_weights(root):
        return []
    return _modules_in(root)


def _modules_error(path: Path, modules: list[tuple[tuple[Any, ...], str]]) -> CheckpointError:
    """The refusal of a container of pickled modules: where they are, and the one line that saves a state dict."""
    listed = ", ".join(f"{'/'.join(map(str, loc))!r} ({cls})" for loc, cls in modules[:4])
    more = f" and {len(modules) - 4} more" if len(modules) > 4 else ""
    loc = next((loc for loc, _ in modules if loc[:1] == ("model",)), modules[0][0])
    entry = "".join(f"[{k!r}]" for k in loc)
    saved = path.with_name(f"{path.stem}.{'.'.join(map(str, loc))}.state_dict.pt")
    command = (f"import torch; c = torch.load({str(path)!r}, weights_only=False); "
               f"torch.save(c{entry}.state_dict(), {str(saved)!r})")  # fmt: skip
    return CheckpointError(
        f"{path}: holds pickled nn.Module objects, not state dicts: {listed}{more}; loading them runs the file's "
        f'code, and --trust-pickle would find no state dict either. If you trust this file, save one: python -c "'
        f'{command}" (with the code that defines {modules[0][1].rsplit(".", 1)[-1]} installed), then convert that'
    )


def load(path: Path, fmt: str, trust_pickle: bool) -> Any:
    """``torch.load`` to the CPU, weights only unless ``trust_pickle``; every failure one line, with the fix.

    A container of pickled modules and no state dict (ultralytics' ``{"model": DetectionModel, "ema": ...}``) is
    refused before anything is unpickled, trusted or not, with where the modules are and how to save a state dict.
    """
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
    modules = pickled_modules(path) if trust_pickle and fmt == TORCH else []  # untrusted: looked at if refused
    if modules:
        raise _modules_error(path, modules)
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
        modules = pickled_modules(path) if fmt == TORCH else []
        if modules:  # --trust-pickle would not help
            raise _modules_error(path, modules) from None
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
    """A torch file as a source: loaded whole; every state dict in its container is a :class:`StoredStateDict`."""

    format: str

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
            self.parts.append(StoredStateDict(loc, specs_of(sd), records_of(sd, where), _tensors_of(sd), values=sd,
                                   conv_modules=conv_modules))  # fmt: skip

    def inputs(self) -> list[Path]:
        return [self.path]

    def metadata(self, name: str | None = None) -> dict[str, str]:
        return {}

    def check_unchanged(self) -> None:
        """Loaded whole: what was read is a snapshot, whatever happens to the file since."""

    def close(self) -> None:
        pass


def source(path: Path, fmt: str, reading: Reading) -> TorchSource:
    """A torch file (``torch`` or ``torch-legacy``) as a source."""
    return TorchSource(path, fmt, reading.trust_pickle)


def sink(src: Source, plans: Planned, target: Path, writing: Writing) -> Sink:
    """One ``torch.save`` of the input's container (or bare state dict), each state dict's steps run in its order
    and its records beside its tensors; the container's optimizer state converted with them (:mod:`.optimizer_state`)
    or, with ``--optimizer drop``, reset."""
    container = src.obj if isinstance(src, TorchSource) else None
    replaced: dict[str, Any] = {}
    optimizers: list[OptimizerReport] = []
    if isinstance(container, Mapping) and plans[0][0].container_keys:  # its optimizers: of its first state dict
        replaced, optimizers = convert_container(container, plans[0][0].specs, plans[0][1].steps, writing.optimizer)  # type: ignore[arg-type]

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        obj = container
        for part, plan in plans:
            steps = {s.source_key: s for s in plan.steps}
            tensors: dict[str, Any] = {}
            for key in part.values if part.values is not None else part.specs:
                step = steps.get(key)
                if step is not None:
                    tensors[step.target_key] = assemble(step, run(part, step))[0]
                else:
                    tensors[key] = part.values[key] if part.values is not None else part.tensor(key).whole()
            obj = set_at(obj, part.container_keys, with_records(tensors, plan.records, part.values))
        if replaced and isinstance(obj, dict):
            obj = type(obj)((k, replaced.get(k, v)) for k, v in obj.items())
        write_torch(output.file(), obj)
        return lambda written: None  # read back by verify_output, as every output is

    return Sink(target, TORCH, False, write, optimizers=optimizers, replaced=replaced)


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
