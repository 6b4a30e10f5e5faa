"""Differential fuzz suite (hypothesis): ``spectral convert`` and ``spectral bake`` against the library's pure
functions, through every input and output format, read back with readers that are not spectral's.

Generated state dicts (``tests/fuzz_inputs.py``): conv kernels of rank 3 to 5 (1-D to 3-D convs) with 1-tap and
zero-size dims, biases, masks, linear and norm layers, buffers of any rank; every dtype (float16, bfloat16, float32,
float64, float8 e4m3fn/e5m2, ints, bool, complex64), NaN/inf now and then; transposed, sliced, expanded,
channels_last tensors, views of one storage, one tensor under two names; unicode names, odd dots, ``module.`` /
``model.`` prefixes; ``_extra_state`` objects and non-UTF-8 names (torch files only); a trainer's container.

Each is written as a torch zip file, a legacy torch file, a safetensors file, a sharded safetensors directory, a
model directory (``save_pretrained``-style, a diffusers component folder, a torch ``.bin`` unit) or a DCP
directory, then converted (both bases) or converted and baked to every output the command line offers for that
input, and read back with ``torch.load(weights_only=True)``, ``safetensors.torch.load_file`` and torch's DCP
loader. The expected contents come from :func:`spectral_cli.convert_state_dict` /
:func:`spectral_cli.bake_state_dict` on the tensors in memory: every expected key present, same dtype and shape,
tensors carried over bit for bit, converted and baked tensors bit for bit equal to the pure function's (the
README: a tensor gets the same bits on every path; NaN and inf inputs included). A refusal must be the
documented one (exit code, one line on stderr, ``--json``'s document) and leave the directory tree exactly as it
was: no output, no hidden temporary, the input untouched. Convert then bake gives the input back within the
round-trip bound of each dtype. Three tests: convert; convert then bake; bake of the pure conversion written by
torch, safetensors and DCP themselves. Each runs once per axis set (``AXIS_SETS``): everything at once, and each
axis of ``fuzz_inputs.AXES`` alone.

Budget: under the ``ci`` profile (the default) 50, 35 and 30 examples per instance, 460 in all: about a minute on
2 cores when nothing fails (a failure adds its shrinking, up to minutes); ``HYPOTHESIS_PROFILE=long`` runs 500 per
instance. ``HYPOTHESIS_SEED=<n>`` replays a run; a failing case prints as a recipe (``fuzz_inputs.build``).

Beside the differential suite, properties of the command line on model-like checkpoints (conv kernels of rank 1 to
3 with kernel sizes 1 to 6, rectangular too, grouped and transposed layouts, Linear and BatchNorm entries beside
them, wrapper prefixes ``module.`` / ``_orig_mod.`` and trainer containers, written as torch files or safetensors):
convert then bake gives the input back (same keys, in the same order for torch files, same dtypes, every converted
kernel within a few units of its dtype's rounding, everything else bit for bit); converting a converted file
reports every layer as already spectral and writes nothing; ``spectral inspect --json`` on the output lists exactly
what ``convert --json`` reported. And a safetensors header whose length makes the file start like a pickle is read
as safetensors.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzz_inputs import (
    AXES,
    INPUT_FORMATS,
    MAX_SHARD_SIZES,
    OUTPUT_FORMAT,
    OUTPUTS,
    RECORDS,
    TORCH_FORMATS,
    Case,
    Written,
    arrange,
    build,
    carrying,
    cases,
    files_under,
    read_dcp,
    read_model_dir,
    read_safetensors,
    read_shards,
    records,
    relaid,
    same_bits,
    write_input,
)
from hypothesis import Phase, assume, event, given, settings
from hypothesis import strategies as st
from models import listing, parse_json, read, rel_err, spectral

from spectral_cli import bake_state_dict, convert_state_dict
from spectral_cli.errors import EXIT_CODES, SpectralError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

BASES = ("rfft", "rdft")
#: convert then bake of one kernel, relative to its largest tap: two roundings to the stored dtype for the half
#: precisions, a few float32/float64 operations for the others
TOLERANCE = {"float16": 4 * 2**-10, "bfloat16": 4 * 2**-7, "float32": 2e-6, "float64": 1e-13}
#: the exit codes the README documents (128+N: signals, which these runs never send)
DOCUMENTED = {int(code) for code in EXIT_CODES if code.isdigit()}

Path_ = tuple[Any, ...]

#: an output that differs from what the pure function says, by input format (hypothesis tells failures apart by
#: their exception's type and line: a bug of the DCP reader must not hide one of the torch reader)
WRONG_OUTPUT = {fmt: type(f"WrongOutputFrom_{fmt}", (AssertionError,), {}) for fmt in INPUT_FORMATS}


# ---- what a command must do ----------------------------------------------------------------------------------


@dataclass
class Source:
    """A checkpoint as the test knows it: its format and path, its tree, where its state dicts are, and the tree of
    the original tensors (for the round trip)."""

    format: str
    path: Path
    tree: Any
    parts: list[Path_]
    original: Any
    readable: bool = True


@dataclass
class Expected:
    """Exit ``code``; when 0, the output's ``format``, ``tree`` and ``target``, the ``transformed`` paths (the
    pure function's results; every other tensor is carried over), and the keys ``--json`` lists."""

    code: int
    why: str
    format: str = ""
    target: Path | None = None
    tree: Any = None
    parts: list[Path_] = field(default_factory=list)
    original: Any = None
    transformed: set[Path_] = field(default_factory=set)
    keys: list[str] = field(default_factory=list)
    #: what was read back from the output (model directories: ``{unit: tree}``), once checked
    actual: Any = None


def get_at(tree: Any, loc: Path_) -> Any:
    for key in loc:
        tree = tree[key]
    return tree


def set_at(tree: Any, loc: Path_, value: Any) -> Any:
    if not loc:
        return value
    copy = dict(tree)
    copy[loc[0]] = set_at(tree[loc[0]], loc[1:], value)
    return copy


def storable(sd: Mapping[str, Any]) -> bool:
    """What safetensors can hold: tensors only, UTF-8 names (README: anything else is named and refused)."""

    def utf8(key: str) -> bool:
        try:
            key.encode()
        except UnicodeEncodeError:
            return False
        return True

    return all(isinstance(v, torch.Tensor) and utf8(k) for k, v in sd.items())


def output_format(source: Source, tag: str) -> str:
    if tag == "default":
        return "torch" if source.format == "legacy" else source.format
    if tag in ("dir", "resharded") and source.format == "modeldir":
        return "modeldir"
    return OUTPUT_FORMAT.get(tag, "sharded")


def refusal(source: Source, tag: str) -> str | None:
    """Why the README says this input cannot be written this way (exit 5), or None."""
    fmt = source.format
    if fmt in TORCH_FORMATS and tag == "shards":
        return "--max-shard-size writes safetensors shards; it needs a safetensors input"
    if fmt in ("sharded", "dcp") and tag == "pt":
        return f"a {fmt} input is not written as a torch file"
    if fmt == "modeldir" and tag == "safetensors":
        return "a model directory is written as one"
    if fmt in TORCH_FORMATS and tag == "safetensors":
        if source.parts != [()]:
            return "safetensors holds only tensors, and a container is more"
        if not storable(source.tree):
            return "safetensors cannot hold non-tensors or non-UTF-8 names"
    return None


def default_target(path: Path, action: str, fmt: str) -> Path:
    """README: ``model.pt`` -> ``model.spectral.pt`` / ``model.baked.pt``, ``ckpt/`` -> ``ckpt.spectral/``; a legacy
    file is written as a zip file, an earlier tag replaced."""
    tag = "spectral" if action == "convert" else "baked"
    if fmt in ("sharded", "dcp", "modeldir"):
        return path.with_name(f"{path.name.removesuffix('.spectral').removesuffix('.baked')}.{tag}")
    stem = path.stem.removesuffix(".spectral").removesuffix(".baked")
    return path.with_name(f"{stem}.{tag}{path.suffix}")


def command(source: Source, action: str, tag: str, out_dir: Path, shard_size: str) -> tuple[list[Any], Path]:
    """The arguments of ``spectral`` and the output path."""
    names = {"pt": "x.pt", "safetensors": "x.safetensors", "shards": "x_shards", "resharded": "x_shards",
             "dcp": "x_dcp", "dir": "x_dir"}  # fmt: skip
    if source.format == "modeldir" and tag == "resharded":
        names["resharded"] = "x_dir"
    if tag == "default":
        target = default_target(source.path, action, output_format(source, tag))
        args: list[Any] = [action, source.path]
    else:
        target = out_dir / (f"{action[0]}_" + names[tag])
        args = [action, source.path, "-o", target]
    if tag in ("shards", "resharded") and not (tag == "shards" and source.format == "sharded"):
        args += ["--max-shard-size", shard_size]
    return args, target


def pure(action: str, sd: Mapping[str, Any], basis: str) -> Any:
    if action == "convert":
        return convert_state_dict(sd, basis=basis)  # type: ignore[arg-type]
    return bake_state_dict(sd)


def expect(source: Source, action: str, tag: str, basis: str, target: Path) -> Expected:
    """What ``spectral <action>`` must do, from the pure functions and the README's rules, in the order the
    command checks them: the input read, the plan, nothing to do, the output's format."""
    if not source.readable:
        return Expected(3, "torch's own loader cannot read this input: damaged for spectral too")
    tree, transformed, keys, changed = source.tree, set(), [], False
    for loc in source.parts:
        try:
            result = pure(action, get_at(source.tree, loc), basis)
        except SpectralError as e:
            return Expected(e.exit_code, f"the pure function refuses: {e}")
        tree = set_at(tree, loc, result.state_dict)
        transformed |= {(*loc, c.target_key) for c in result.changed}
        keys += [c.target_key for c in result.changed]
        changed |= bool(result.changed)
    if not changed:
        return Expected(6, "nothing to do")
    why = refusal(source, tag)
    if why is not None:
        return Expected(5, why)
    fmt = output_format(source, tag)
    parts, original = source.parts, source.original
    if fmt == "safetensors" and parts != [()]:  # one state dict of a DCP checkpoint, written alone
        (loc,) = parts
        tree, original, parts = get_at(tree, loc), get_at(original, loc), [()]
        transformed = {p[len(loc) :] for p in transformed}
    return Expected(0, "written", fmt, target, tree, parts, original, transformed, keys)


# ---- reading what was written ----------------------------------------------------------------------------------


def read_output(fmt: str, target: Path) -> tuple[Any, Any]:
    """The output's tree, and its records (torch: ``_metadata``; safetensors: ``__metadata__``), with readers that
    are not spectral's."""
    if fmt == "torch":
        tree = torch.load(target, map_location="cpu", weights_only=True)
        return tree, tree
    if fmt == "safetensors":
        tensors, metadata = read_safetensors(target)
        return tensors, metadata
    if fmt == "sharded":
        return read_shards(target), None
    if fmt == "dcp":
        return strip_records(read_dcp(target)), None
    units, files = read_model_dir(target)
    return {"units": units, "files": files}, None


def strip_records(tree: Any) -> Any:
    """A DCP tree without the records entries spectral adds beside converted tensors (JSON text)."""
    if not isinstance(tree, dict):
        return tree
    return {k: strip_records(v) for k, v in tree.items() if not (k == RECORDS and isinstance(v, str))}


def records_of(fmt: str, written: Any, sd: Any) -> tuple[Any, Any]:
    """(records the output carries, records the pure function's state dict carries)."""
    if fmt == "torch":
        return records(written), records(sd)
    text = written.get(RECORDS)
    return (json.loads(text) if text is not None else None), records(sd)


def compare(actual: Any, expected: Any, transformed: set[Path_], path: Path_ = ()) -> None:
    """``actual`` holds every key of ``expected`` and nothing else, each with the same dtype, shape and bits (those
    carried over as they were, the others as the pure function made them)."""
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: a {type(actual).__name__}, not a mapping"
        missing = [k for k in expected if k not in actual]
        assert not missing, f"{path}: keys missing from the output: {missing}"
        extra = [k for k in actual if k not in expected]
        assert not extra, f"{path}: keys the output should not have: {extra}"
        for key in expected:
            compare(actual[key], expected[key], transformed, (*path, key))
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: a {type(actual).__name__}, not a tensor"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype}, expected {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        if path in transformed:  # README: "a tensor gets the same bits on every path"
            assert same_bits(actual, expected), f"{path}: differs from the pure function's result"
        else:
            assert same_bits(actual, expected), f"{path}: carried over, but not bit for bit"
    else:
        assert actual == expected, f"{path}: {actual!r}, expected {expected!r}"


# ---- running and checking --------------------------------------------------------------------------------------


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


def run(args: list[Any], as_json: bool) -> Ran:
    result = spectral(*args, *(["--json"] if as_json else []))
    return Ran(result.exit_code, result.stdout, result.stderr)


def check(source: Source, action: str, tag: str, basis: str, root: Path, shard_size: str, as_json: bool) -> Expected:
    """Run ``spectral <action>`` on ``source`` and check it against the pure function; returns what was expected
    (the output, when one was written)."""
    args, target = command(source, action, tag, root / "öut", shard_size)
    if action == "convert":
        args += ["--basis", basis]
    before = files_under(root)
    try:
        want = expect(source, action, tag, basis, target)
    except Exception as e:  # the pure function itself crashed: a library bug, whatever the command does
        ran = run(args, as_json)
        raise AssertionError(
            f"{action}_state_dict crashed ({type(e).__name__}: {e}); the command exited {ran.code}: "
            f"{ran.stderr.strip()[:300]}"
        ) from e
    event(f"{action} {source.format} -> {tag}: exit {want.code} ({want.why.split(':')[0]})")
    ran = run(args, as_json)
    after = files_under(root)
    leftovers = [p for p in after if Path(p).name.startswith(".") and p.endswith(".tmp")]
    assert not leftovers, f"hidden temporaries left: {leftovers}"
    assert ran.code in DOCUMENTED, f"undocumented exit code {ran.code}: {ran.stderr.strip()[:300]}"
    if want.code != 0:
        assert ran.code == want.code, (
            f"expected exit {want.code} ({want.why}); got {ran.code}: {ran.stderr.strip()[:300]}"
        )
        lines = ran.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in ran.stderr, f"not a one-line error: {ran.stderr!r}"
        assert after == before, f"a refused command changed files: {sorted(set(after) ^ set(before))}"
        if as_json:
            assert parse_json(ran.stdout)["exit_code"] == ran.code
        return want
    assert ran.code == 0, f"expected success; got exit {ran.code}: {ran.stderr.strip()[:300]}"
    assert target is not None and target.exists(), f"exit 0 but {target} was not written"
    inside = str(target.relative_to(root))
    untouched = {p: b for p, b in after.items() if p != inside and not p.startswith(inside + "/")}
    assert untouched == before, f"files other than the output changed: {sorted(set(untouched) ^ set(before))}"
    if as_json:
        doc = parse_json(ran.stdout)
        assert doc["written"] is True, doc
        assert sorted(layer["key"] for layer in doc["layers"]) == sorted(want.keys), "--json lists other layers"
    actual, meta = read_output(want.format, target)
    expected = {"units": want.tree, "files": read_model_dir(source.path)[1]} if want.format == "modeldir" else want.tree
    try:  # the weights as expected (a model directory: every other file copied as it was)
        compare(actual, expected, want.transformed)
    except AssertionError as e:  # one kind of failure per input format: hypothesis reports each on its own
        raise WRONG_OUTPUT[source.format](f"{source.format} -> {want.format}: {e}") from None
    want.actual = actual["units"] if want.format == "modeldir" else actual
    if want.format in ("torch", "safetensors"):
        for loc in want.parts:
            got, wanted = records_of(want.format, get_at(meta, loc) if want.format == "torch" else meta,
                                     get_at(want.tree, loc))  # fmt: skip
            assert got == wanted, f"{loc}: records {got}, expected {wanted}"
    return want


def written_source(written: Written) -> Source:
    """The input as a :class:`Source`; torch files that torch's own loader cannot read are expected refused."""
    readable = True
    torch_files = [written.path] if written.format in TORCH_FORMATS else list(written.path.rglob("*.bin"))
    for path in torch_files:
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            readable = False
    return Source(written.format, written.path, written.tree, written.parts, written.tree, readable)


def output_source(want: Expected) -> Source:
    """The output of a convert, as the input of the next command (its tree: the pure function's)."""
    assert want.target is not None
    return Source(want.format, want.target, want.tree, want.parts, want.original)


def check_round_trip(baked: Expected) -> None:
    """The baked file against the input: same keys, every baked kernel within its dtype's bound, the rest bit for
    bit."""
    for loc in baked.parts:
        back, original = get_at(baked.actual, loc), get_at(baked.original, loc)
        assert sorted(back) == sorted(original), (
            f"{loc}: convert then bake changed the keys: {sorted(set(back) ^ set(original))}"
        )
        for key, value in original.items():
            if (*loc, key) in baked.transformed:
                assert back[key].dtype == value.dtype and back[key].shape == value.shape, f"{loc}/{key}: changed"
                if value.numel() and bool(value.isfinite().all()):  # NaN and inf spread over their kernels
                    error = rel_err(back[key], value)
                    tolerance = TOLERANCE[str(value.dtype).removeprefix("torch.")]
                    assert error <= tolerance, f"{loc}/{key}: round trip error {error:.3g} > {tolerance:.3g}"
            elif isinstance(value, torch.Tensor):
                assert same_bits(back[key], value), f"{loc}/{key}: changed by convert then bake"
            else:
                assert back[key] == value, f"{loc}/{key}: {back[key]!r} after convert then bake, was {value!r}"


# ---- the tests ------------------------------------------------------------------------------------------------


#: input format, output tag, basis, --max-shard-size, --json
Plan = tuple[str, str, str, str, bool]


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    fmt = draw(st.sampled_from(INPUT_FORMATS))
    return (
        fmt,
        draw(st.sampled_from(OUTPUTS[fmt])),
        draw(st.sampled_from(BASES)),
        draw(st.sampled_from(MAX_SHARD_SIZES)),
        draw(st.booleans()),
    )


def _examples(ci: int) -> Any:
    """``max_examples``: ``ci`` under the ``ci`` profile (an example takes about 0.1 s: more of them fit its
    budget), the profile's own under the others (``long``: 500)."""
    own = settings.default.max_examples
    phases = [p for p in settings.default.phases if p != Phase.explain]  # explaining costs a minute or more per bug
    return settings(max_examples=ci if settings.get_current_profile_name() == "ci" else own, phases=phases)


def _write(case: Case, fmt: str, root: Path, sd: Any = None) -> Source:
    return written_source(write_input(case, fmt, root, sd))


#: the axes each test instance varies (fuzz_inputs.AXES): all at once, and each alone, so that a frequent bug of
#: one axis cannot hide the others' (hypothesis stops looking soon after the first bug it finds)
AXIS_SETS = {"everything": AXES, "data": frozenset({"data"}), "shapes": frozenset({"shapes"}),
             "names": frozenset({"names"})}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("axes", list(AXIS_SETS))
@_examples(50)
@given(data=st.data(), plan=plans())
def test_convert_matches_the_pure_function(axes: str, data: st.DataObject, plan: Plan) -> None:
    """``spectral convert`` of every input format to every output it offers, against ``convert_state_dict``."""
    case = data.draw(cases(AXIS_SETS[axes]), label="case")
    fmt, tag, basis, shard_size, as_json = plan
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "öut").mkdir()
        check(_write(case, fmt, root), "convert", tag, basis, root, shard_size, as_json)


@pytest.mark.slow
@pytest.mark.parametrize("axes", list(AXIS_SETS))
@_examples(35)
@given(data=st.data(), plan=plans(), pick=st.integers(0, 99), again=st.booleans())
def test_convert_then_bake_round_trips(axes: str, data: st.DataObject, plan: Plan, pick: int, again: bool) -> None:
    """Convert, then bake the output to any output its format offers: equal to ``bake_state_dict`` of the pure
    conversion, and to the input within the round-trip bound; converting the output again writes nothing."""
    case = data.draw(cases(AXIS_SETS[axes]), label="case")
    fmt, tag, basis, shard_size, as_json = plan
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "öut").mkdir()
        converted = check(_write(case, fmt, root), "convert", tag, basis, root, shard_size, False)
        if converted.code != 0:
            return
        middle = output_source(converted)
        if again:  # already spectral: exit 0, nothing written
            before = files_under(root)
            args, _ = command(middle, "convert", "default", root / "öut", shard_size)
            ran = run(args, False)
            assert ran.code == 0 and "nothing to convert" in ran.stdout, (ran.code, ran.stdout, ran.stderr)
            assert files_under(root) == before, "converting a converted checkpoint wrote something"
        outputs = OUTPUTS["torch" if middle.format == "torch" else middle.format]
        baked = check(middle, "bake", outputs[pick % len(outputs)], basis, root, shard_size, as_json)
        if baked.code == 0:
            check_round_trip(baked)


@pytest.mark.slow
@pytest.mark.parametrize("axes", list(AXIS_SETS))
@_examples(30)
@given(data=st.data(), plan=plans())
def test_bake_matches_the_pure_function(axes: str, data: st.DataObject, plan: Plan) -> None:
    """``spectral bake`` of the pure conversion written by torch, safetensors or DCP themselves (the records where the
    README puts them; spectral tensors transposed, sliced, channels_last in torch files), against
    ``bake_state_dict``, and against the input within the round-trip bound."""
    case = data.draw(cases(AXIS_SETS[axes]), label="case")
    fmt, tag, basis, shard_size, as_json = plan
    original = build(case, torch_only=fmt in TORCH_FORMATS)
    try:
        converted = convert_state_dict(original, basis=basis)  # type: ignore[arg-type]
    except Exception:  # test_convert_matches_the_pure_function reports it
        converted = None
    assume(converted is not None and converted.changed)
    assert converted is not None
    spectral_sd = dict(converted.state_dict)
    if "data" in AXIS_SETS[axes]:
        for change in converted.changed:
            layout = data.draw(st.sampled_from(["contiguous", "transposed", "sliced", "channels_last"]), label="layout")
            spectral_sd[change.target_key] = relaid(spectral_sd[change.target_key], layout)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "öut").mkdir()
        source = _write(case, fmt, root, carrying(spectral_sd, converted.state_dict))
        source.original = arrange(case, fmt, original)[0]
        baked = check(source, "bake", tag, basis, root, shard_size, as_json)
        if baked.code == 0:
            check_round_trip(baked)


# ---- properties of the command line on model-like checkpoints -----------------------------------------------------


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Layer:
    """One module of the random model, as its state dict holds it."""

    kind: str  # "conv", "linear", "batchnorm"
    name: str
    shape: tuple[int, ...]
    dtype: str
    bias: bool

    @property
    def convertible(self) -> bool:
        return self.kind == "conv" and math.prod(self.shape[2:]) > 1


@st.composite
def conv_layers(draw: st.DrawFn, name: str) -> Layer:
    rank = draw(st.integers(1, 3))
    high = 6 if rank < 3 else 4  # keep 3-D kernels small
    kernel = tuple(draw(st.integers(1, high)) for _ in range(rank))
    groups = draw(st.sampled_from([1, 1, 2]))
    channels_in = groups * draw(st.integers(1, 3))
    channels_out = groups * draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    # Conv: (out, in / groups, *k); ConvTranspose: (in, out / groups, *k)
    lead = (channels_in, channels_out // groups) if transposed else (channels_out, channels_in // groups)
    return Layer("conv", name, (*lead, *kernel), draw(st.sampled_from(list(DTYPES))), draw(st.booleans()))


@st.composite
def other_layers(draw: st.DrawFn, name: str) -> Layer:
    kind = draw(st.sampled_from(["linear", "batchnorm"]))
    width = draw(st.integers(1, 6))
    shape = (draw(st.integers(1, 6)), width) if kind == "linear" else (width,)
    return Layer(kind, name, shape, draw(st.sampled_from(list(DTYPES))), True)


@dataclass(frozen=True)
class Checkpoint:
    layers: tuple[Layer, ...]
    prefix: str
    container: str  # "bare", "state_dict", "model_state_dict"
    fmt: str  # "torch", "safetensors"
    basis: str
    seed: int
    values: str  # "randn", "constant", "tiny", "large"


@st.composite
def checkpoints(draw: st.DrawFn) -> Checkpoint:
    n = draw(st.integers(1, 4))
    layers = []
    for i in range(n):
        name = draw(st.sampled_from([f"conv{i}", f"enc.{i}", f"blocks.{i}.conv"]))
        strategy = conv_layers(name) if draw(st.integers(0, 3)) else other_layers(name)
        layers.append(draw(strategy))
    if not any(layer.convertible for layer in layers):  # at least one kernel to convert
        layers.append(Layer("conv", "last", (2, 1, 3, 2), draw(st.sampled_from(list(DTYPES))), False))
    fmt = draw(st.sampled_from(["torch", "torch", "safetensors"]))
    container = "bare" if fmt == "safetensors" else draw(st.sampled_from(["bare", "state_dict", "model_state_dict"]))
    return Checkpoint(
        layers=tuple(layers),
        prefix=draw(st.sampled_from(["", "module.", "_orig_mod.", "module._orig_mod."])),
        container=container,
        fmt=fmt,
        basis=draw(st.sampled_from(["rfft", "rdft"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        values=draw(st.sampled_from(["randn", "randn", "constant", "tiny", "large"])),
    )


def _values(shape: tuple[int, ...], dtype: torch.dtype, how: str, g: torch.Generator) -> torch.Tensor:
    if how == "constant":
        return torch.full(shape, 0.375, dtype=torch.float64).to(dtype)
    scale = {"randn": 1.0, "tiny": 1e-3, "large": 100.0}[how]
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def build_state_dict(ck: Checkpoint) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(ck.seed)
    sd: dict[str, torch.Tensor] = {}
    for layer in ck.layers:
        dtype = DTYPES[layer.dtype]
        name = ck.prefix + layer.name
        sd[f"{name}.weight"] = _values(layer.shape, dtype, ck.values, g)
        if layer.bias:
            sd[f"{name}.bias"] = _values(layer.shape[:1], dtype, "randn", g)
        if layer.kind == "batchnorm":
            sd[f"{name}.running_mean"] = _values(layer.shape, dtype, "randn", g)
            sd[f"{name}.running_var"] = _values(layer.shape, dtype, "randn", g).abs()
            sd[f"{name}.num_batches_tracked"] = torch.tensor(ck.seed % 1000)
    return sd


def write(ck: Checkpoint, sd: dict[str, torch.Tensor], directory: Path) -> Path:
    if ck.fmt == "safetensors":
        from safetensors.torch import save_file

        path = directory / "model.safetensors"
        save_file(sd, str(path), metadata={"format": "pt"})
        return path
    path = directory / "model.pt"
    obj: Any = sd if ck.container == "bare" else {ck.container: sd, "epoch": 7, "hparams": {"lr": 1e-4}}
    torch.save(obj, path)
    return path


def state_of(ck: Checkpoint, path: Path) -> dict[str, torch.Tensor]:
    obj = read(path)
    return obj if ck.container == "bare" else obj[ck.container]


def expected_layers(ck: Checkpoint, names: list[str]) -> bool:
    """The convertible layers, in the input's order (a safetensors header orders its entries its own way)."""
    expected = [ck.prefix + layer.name for layer in ck.layers if layer.convertible]
    return names == expected if ck.fmt == "torch" else sorted(names) == sorted(expected)


@given(ck=checkpoints())
def test_convert_bake_convert_inspect(ck: Checkpoint) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sd = build_state_dict(ck)
        source = write(ck, sd, work)
        suffix = source.suffix
        converted, baked = work / f"c{suffix}", work / f"b{suffix}"

        # convert: every convertible kernel, nothing else
        result = spectral("convert", source, "-o", converted, "--basis", ck.basis, "--json")
        assert result.exit_code == 0, result.stderr
        report = parse_json(result.stdout)
        assert expected_layers(ck, [layer["name"] for layer in report["layers"]]), report["layers"]
        for layer in report["layers"]:
            assert layer["basis"] == ck.basis
            assert layer["max_error"] is not None and layer["max_error"] <= TOLERANCE[layer["dtype"]], layer
        on_disk = state_of(ck, converted)
        for layer in report["layers"]:
            stored = on_disk[layer["key"]]
            assert list(stored.shape) == layer["shape"] and str(stored.dtype) == f"torch.{layer['dtype']}"
        if ck.container != "bare":
            assert read(converted)["epoch"] == 7 and read(converted)["hparams"] == {"lr": 1e-4}

        # inspect agrees with what convert reported
        result = spectral("inspect", converted, "--json")
        assert result.exit_code == 0, result.stderr
        listed = parse_json(result.stdout)["layers"]
        fields = ("location", "name", "key", "basis", "kernel_size", "shape", "dtype")

        def facts(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # a torch file keeps the input's order; a safetensors file lists its tensors by name
            ordered = layers if ck.fmt == "torch" else sorted(layers, key=lambda layer: layer["key"])
            return [{f: layer[f] for f in fields} for layer in ordered]

        assert facts(listed) == facts(report["layers"])
        assert all(layer["domain"] == "spectral" and not layer["inferred"] for layer in listed)

        # converting again: everything already spectral, nothing written
        before = listing(work)
        for basis in ("rfft", "rdft"):
            result = spectral("convert", converted, "--basis", basis, "--json")
            assert result.exit_code == 0, result.stderr
            again = parse_json(result.stdout)
            assert again["layers"] == [] and not again["written"]
            assert sorted(s["key"] for s in again["skipped"] if s["reason"] == "already spectral") == sorted(
                layer["key"] for layer in report["layers"]
            )
        assert listing(work) == before

        # bake: the input back
        result = spectral("bake", converted, "-o", baked, "--json")
        assert result.exit_code == 0, result.stderr
        assert expected_layers(ck, [layer["name"] for layer in parse_json(result.stdout)["layers"]])
        back = state_of(ck, baked)
        if ck.fmt == "torch":
            assert list(back) == list(sd)
        else:
            assert sorted(back) == sorted(sd)
        changed = {layer["source_key"] for layer in report["layers"]}
        for key, value in sd.items():
            assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
            if key in changed:
                assert rel_err(back[key], value) <= TOLERANCE[str(value.dtype).removeprefix("torch.")], key
            else:
                assert torch.equal(back[key], value), key


# ---- a safetensors header whose length looks like a pickle's first bytes ------------------------------------------


@pytest.mark.parametrize("header_length", [0x280, 0x380, 0x480, 0x580, 0x10280])
def test_safetensors_header_length_that_starts_like_a_pickle(tmp_path: Path, header_length: int) -> None:
    """A header of 640 bytes starts the file with 0x80 0x02, the mark of a protocol-2 pickle.

    It is read as safetensors, not as a legacy torch file: its metadata (the records) comes with it, and an rdft
    checkpoint bakes.
    """
    from safetensors.torch import load_file

    weight = torch.randn(4, 3, 3, 5, generator=torch.Generator().manual_seed(0))
    doc = {
        "__metadata__": {"format": "pt"},
        "conv.weight": {"dtype": "F32", "shape": list(weight.shape), "data_offsets": [0, weight.numel() * 4]},
    }
    text = json.dumps(doc).encode()
    text += b" " * (header_length - len(text))
    source = tmp_path / "m.safetensors"
    source.write_bytes(struct.pack("<Q", len(text)) + text + weight.numpy().tobytes())
    assert source.read_bytes()[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    assert torch.equal(load_file(str(source))["conv.weight"], weight)  # a valid file

    result = spectral("inspect", source, "--all", "--json")
    assert result.exit_code == 0, result.stderr
    assert parse_json(result.stdout)["format"] == "safetensors"
    result = spectral("convert", source, "-o", tmp_path / "c.safetensors", "--basis", "rdft")
    assert result.exit_code == 0, result.stderr
    result = spectral("bake", tmp_path / "c.safetensors", "-o", tmp_path / "b.safetensors")
    assert result.exit_code == 0, result.stderr
    assert rel_err(load_file(str(tmp_path / "b.safetensors"))["conv.weight"], weight) <= 1e-6
