"""Property tests (hypothesis) of the command line on random checkpoints.

Random state dicts: conv kernels of rank 1 to 3 with kernel sizes 1 to 6 (rectangular too), float16 / bfloat16 /
float32 / float64, grouped and transposed layouts, Linear and BatchNorm entries beside them, wrapper prefixes
(``module.``, ``_orig_mod.``) and trainer containers (``{"state_dict": ...}``), written as torch files or
safetensors. Properties, through ``spectral`` itself:

* convert then bake gives the input back: same keys (in the same order for torch files), same dtypes, every
  converted kernel within a few units of its dtype's rounding, everything else bit for bit;
* converting a converted file reports every layer as already spectral and writes nothing;
* ``spectral inspect --json`` on the output lists exactly what ``convert --json`` reported.

The budget and the seed come from ``tests/conftest.py`` (profile ``ci``; the seed is printed in the report
header and summary, and ``HYPOTHESIS_SEED=<n>`` replays a run).
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import listing, parse_json, read, rel_err, spectral

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
#: convert then bake of one kernel, relative to its largest tap: two roundings to the stored dtype for the half
#: precisions, a few float32/float64 operations for the others
TOLERANCE = {"float16": 4 * 2**-10, "bfloat16": 4 * 2**-7, "float32": 2e-6, "float64": 1e-13}


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
