"""Files of many small tensors: convert and bake run small tensors in batches (one product for many), and every
promise of the one-tensor-at-a-time path still holds, checked through the real command line.

* every value written is the one ``convert_state_dict`` / ``bake_state_dict`` give the same tensors (bit for
  bit), whatever mix of tiny, medium and large tensors, dtypes and bases the file holds, and each tensor's error
  in the report is the library's;
* the batched transforms give each tensor the bits of its own slab-by-slab transform, and the verification's
  batched figures are those the transform measured;
* verification stays complete: one wrong value among thousands of small tensors (converted or carried over) is
  found, named, and nothing is written.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from models import one_line, parse_json, spectral
from safetensors.torch import load_file, save_file

import spectral_cli.files.convert as convert_module
from spectral_cli import bake_state_dict, convert_state_dict
from spectral_cli.files import safetensors_io
from spectral_cli.statedict.surgery import MemoryTensor
from spectral_cli.transform.slabs import (
    Layout,
    Scratch,
    batch_rows,
    spatial_batch,
    spatial_pieces,
    spectral_batch,
    spectral_pieces,
    synthesis_errors,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _bits(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    return str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _many(n: int = 3000) -> dict[str, torch.Tensor]:
    """``n`` tiny kernels of four dtypes and several kernel sizes (some with NaN), biases between them, and a few
    tensors too large for a batch (more than one run of kernels) or transformed axis by axis."""
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    sizes = ((1, 1, 3, 3), (2, 3, 3, 3), (1, 2, 5, 5), (3, 1, 3), (1, 1, 3, 3, 3), (4, 4, 2, 4), (5, 7, 3, 3))
    for i in range(n):
        shape, dtype = sizes[i % len(sizes)], DTYPES[(i // 3) % len(DTYPES)]
        weight = torch.randn(*shape, generator=g)
        if i % 997 == 5:
            weight.view(-1)[0] = float("nan")
        sd[f"blocks.{i}.conv.weight"] = weight.to(dtype)
        if i % 4 == 0:
            sd[f"blocks.{i}.conv.bias"] = torch.randn(shape[0], generator=g).to(dtype)
    sd["large.weight"] = torch.randn(256, 160, 3, 3, generator=g)  # 40,960 kernels: more than a run of 3x3
    sd["wide.weight"] = torch.randn(2, 2, 23, 24, generator=g)  # the separable method
    sd["head.weight"] = torch.randn(10, 64, generator=g)
    return sd


@pytest.mark.slow
@pytest.mark.parametrize("basis", ["rfft", "rdft"])
def test_a_file_of_thousands_of_small_tensors_holds_the_library_values(tmp_path: Path, basis: str) -> None:
    sd = _many()
    source = tmp_path / "many.safetensors"
    save_file(sd, str(source))
    converted, baked = tmp_path / "many.spectral.safetensors", tmp_path / "many.baked.safetensors"

    result = spectral("convert", source, "-o", converted, "--basis", basis, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    expected = convert_state_dict(sd, basis=basis)  # type: ignore[arg-type]
    written = load_file(str(converted))
    assert sorted(written) == sorted(expected.state_dict)
    for key, value in expected.state_dict.items():
        assert _bits(written[key]) == _bits(value), key
    errors = {layer["source_key"]: layer["max_error"] for layer in parse_json(result.stdout)["layers"]}
    assert len(errors) == len(expected.changed) == sum(k.endswith("conv.weight") for k in sd) + 2
    for change in expected.changed:
        want = change.max_error if math.isfinite(change.max_error) else None
        assert errors[change.source_key] == want, change.source_key

    result = spectral("bake", converted, "-o", baked, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    expected_bake = bake_state_dict(expected.state_dict)
    written = load_file(str(baked))
    assert sorted(written) == sorted(sd)
    for key, value in expected_bake.state_dict.items():
        assert _bits(written[key]) == _bits(value), key
    errors = {layer["source_key"]: layer["max_error"] for layer in parse_json(result.stdout)["layers"]}
    for change in expected_bake.changed:
        want = change.max_error if math.isfinite(change.max_error) else None
        assert errors[change.source_key] == want, change.source_key


def _tensors(rows: list[int], ks: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, *ks, generator=g) * 10 ** (i % 5 - 2)).to(dtype) for i, m in enumerate(rows)]


def _alone(pieces: Any, nbytes: int) -> tuple[bytes, float]:
    """The bytes of a generator of pieces (offset, tensor), and its return value."""
    out = bytearray(nbytes)
    while True:
        try:
            offset, piece = next(pieces)
        except StopIteration as done:
            return bytes(out), done.value
        data = piece.contiguous().view(torch.uint8).numpy().tobytes()
        out[offset : offset + len(data)] = data


@pytest.mark.parametrize("basis", ["rfft", "rdft"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ks", [(3, 3), (5, 5), (3,), (2, 4), (3, 3, 3)])
def test_a_batch_gives_each_tensor_the_bits_and_error_of_its_own_transform(
    ks: tuple[int, ...], dtype: torch.dtype, basis: Any
) -> None:
    rows = [1, 3, 16, 17, 1, 40, 2, 100, 1]
    assert all(batch_rows(m, ks, dtype) for m in rows)
    kernels = _tensors(rows, ks, dtype, seed=len(ks) * 7 + len(str(dtype)))
    kernels[3].view(-1)[5] = float("nan")
    with Scratch() as scratch:
        stored, errors = spectral_batch([MemoryTensor(k).read for k in kernels], rows, dtype, ks, basis, scratch)
        flat = stored.view(torch.uint8).numpy().tobytes()
        offset = 0
        for k, m in zip(kernels, rows, strict=True):
            nbytes = m * (stored.numel() // sum(rows)) * dtype.itemsize
            alone, _ = _alone(spectral_pieces(MemoryTensor(k).read, tuple(k.shape), dtype, ks, basis, scratch), nbytes)
            assert flat[offset : offset + nbytes] == alone
            offset += nbytes
        # the verification's batched figures are the transform's, whatever the tensors batched with them
        layout = Layout(rows)
        width = stored.numel() // sum(rows)
        coefficient = [stored[o * width : (o + m) * width] for o, m in zip(layout.offsets, rows, strict=True)]
        reads = [MemoryTensor(c).read for c in coefficient]
        order = list(reversed(range(len(rows))))  # other neighbours, other places in the product
        again = synthesis_errors([reads[i] for i in order], [rows[i] for i in order], dtype, ks, basis,
                                 [MemoryTensor(kernels[i]).read for i in order], dtype, exact=False)  # fmt: skip
        assert [again[order.index(i)] for i in range(len(rows))] == pytest.approx(errors, nan_ok=True, abs=0, rel=0)
        assert math.isnan(errors[3]) and all(math.isfinite(e) for i, e in enumerate(errors) if i != 3)

        out_dtype = dtype  # what convert recorded
        kernels_back, bake_errors = spatial_batch(reads, rows, dtype, ks, basis, out_dtype, scratch)
        flat = kernels_back.view(torch.uint8).numpy().tobytes()
        offset = 0
        for c, m, error in zip(coefficient, rows, bake_errors, strict=True):
            nbytes = m * math.prod(ks) * out_dtype.itemsize
            shape = _coefficient_shape(m, ks, basis)
            pieces = spatial_pieces(MemoryTensor(c.view(shape)).read, shape, dtype, ks, basis, out_dtype, scratch)
            alone, alone_error = _alone(pieces, nbytes)
            assert flat[offset : offset + nbytes] == alone
            assert error == alone_error or (math.isnan(error) and math.isnan(alone_error))
            offset += nbytes
        written = [MemoryTensor(kernels_back[o * math.prod(ks) : (o + m) * math.prod(ks)]).read
                   for o, m in zip(layout.offsets, rows, strict=True)]  # fmt: skip
        checked = synthesis_errors(reads, rows, dtype, ks, basis, written, out_dtype, exact=True)
        assert checked == pytest.approx(bake_errors, nan_ok=True, abs=0, rel=0)


def _coefficient_shape(rows: int, ks: tuple[int, ...], basis: str) -> tuple[int, ...]:
    if basis == "rdft":
        return (rows, *ks)
    return (2, rows, *ks[:-1], ks[-1] // 2 + 1)


def _corrupt_then_verify(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flip a byte of ``key`` in the written output just before it is read back."""
    verify = convert_module.verify_output

    def corrupted(src: Any, written: Path, *args: Any, **kwargs: Any) -> Any:
        entry = safetensors_io.read_header(written).entries[key]
        fd = os.open(written, os.O_RDWR)
        try:  # the exponent byte of the first float32 number
            byte = os.pread(fd, 1, entry.start + 3)
            os.pwrite(fd, bytes([byte[0] ^ 0x40]), entry.start + 3)
        finally:
            os.close(fd)
        return verify(src, written, *args, **kwargs)

    monkeypatch.setattr(convert_module, "verify_output", corrupted)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["blocks.1234.conv.parametrizations.weight.original", "blocks.1236.conv.bias"])
def test_one_wrong_value_among_thousands_of_small_tensors_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(2000):
        sd[f"blocks.{i}.conv.weight"] = torch.randn(1, 1, 3, 3, generator=g)
        sd[f"blocks.{i}.conv.bias"] = torch.randn(1, generator=g)
    source = tmp_path / "many.safetensors"
    save_file(sd, str(source))
    target = tmp_path / "out.safetensors"
    _corrupt_then_verify(key, monkeypatch)
    result = spectral("convert", source, "-o", target, "-q")
    assert result.exit_code == 3, result.stderr
    line = one_line(result.stderr)
    assert "read back differently" in line and f"({key}" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.safetensors"]
