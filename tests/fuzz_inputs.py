"""Inputs of the differential fuzz suite (``tests/test_fuzz.py``): generated state dicts, written in every input
format ``spectral`` reads, and read back with readers that are not spectral's (torch, safetensors, torch's DCP).

A :class:`Case` is a recipe: entries (name, shape, dtype, layout), a seed for the values, and whether the state
dict sits in a container. :func:`build` makes the tensors; the writers write them honestly (safetensors gets
contiguous, untied clones, as ``save_file`` needs; torch files and DCP get the tensors as they are: transposed,
sliced, expanded, channels_last, views of one storage, the same tensor under two names). A checkpoint, whatever
its format, is seen as a *tree*: the object ``torch.save`` was given (a state dict, or a container holding one),
a flat state dict for safetensors, the nested dict DCP saved, and for a model directory ``{unit: tree}`` beside
its other files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint  # its logger exists from now on
from hypothesis import strategies as st

#: torch's DCP logs every save and load at DEBUG: pages of lines in each failure report
logging.getLogger("c10d-NullHandler-dcp_logger").setLevel(logging.WARNING)

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: every other dtype a checkpoint may hold (float8, ints, bool, complex64)
OTHER_DTYPES = ("float8_e4m3fn", "float8_e5m2", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                "uint64", "bool", "complex64")  # fmt: skip
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "channels_last", "shared")

#: input formats, and the outputs asked of each (a tag per ``-o`` form; some are refusals the README documents)
INPUT_FORMATS = ("torch", "legacy", "safetensors", "sharded", "modeldir", "dcp")
OUTPUTS = {
    "torch": ("pt", "safetensors", "default", "shards"),
    "legacy": ("pt", "safetensors", "default", "shards"),
    "safetensors": ("pt", "safetensors", "default", "shards"),
    "sharded": ("shards", "resharded", "safetensors", "default", "pt"),
    "modeldir": ("dir", "resharded", "default", "safetensors"),
    "dcp": ("dcp", "safetensors", "default", "pt"),
}
#: the format an output tag writes, for an input of each format
OUTPUT_FORMAT = {"pt": "torch", "safetensors": "safetensors", "shards": "sharded", "dcp": "dcp"}
MAX_SHARD_SIZES = ("1", "100", "1KB")
TORCH_FORMATS = ("torch", "legacy")


# ---- the recipe ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One entry of the state dict. ``kind``: ``tensor`` (made from shape, dtype, layout), ``tied`` (the very
    tensor of entry ``of``), ``object`` (a non-tensor ``value``, as ``_extra_state`` holds). ``torch_only``:
    only torch files can hold it (a non-tensor, a name that is not UTF-8)."""

    name: str
    kind: str = "tensor"
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    layout: str = "contiguous"
    special: bool = False  # NaN, inf, -0.0 (floats) or the extremes (ints) among the values
    of: str = ""
    value: Any = None
    torch_only: bool = False

    def __repr__(self) -> str:
        if self.kind == "tied":
            return f"{self.name!r}: <same tensor as {self.of!r}>"
        if self.kind == "object":
            return f"{self.name!r}: {self.value!r}"
        extra = ", special values" if self.special else ""
        return f"{self.name!r}: {self.dtype}{list(self.shape)} {self.layout}{extra}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints a failing example
        printer.text(repr(self))


@dataclass(frozen=True)
class Case:
    entries: tuple[Entry, ...]
    seed: int
    #: the state dict inside a container (torch: ``{"state_dict": sd, "epoch": 7}``; DCP: ``{"model": sd, ...}``)
    container: bool = False
    #: model directories: which layout (``st``, ``bin``, ``component``, ``sharded``) and whether a second unit
    #: with nothing to convert sits beside it
    model_dir: str = "st"
    second_unit: bool = False
    #: sharded inputs: how many shards
    shards: int = 1
    #: awkward directory names for the input and output
    folder: str = "in"

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(e) for e in self.entries)
        return (f"Case(seed={self.seed}, container={self.container}, model_dir={self.model_dir!r}, "
                f"second_unit={self.second_unit}, shards={self.shards}, folder={self.folder!r}, entries={{\n  "
                f"{inner}\n}})")  # fmt: skip

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


# ---- values and layouts ----------------------------------------------------------------------------------------


def fill(shape: tuple[int, ...], dtype: str, g: torch.Generator, special: bool = False) -> torch.Tensor:
    """Random values of ``dtype`` (contiguous)."""
    dt = getattr(torch, dtype)
    if dtype == "bool":
        t = torch.randint(0, 2, shape, generator=g).bool()
    elif dtype == "complex64":
        t = torch.randn(shape, generator=g, dtype=torch.complex64)
    elif dt.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64 if dtype == "float64" else torch.float32).to(dt)
    else:
        info = torch.iinfo(dt)
        low, high = max(info.min, -1000), min(info.max, 1000)
        t = torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dt)
    if special and t.numel():
        flat = t.view(-1)
        if dt.is_floating_point or dt.is_complex:
            extremes = [math.nan, math.inf, -math.inf, -0.0]
        elif dtype == "bool":
            extremes = [True]
        else:
            info = torch.iinfo(dt)
            extremes = [info.min, info.max]
        for i, v in enumerate(extremes[: flat.numel()]):
            flat[(i * 7919) % flat.numel()] = v
    return t


def _laid_out(entry: Entry, g: torch.Generator) -> torch.Tensor:
    shape, rank = entry.shape, len(entry.shape)
    layout = entry.layout
    if layout == "transposed" and rank >= 2:  # the dims reversed in memory: .t() for a matrix
        order = tuple(reversed(range(rank)))
        return fill(tuple(shape[d] for d in order), entry.dtype, g, entry.special).permute(order)
    if layout == "sliced" and rank >= 1:  # every other element of dim 1 (dim 0 for a vector): x[:, ::2]
        dim = 1 if rank >= 2 else 0
        wide = tuple(2 * n if d == dim else n for d, n in enumerate(shape))
        index = (slice(None),) * dim + (slice(None, None, 2),)
        return fill(wide, entry.dtype, g, entry.special)[index]
    if layout == "expanded" and rank >= 1:  # stride 0 on dim 0
        return fill((1, *shape[1:]), entry.dtype, g, entry.special).expand(shape)
    if layout == "channels_last" and rank in (4, 5):
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        return fill(shape, entry.dtype, g, entry.special).contiguous(memory_format=fmt)
    return fill(shape, entry.dtype, g, entry.special)


def build(case: Case, *, torch_only: bool = True) -> dict[str, Any]:
    """The state dict of ``case``, its tensors laid out as asked (``torch_only=False``: without what only torch
    files hold). Entries of layout ``shared`` of one dtype are views of one storage, at offsets with gaps."""
    g = torch.Generator().manual_seed(case.seed)
    entries = [e for e in case.entries if torch_only or not e.torch_only]
    values: dict[str, Any] = {}
    shared: dict[str, list[Entry]] = {}
    for e in entries:
        if e.kind == "tensor" and e.layout == "shared":
            shared.setdefault(e.dtype, []).append(e)
        elif e.kind == "tensor":
            values[e.name] = _laid_out(e, g)
        elif e.kind == "object":
            values[e.name] = e.value
    for dtype, group in shared.items():
        sizes = [math.prod(e.shape) for e in group]
        base = fill((sum(sizes) + 2 * len(group) + 1,), dtype, g, any(e.special for e in group))
        offset = 1
        for e, n in zip(group, sizes, strict=True):
            values[e.name] = base[offset : offset + n].view(e.shape)
            offset += n + 2
    for e in entries:
        if e.kind == "tied" and e.of in values:
            values[e.name] = values[e.of]
    return {e.name: values[e.name] for e in entries if e.name in values}


# ---- strategies ----------------------------------------------------------------------------------------------

#: what a case may vary: ``data`` (every dtype, every layout, shared storage, ties, NaN/inf), ``shapes`` (zero-size
#: dims, 1-tap dims, buffers of any rank), ``names`` (unicode, odd dots, wrapper prefixes, containers, what only a
#: torch file holds). An axis left out stays plain (float32-ish contiguous tensors, ordinary shapes, ASCII names),
#: so that a frequent bug of one axis does not hide those of the others (hypothesis stops looking soon after its
#: first bug).
AXES = frozenset({"data", "shapes", "names"})

_ASCII = st.sampled_from(["conv", "conv1", "0", "1", "12", "enc", "layer1", "bn", "_x", "fc", "g_a", "Conv"])
_AWKWARD = st.sampled_from(["ü", "層", "café", "🙂", "א", "e\u0301", "a b", "x-y", "[0]", "*", "?", "\x1b[31m",
                            "weight", "parametrizations", "module", "model", "\u202e"])  # fmt: skip
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="."), min_size=1, max_size=4)


@st.composite
def segments(draw: st.DrawFn, wild: bool = True) -> str:
    """A segment of a module name: mostly ASCII, often unicode or odd characters, now and then empty (``a..b``)."""
    if not wild:
        return draw(_ASCII)
    kind = draw(st.sampled_from(["ascii"] * 6 + ["awkward"] * 3 + ["text"] * 2 + ["empty"]))
    return draw({"ascii": _ASCII, "awkward": _AWKWARD, "text": _TEXT, "empty": st.just("")}[kind])


def module_names(wild: bool = True) -> st.SearchStrategy[str]:
    return st.lists(segments(wild), min_size=1, max_size=3).map(".".join)


def dims(wild: bool) -> st.SearchStrategy[int]:
    """Channels: 0 now and then."""
    return st.sampled_from([1, 1, 2, 2, 3, 3, 0] if wild else [1, 2, 3])


def taps(wild: bool, rank: int) -> st.SearchStrategy[int]:
    """Kernel dims: 1-tap dims often, 0 now and then (3-D kernels: at most 3 taps a dim)."""
    plain = [1, 2, 3] if rank == 3 else [1, 2, 3, 4, 5, 2, 3]
    return st.sampled_from(plain * 3 + [0] if wild else plain[1:] + plain)


float_dtypes = st.sampled_from(FLOAT_DTYPES)
any_dtype = st.one_of(float_dtypes, st.sampled_from(OTHER_DTYPES))


@dataclass(frozen=True)
class Draw:
    """Which axes vary in a case, and the draws that depend on them."""

    axes: frozenset[str]

    def dtype(self, draw: st.DrawFn, odd: int) -> str:
        """A float dtype; with ``data``, any dtype in ``odd`` draws of 10."""
        if "data" in self.axes and draw(st.integers(0, 9)) >= 10 - odd:  # rare ones last: they shrink away
            return draw(any_dtype)
        return draw(float_dtypes) if "data" in self.axes else "float32"

    def tensor(self, draw: st.DrawFn, name: str, shape: tuple[int, ...], dtype: str) -> Entry:
        if "data" not in self.axes:
            return Entry(name, shape=shape, dtype=dtype)
        return Entry(name, shape=shape, dtype=dtype, layout=draw(st.sampled_from(LAYOUTS)),
                     special=draw(st.integers(0, 9)) == 9)  # fmt: skip


@st.composite
def modules(draw: st.DrawFn, name: str, how: Draw, conv: bool = False) -> list[Entry]:
    """The entries of one module: a conv (weight of rank 3 to 5, bias, maybe a mask), a linear, a norm layer, or a
    buffer of any rank and dtype. ``conv``: a conv of a float dtype, mostly."""
    kind = "conv" if conv else draw(st.sampled_from(["conv"] * 3 + ["linear", "norm", "buffer"]))
    wild = "shapes" in how.axes
    dtype = how.dtype(draw, 1 if conv else 3)
    if kind == "conv":
        rank = draw(st.integers(1, 3))
        kernel = tuple(draw(taps(wild, rank)) for _ in range(rank))
        out_ch, in_ch = draw(dims(wild)), draw(dims(wild))
        out = [how.tensor(draw, f"{name}.weight", (out_ch, in_ch, *kernel), dtype)]
        if draw(st.booleans()):
            out.append(how.tensor(draw, f"{name}.bias", (out_ch,), dtype))
        if draw(st.integers(0, 9)) == 9:  # CompressAI's MaskedConv2d: a mask of the weight's shape and dtype
            out.append(how.tensor(draw, f"{name}.mask", (out_ch, in_ch, *kernel), dtype))
        return out
    if kind == "linear":
        shape = (draw(dims(wild)), draw(dims(wild)))
        return [how.tensor(draw, f"{name}.weight", shape, dtype), how.tensor(draw, f"{name}.bias", shape[:1], dtype)]
    if kind == "norm":
        c = (draw(dims(wild)),)
        return [how.tensor(draw, f"{name}.{leaf}", c, dtype) for leaf in ("weight", "bias", "running_mean",
                "running_var")] + [Entry(f"{name}.num_batches_tracked", shape=(), dtype="int64")]  # fmt: skip
    leaf = draw(st.sampled_from(["mask", "scale", "table", "weight", "weight_g", "embedding"]))
    sizes = [0, 1, 2, 3] if wild else [1, 2, 3]
    shape = tuple(draw(st.lists(st.sampled_from(sizes), max_size=6 if wild else 2)))
    return [how.tensor(draw, f"{name}.{leaf}", shape, how.dtype(draw, 5))]


_OBJECTS = st.sampled_from([7, "v1", {"version": 2}, (1, "a"), [1.5, None], None, 3.25])


@st.composite
def cases(draw: st.DrawFn, axes: frozenset[str] = AXES) -> Case:
    """A state dict varying along ``axes``, and how it is laid out on disk."""
    how = Draw(axes)
    names_wild = "names" in axes
    prefixes = ["", "", "", "module.", "model.", "_orig_mod.", "module._orig_mod."] if names_wild else [""]
    prefix = draw(st.sampled_from(prefixes))
    names = draw(st.lists(module_names(names_wild), min_size=1, max_size=5, unique=True))
    entries: list[Entry] = []
    for i, name in enumerate(names):  # the first one a conv: most cases have something to convert
        entries += draw(modules(prefix + name, how, conv=i == 0))
    tensors = [e for e in entries if e.kind == "tensor"]
    ties = draw(st.sampled_from([0, 0, 0, 1, 2])) if "data" in axes else 0
    for _ in range(ties):  # one tensor under a second name
        of = draw(st.sampled_from(tensors))
        leaf = draw(st.sampled_from(["weight", "bias", "tied"]))
        entries.append(Entry(f"{prefix}{draw(module_names(names_wild))}.{leaf}", kind="tied", of=of.name))
    if names_wild and draw(st.integers(0, 4)) == 4:  # what only a torch file holds: objects, non-UTF-8 names
        for _ in range(draw(st.integers(1, 2))):
            if draw(st.integers(0, 2)) < 2:
                entries.append(Entry(f"{prefix}{draw(module_names())}._extra_state", kind="object",
                                     value=draw(_OBJECTS), torch_only=True))  # fmt: skip
            else:
                entries.append(Entry(f"{prefix}x\udcff.weight", shape=(2, 2, 3), torch_only=True))
    unique: dict[str, Entry] = {}
    for e in entries:
        unique.setdefault(e.name, e)
    return Case(
        entries=tuple(unique.values()),
        seed=draw(st.integers(0, 2**32 - 1)),
        container=names_wild and draw(st.integers(0, 3)) == 3,
        model_dir=draw(st.sampled_from(["st", "bin", "component", "sharded"])),
        second_unit=draw(st.booleans()),
        shards=draw(st.integers(1, 3)),
        folder=draw(st.sampled_from(["in", "in", "in dir", "ïn"])) if names_wild else "in",
    )


# ---- writing inputs ------------------------------------------------------------------------------------------


RECORDS = "spectral_cli"


def records(sd: Any) -> dict[str, Any] | None:
    """The spectral records a state dict carries in torch's ``_metadata`` (the pure functions put them there)."""
    return (getattr(sd, "_metadata", None) or {}).get(RECORDS)


def carrying(tensors: Mapping[str, Any], like: Any) -> OrderedDict[str, Any]:
    """``tensors`` as a state dict with the ``_metadata`` of ``like`` (its records)."""
    out: OrderedDict[str, Any] = OrderedDict(tensors)
    if getattr(like, "_metadata", None) is not None:
        out._metadata = like._metadata  # type: ignore[attr-defined]
    return out


def untied_contiguous(sd: Mapping[str, Any]) -> OrderedDict[str, torch.Tensor]:
    """What ``safetensors.torch.save_file`` accepts: contiguous tensors that share no memory (honestly: clones)."""
    return carrying({k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}, sd)


def save_safetensors(sd: Mapping[str, torch.Tensor], path: Path) -> None:
    """``save_file``, with the records of these tensors as JSON in ``__metadata__["spectral_cli"]`` (README)."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    doc = records(sd)
    mine = {k: v for k, v in (doc or {}).get("layers", {}).items() if k in sd}
    if doc is not None and mine:
        metadata[RECORDS] = json.dumps({**doc, "layers": mine})
    save_file(dict(sd), str(path), metadata=metadata)


def save_shards(sd: Mapping[str, torch.Tensor], directory: Path, n: int, stem: str = "model") -> None:
    """Hugging Face shards: ``<stem>-0000i-of-0000n.safetensors`` and ``<stem>.safetensors.index.json`` (each shard
    with the records of its tensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    n = max(1, min(n, len(keys)))
    cut = [keys[i * len(keys) // n : (i + 1) * len(keys) // n] for i in range(n)]
    weight_map = {}
    for i, part in enumerate(cut):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_safetensors(carrying({k: sd[k] for k in part}, sd), directory / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_dcp(obj: Mapping[str, Any], directory: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(obj), checkpoint_id=str(directory), no_dist=True)


def second_unit_sd(seed: int) -> dict[str, torch.Tensor]:
    """A unit with nothing to convert (a text encoder beside a UNet)."""
    g = torch.Generator().manual_seed(seed + 1)
    return {"embed.weight": fill((3, 2), "float32", g), "norm.bias": fill((2,), "bfloat16", g)}


@dataclass
class Written:
    """An input as written: its path, its tree (what the independent readers give back from it), and where the
    state dicts sit in that tree (model directories: ``(unit,)`` or below)."""

    path: Path
    format: str
    tree: Any
    parts: list[tuple[str, ...]]


def arrange(case: Case, fmt: str, sd: Mapping[str, Any]) -> tuple[Any, list[tuple[str, ...]]]:
    """The tree ``write_input`` writes for ``sd`` as ``fmt``, and where its state dicts are in it."""
    if fmt in TORCH_FORMATS:
        if case.container:
            return {"state_dict": sd, "epoch": 7, "hyper_parameters": {"lr": 0.1}}, [("state_dict",)]
        return sd, [()]
    if fmt == "dcp":
        return ({"model": sd, "step": 3}, [("model",)]) if case.container else (sd, [()])
    flat = untied_contiguous(sd)
    if fmt in ("safetensors", "sharded"):
        return flat, [()]
    unit = {"component": "ünet/diffusion_pytorch_model", "bin": "pytorch_model.bin"}.get(case.model_dir, "model")
    tree = {unit: sd if case.model_dir == "bin" else flat}  # a torch unit keeps layouts and ties
    if case.second_unit:
        tree["text_encoder/model"] = second_unit_sd(case.seed)
    return tree, [(u,) for u in tree]


def write_input(case: Case, fmt: str, root: Path, sd: Mapping[str, Any] | None = None) -> Written:
    """Write ``case`` (or ``sd``, a state dict made from it) as ``fmt`` under ``root / case.folder``."""
    folder = root / case.folder
    folder.mkdir(parents=True)
    if sd is None:
        sd = build(case, torch_only=fmt in TORCH_FORMATS)
    tree, parts = arrange(case, fmt, sd)
    if fmt in TORCH_FORMATS:
        path = folder / "model.pt"
        torch.save(tree, path, _use_new_zipfile_serialization=fmt == "torch")
    elif fmt == "dcp":  # the records: a JSON entry beside the state dict's tensors (README)
        path = folder / "ckpt_dcp"
        doc = records(sd)
        flat = {**sd, RECORDS: json.dumps(doc)} if doc is not None else dict(sd)
        save_dcp({**tree, "model": flat} if case.container else flat, path)
    elif fmt == "safetensors":
        path = folder / "model.safetensors"
        save_safetensors(tree, path)
    elif fmt == "sharded":
        path = folder / "ckpt"
        save_shards(tree, path, case.shards)
    else:
        path = folder / "hf model"
        path.mkdir()
        (path / "README.md").write_text("# a model card\n")
        if case.model_dir == "component":
            (path / "model_index.json").write_text('{"_class_name": "Pipeline", "unet": ["diffusers", "UNet"]}')
            (path / "ünet").mkdir()
            (path / "ünet" / "config.json").write_text('{"sample_size": 8}')
        else:
            (path / "config.json").write_text('{"model_type": "fuzz", "hidden_size": 4}')
        for unit, value in tree.items():
            (path / unit).parent.mkdir(exist_ok=True)
            if unit.endswith(".bin"):
                torch.save(value, path / unit)
            elif case.model_dir == "sharded" and unit == "model":
                save_shards(value, path, case.shards)
            else:
                save_safetensors(value, path / f"{unit}.safetensors")
    return Written(path, fmt, tree, parts)


def relaid(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in another layout: dims reversed in memory, every other element of a wider tensor along
    dim 1, or channels_last."""
    rank = t.dim()
    if layout == "transposed" and rank >= 2:
        order = tuple(reversed(range(rank)))
        return t.permute(order).contiguous().permute(order)
    if layout == "sliced" and rank >= 2:
        wide = torch.zeros((t.shape[0], 2 * t.shape[1], *t.shape[2:]), dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "channels_last" and rank in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    return t


# ---- reading outputs, without spectral -----------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:  # type: ignore[no-untyped-call]
        metadata = dict(f.metadata() or {})
    return load_file(str(path)), metadata


def read_shards(directory: Path, index: Path | None = None) -> dict[str, torch.Tensor]:
    """A sharded checkpoint: every shard its index names, each tensor in the shard the index says."""
    index = index or next(directory.glob("*.safetensors.index.json"))
    weight_map = json.loads(index.read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors, _ = read_safetensors(directory / shard)
        for key, value in tensors.items():
            assert weight_map.get(key) == shard, f"{index.name} maps {key!r} to {weight_map.get(key)}, not {shard}"
            assert key not in out, f"{key!r} in two shards"
            out[key] = value
    assert sorted(out) == sorted(weight_map), "the index names tensors no shard holds"
    return out


def read_dcp(directory: Path) -> Any:
    """A DCP directory through torch's own reader: the nested dict it was saved from (records entries included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metadata = FileSystemReader(str(directory)).read_metadata()
        flat: dict[str, Any] = {}
        for fqn, meta in metadata.state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                flat[fqn] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            else:
                flat[fqn] = None
        dcp.load(flat, checkpoint_id=str(directory), no_dist=True)
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    tree: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = tuple(paths.get(fqn, (fqn,)))
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _unit_of(relative: Path) -> str:
    name = relative.name
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            stem = name.removesuffix(suffix)
            if suffix == ".safetensors" and "-of-" in stem:  # a shard: its index is its unit
                return ""
            return str(relative.parent / stem) if str(relative.parent) != "." else stem
    return str(relative)


def read_model_dir(directory: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``{unit: tree}`` (a unit: ``<folder>/<stem>`` of a safetensors file or an index, or a torch file's path)
    and the other files' bytes."""
    units: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            full = Path(dirpath) / name
            relative = full.relative_to(directory)
            if name.endswith(".safetensors.index.json"):
                units[_unit_of(relative)] = read_shards(full.parent, full)
            elif name.endswith(".safetensors"):
                unit = _unit_of(relative)
                if unit:
                    units[unit] = read_safetensors(full)[0]
            elif name.endswith((".bin", ".pt")):
                units[str(relative)] = torch.load(full, map_location="cpu", weights_only=True)
            else:
                files[str(relative)] = full.read_bytes()
    return units, files


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (any dtype, any layout, 0-dim included)."""
    # a fresh copy: ``contiguous()`` keeps a size-1 dim's odd stride, which ``view(uint8)`` refuses
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().cpu().reshape(-1))
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def files_under(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` (hidden ones included), with its bytes."""
    out = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            full = Path(dirpath) / name
            out[str(full.relative_to(directory))] = full.read_bytes()
    return out
