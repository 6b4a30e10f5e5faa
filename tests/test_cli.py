"""The ``spectral`` command line on real checkpoints: the samples and real architectures (other libraries' spectral
layouts are in ``tests/test_interop.py``).

Everything runs on copies in ``tmp_path`` (``sample_models/`` is guarded by conftest). The CLI runs in-process
through Typer's ``CliRunner`` with a pinned terminal width, except in the subprocess tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import (
    ALL_SAMPLES,
    SAMPLE_MODEL,
    SAMPLES_DIR,
    SPATIAL_SAMPLES,
    SUFFIX,
    assert_same_outputs,
    assert_same_tensors,
    build_registered,
    check_file_report_json,
    check_inspect_json,
    child_env,
    conv_names,
    copy_samples,
    listing,
    make_samples,
    model_state,
    names,
    parse_json,
    read,
    rel_err,
    safetensors_metadata,
    sha256,
    spectral,
)
from torch import nn

from spectral_cli import __version__, register_spectral_parametrization

# CompressAI scripts a function with torch.jit on import; torch 2.14 deprecates that
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")

SUMMARY = re.compile(
    r"^(converted|baked) ([\d,]+) layers, skipped ([\d,]+); max error (\S+); "
    r"(?:verified [\d,]+ tensors; )?(wrote|dry run, would write) (.+)$"
)
INSPECT_SUMMARY = re.compile(
    r"^([\d,]+) layers listed \(([\d,]+) spectral\); [\d,]+ parameters, [\d,]+ bytes of tensors(; pass --all .*)?$"
)


def summary(stdout: str) -> re.Match[str]:
    match = SUMMARY.match(stdout.strip().splitlines()[-1])
    assert match, stdout
    return match


def tagged(name: str, tag: str) -> str:
    """``balle.pt`` -> ``balle.<tag>.pt``: the default output name."""
    stem, suffix = name.split(".", 1)
    return f"{stem}.{tag}.{suffix.removeprefix('spectral.')}"


def model_of(sample: str) -> nn.Module:
    return make_samples.build(SAMPLE_MODEL[sample])


def expected_layers(sample: str) -> list[str]:
    return conv_names(model_of(sample), prefix="model." if sample == "lightning.ckpt" else "")


def converted_keys(plain: list[str], converted: set[str]) -> list[str]:
    """Plain state-dict keys with each converted ``<mod>.weight`` replaced in place by its spectral key."""
    return [f"{k.removesuffix('.weight')}.{SUFFIX}" if k.removesuffix(".weight") in converted else k for k in plain]


# ---- version, help, terminal width --------------------------------------------------------------------------


def test_version() -> None:
    result = spectral("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"spectral {__version__}"


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize(
    ("command", "options"),
    [
        ([], ["convert", "bake", "inspect", "--version"]),
        (["convert"], ["--output", "--basis", "--include", "--exclude", "--dry-run", "--force", "--json"]),
        (["bake"], ["--output", "--kernel-size", "--dry-run", "--force", "--json", "--trust-pickle"]),
        (["inspect"], ["--all", "--json", "--trust-pickle"]),
    ],
)
def test_help(command: list[str], options: list[str], flag: str) -> None:
    result = spectral(*command, flag)
    assert result.exit_code == 0
    assert "Usage" in result.stdout
    for option in options:
        assert option in result.stdout, option


def test_no_arguments_shows_the_commands() -> None:
    result = spectral()
    assert "Usage" in result.stdout + result.stderr
    assert "convert" in result.stdout + result.stderr


@pytest.mark.slow
def test_cli_module_imports_no_torch() -> None:
    """``spectral --help`` and ``--version`` start without importing torch."""
    code = "import sys, spectral_cli.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


@pytest.mark.parametrize("columns", [60, 120, 200])
def test_tables_honour_the_terminal_width(samples: Path, columns: int) -> None:
    result = spectral("convert", samples / "balle.pt", "-o", samples / "w.pt", env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.stderr
    table = result.stdout.strip().splitlines()[1:-1]  # the title (a path) and the summary line are never wrapped
    widest = max(len(line.rstrip()) for line in table)
    assert widest <= columns
    # COLUMNS was read: at 60 columns the params column is dropped (README), wider the whole table is shown
    assert ("params" in table[1]) == (columns >= 120), table
    assert any("16x16x5x5 → 2x16x16x5x3" in line for line in table)  # never split
    summary(result.stdout)


# ---- every command on every sample --------------------------------------------------------------------------


@pytest.mark.parametrize("basis", ["rfft", "rdft"])
@pytest.mark.parametrize("sample", SPATIAL_SAMPLES)
def test_convert_then_bake_gives_the_original_back(tmp_path: Path, sample: str, basis: str) -> None:
    work = copy_samples(tmp_path, [sample])
    source = work / sample
    digest = sha256(source)
    layers = expected_layers(sample)

    result = spectral("convert", source, "--basis", basis)
    assert result.exit_code == 0, result.stderr
    spectral_file = work / tagged(sample, "spectral")
    for layer in layers:
        assert layer in result.stdout
    match = summary(result.stdout)
    assert (match[1], int(match[2]), match[5], match[6]) == ("converted", len(layers), "wrote", str(spectral_file))
    assert listing(work) == sorted([sample, spectral_file.name])
    assert sha256(source) == digest

    original, converted = read(source), read(spectral_file)
    assert result.stderr == ""  # Lightning's optimizer state is converted, not dropped
    if sample == "lightning.ckpt":
        for key in ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", "lr_schedulers"):
            assert converted[key] == original[key]
        assert list(converted) == list(original)
        before, after = original["optimizer_states"][0], converted["optimizer_states"][0]
        assert after["param_groups"] == before["param_groups"] and len(after["state"]) == len(before["state"])
    plain_sd, spectral_sd = model_state(original), model_state(converted)
    model = make_samples.build(SAMPLE_MODEL[sample], seed=7)  # the weights of the file (Lightning's took a step)
    model.load_state_dict(plain_sd, strict=True)
    convs = {layer.removeprefix("model.") for layer in layers}
    assert list(spectral_sd) == converted_keys(list(plain_sd), convs)
    for name in convs:
        weight, stored = plain_sd[f"{name}.weight"], spectral_sd[f"{name}.{SUFFIX}"]
        assert stored.dtype == weight.dtype
        if basis == "rdft":
            assert stored.shape == weight.shape
        else:
            assert stored.shape == (2, *weight.shape[:-1], weight.shape[-1] // 2 + 1)

    registered = build_registered(SAMPLE_MODEL[sample], basis)
    registered.load_state_dict(spectral_sd, strict=True)
    assert_same_outputs(registered, model, make_samples.example_input(SAMPLE_MODEL[sample]))

    result = spectral("bake", spectral_file)
    assert result.exit_code == 0, result.stderr
    baked_file = work / tagged(sample, "baked")
    match = summary(result.stdout)
    assert (match[1], int(match[2]), match[6]) == ("baked", len(layers), str(baked_file))
    baked = read(baked_file)
    assert_same_tensors(model_state(baked), plain_sd)
    if sample == "lightning.ckpt":
        assert list(baked) == list(converted)
        assert baked["hyper_parameters"] == original["hyper_parameters"]
        before, back = original["optimizer_states"][0], baked["optimizer_states"][0]
        assert back["param_groups"] == before["param_groups"]  # positions in the plain order again
        for i, state in before["state"].items():
            assert rel_err(back["state"][i]["exp_avg"], state["exp_avg"]) <= 1e-6, i  # exact, up to rounding
    plain = make_samples.build(SAMPLE_MODEL[sample], seed=123)
    plain.load_state_dict(model_state(baked), strict=True)
    assert_same_outputs(plain, model, make_samples.example_input(SAMPLE_MODEL[sample]))


@pytest.mark.parametrize("sample", SPATIAL_SAMPLES)
def test_json_documents_follow_the_schema(tmp_path: Path, sample: str) -> None:
    work = copy_samples(tmp_path, [sample])
    layers = expected_layers(sample)
    out = work / tagged(sample, "x")

    result = spectral("convert", work / sample, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    check_file_report_json(doc, "convert")
    assert names(doc) == layers
    assert (doc["written"], doc["dry_run"], doc["output"], doc["file"]) == (True, False, str(out), str(work / sample))
    assert doc["dropped"] == []
    optimizers = doc["optimizer"]
    if sample == "lightning.ckpt":  # Adam: every kernel's state converted, the second moment approximated
        assert [(o["location"], o["optimizer"], o["parameters"], len(o["converted"])) for o in optimizers] == [
            ("optimizer_states/0", "Adam", 28, len(layers))
        ]
        assert optimizers[0]["approximated"] == optimizers[0]["converted"] and optimizers[0]["dropped"] == []
    else:
        assert optimizers == []
    if sample == "conv1d.pt":
        assert [(s["key"], s["reason"]) for s in doc["skipped"]] == [("proj.weight", "1x1 kernel")]

    result = spectral("inspect", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    check_inspect_json(doc)
    assert names(doc) == layers
    assert {layer["domain"] for layer in doc["layers"]} == {"spectral"}
    assert all(layer["basis"] == "rfft" and not layer["inferred"] for layer in doc["layers"])

    result = spectral("inspect", work / sample, "--json", "--all")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    check_inspect_json(doc)
    assert names(doc) == layers and {layer["domain"] for layer in doc["layers"]} == {"spatial"}
    assert doc["format"] == ("safetensors" if sample.endswith(".safetensors") else "torch")

    baked = work / tagged(sample, "y")
    result = spectral("bake", out, "-o", baked, "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    check_file_report_json(doc, "bake")
    assert names(doc) == layers and doc["written"] and doc["output"] == str(baked)


@pytest.mark.parametrize("sample", ALL_SAMPLES)
def test_inspect_lists_the_layers(samples: Path, sample: str) -> None:
    layers = expected_layers(sample.replace(".spectral", ""))
    spectral_sample = sample == "balle.spectral.pt"
    result = spectral("inspect", samples / sample)
    assert result.exit_code == 0, result.stderr
    match = INSPECT_SUMMARY.match(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout
    assert int(match[1]) == int(match[2]) == (len(layers) if spectral_sample else 0)
    assert (match[3] is None) == spectral_sample  # an empty listing points to --all
    result = spectral("inspect", samples / sample, "--all")
    assert result.exit_code == 0, result.stderr
    for layer in layers:
        assert layer in result.stdout
    assert ("spectral" if spectral_sample else "spatial") in result.stdout
    match = INSPECT_SUMMARY.match(result.stdout.strip().splitlines()[-1])
    assert match and int(match[1]) == len(layers)
    assert listing(samples) == sorted(ALL_SAMPLES)


@pytest.mark.parametrize(("command", "sample"), [("convert", "balle.pt"), ("bake", "balle.spectral.pt")])
def test_dry_run_writes_nothing(tmp_path: Path, command: str, sample: str) -> None:
    work = copy_samples(tmp_path, [sample])
    digest = sha256(work / sample)
    result = spectral(command, work / sample, "--dry-run")
    assert result.exit_code == 0, result.stderr
    match = summary(result.stdout)
    assert match[5] == "dry run, would write"
    assert match[6] == str(work / tagged(sample, "spectral" if command == "convert" else "baked"))
    result = spectral(command, work / sample, "--dry-run", "--json", "-o", work / "out.pt")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    check_file_report_json(doc, command)
    assert (doc["written"], doc["dry_run"], doc["output"]) == (False, True, str(work / "out.pt"))
    assert len(doc["layers"]) == 8
    assert listing(work) == [sample] and sha256(work / sample) == digest


def test_output_option_and_force(samples: Path) -> None:
    source = samples / "balle.pt"
    (samples / "sub").mkdir()
    out = samples / "sub" / "model.bin"
    assert spectral("convert", source, "-o", out).exit_code == 0
    first = sha256(out)
    result = spectral("convert", source, "--output", out, "--basis", "rdft")
    assert result.exit_code == 5
    assert "--force" in result.stderr and sha256(out) == first
    result = spectral("convert", source, "-o", out, "--basis", "rdft", "--force")
    assert result.exit_code == 0, result.stderr
    assert sha256(out) != first
    assert all(v.shape[0] != 2 for k, v in read(out).items() if k.endswith(SUFFIX))  # rdft: the weights' shapes
    # the default output (balle.spectral.pt, a sample) exists: refused without --force, replaced with it
    digest = sha256(samples / "balle.spectral.pt")
    assert spectral("convert", source, "--basis", "rdft").exit_code == 5
    assert sha256(samples / "balle.spectral.pt") == digest
    assert spectral("convert", source, "--basis", "rdft", "--force").exit_code == 0
    assert sha256(samples / "balle.spectral.pt") != digest
    assert not [n for n in listing(samples) + listing(samples / "sub") if n.endswith(".tmp")]


def test_written_files_have_ordinary_permissions(samples: Path) -> None:
    out = samples / "perm.pt"
    assert spectral("convert", samples / "balle.pt", "-o", out).exit_code == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    ("sample", "options", "chosen"),
    [
        ("balle.pt", ["--include", "g_a.*"], ["g_a.0", "g_a.2", "g_a.4", "g_a.6"]),
        ("balle.pt", ["--exclude", "g_a.*", "--exclude", "g_s.6"], ["g_s.0", "g_s.2", "g_s.4"]),
        ("balle.pt", ["--include", "g_?.0", "--include", "g_s.6"], ["g_a.0", "g_s.0", "g_s.6"]),
        ("lightning.ckpt", ["--include", "g_s.*", "--exclude", "*.4"], ["g_s.0", "g_s.2", "g_s.6"]),
        ("conv3d.pt", ["--exclude", "dec"], ["enc"]),
    ],
)
def test_include_and_exclude(tmp_path: Path, sample: str, options: list[str], chosen: list[str]) -> None:
    work = copy_samples(tmp_path, [sample])
    out = work / "out.pt"
    result = spectral("convert", work / sample, "-o", out, "--json", *options)
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    prefix = "model." if sample == "lightning.ckpt" else ""
    assert names(doc) == [prefix + c for c in chosen]
    others = sorted(set(expected_layers(sample)) - set(names(doc)))
    assert sorted(s["key"].removesuffix(".weight") for s in doc["skipped"]) == others
    assert {s["reason"] for s in doc["skipped"]} == {"excluded"}
    # the partly converted file loads into a model registered on the same layers
    name = SAMPLE_MODEL[sample]
    model = make_samples.build(name, seed=5)
    register_spectral_parametrization(model, include=chosen)
    model.load_state_dict(model_state(read(out)), strict=True)
    reference = make_samples.build(name, seed=5)
    reference.load_state_dict(model_state(read(work / sample)), strict=True)
    assert_same_outputs(model, reference, make_samples.example_input(name))


def test_include_matching_nothing_converts_nothing(samples: Path) -> None:
    result = spectral("convert", samples / "balle.pt", "-o", samples / "none.pt", "--include", "decoder.*")
    assert result.exit_code == 6
    assert not (samples / "none.pt").exists()


def test_safetensors_keeps_format_pt_and_records_the_conversion(samples: Path) -> None:
    result = spectral("convert", samples / "balle.safetensors", "--basis", "rdft")
    assert result.exit_code == 0, result.stderr
    out = samples / "balle.spectral.safetensors"
    meta = safetensors_metadata(out)
    assert meta["format"] == "pt"
    record = json.loads(meta["spectral_cli"])
    assert record["version"] == __version__
    layers = expected_layers("balle.safetensors")
    assert sorted(record["layers"]) == sorted(f"{n}.{SUFFIX}" for n in layers)
    assert {r["basis"] for r in record["layers"].values()} == {"rdft"}
    assert {tuple(r["kernel_size"]) for r in record["layers"].values()} == {(5, 5)}
    assert {r["dtype"] for r in record["layers"].values()} == {"float32"}
    # rdft tensors have the weights' shape: only the record tells bake what they are
    result = spectral("bake", out)
    assert result.exit_code == 0, result.stderr
    baked = samples / "balle.baked.safetensors"
    assert safetensors_metadata(baked)["format"] == "pt"
    assert_same_tensors(read(baked), read(samples / "balle.safetensors"))


@pytest.mark.parametrize(("source", "target"), [("balle.pt", "x.safetensors"), ("balle.safetensors", "x.pt")])
def test_convert_across_formats(samples: Path, source: str, target: str) -> None:
    result = spectral("convert", samples / source, "-o", samples / target, "--basis", "rdft")
    assert result.exit_code == 0, result.stderr
    if target.endswith(".safetensors"):
        assert safetensors_metadata(samples / target)["format"] == "pt"
    back = samples / f"back.{source.split('.', 1)[1]}"
    result = spectral("bake", samples / target, "-o", back)
    assert result.exit_code == 0, result.stderr
    # safetensors stores its keys sorted: the order of a torch file's keys does not survive it
    assert_same_tensors(read(back), read(samples / source), ordered=False)


def test_container_cannot_become_safetensors(samples: Path) -> None:
    result = spectral("convert", samples / "lightning.ckpt", "-o", samples / "l.safetensors")
    assert result.exit_code == 5
    assert ".pt" in result.stderr and not (samples / "l.safetensors").exists()


def test_converting_a_converted_file_writes_nothing(samples: Path) -> None:
    before = listing(samples)
    result = spectral("convert", samples / "balle.spectral.pt")
    assert result.exit_code == 0, result.stderr
    assert "already spectral" in result.stdout and "no file written" in result.stdout
    result = spectral("convert", samples / "balle.spectral.pt", "-o", samples / "again.pt", "--json")
    assert result.exit_code == 0
    doc = parse_json(result.stdout)
    check_file_report_json(doc, "convert")
    assert doc["layers"] == [] and not doc["written"] and "already spectral" in doc["message"]
    assert listing(samples) == before


def test_convert_in_steps_with_two_bases(samples: Path) -> None:
    """Convert the encoder (rfft), then the rest (rdft): each layer keeps its record; bake undoes both."""
    half, full, back = samples / "half.pt", samples / "full.pt", samples / "back.pt"
    assert spectral("convert", samples / "balle.pt", "--include", "g_a.*", "-o", half).exit_code == 0
    result = spectral("convert", half, "--basis", "rdft", "-o", full)
    assert result.exit_code == 0, result.stderr
    assert "parametrizations" not in result.stdout  # skipped rows name the layer, not its key
    assert summary(result.stdout).group(2, 3) == ("4", "4")
    doc = parse_json(spectral("inspect", full, "--json").stdout)
    assert {layer["name"]: layer["basis"] for layer in doc["layers"]} == {
        **{f"g_a.{i}": "rfft" for i in (0, 2, 4, 6)},
        **{f"g_s.{i}": "rdft" for i in (0, 2, 4, 6)},
    }
    model = make_samples.build("balle", seed=3)
    register_spectral_parametrization(model, include="g_a.*")
    register_spectral_parametrization(model, basis="rdft")
    model.load_state_dict(read(full), strict=True)
    assert_same_outputs(model, make_samples.build("balle"), make_samples.example_input("balle"))
    assert spectral("bake", full, "-o", back).exit_code == 0
    assert_same_tensors(read(back), read(samples / "balle.pt"))


def _same_object(a: Any, b: Any, rtol: float = 0.0) -> bool:
    """Deep equality of checkpoint objects: tensors equal in dtype, shape and value (to ``rtol`` of the largest
    magnitude in the tensor); containers in order."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if rtol == 0 or not a.is_floating_point() or a.numel() == 0:
            return bool(torch.equal(a, b))
        return bool((a.double() - b.double()).abs().max() <= rtol * b.double().abs().max())
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same_object(a[k], b[k], rtol) for k in a)
    if isinstance(a, list | tuple):
        return (
            type(a) is type(b) and len(a) == len(b) and all(_same_object(x, y, rtol) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


#: samples whose numbers come out of a training step: a conv backward's last bits depend on the CPU and the conv
#: algorithm (Adam's moments differed by up to 2.8e-6 of each tensor's largest value with oneDNN off)
TRAINED = {"lightning.ckpt": 1e-4}


def test_make_samples_regenerates_the_samples(tmp_path: Path) -> None:
    """make_samples.py writes what sample_models/ holds (values exactly; safetensors byte for byte)."""
    paths = make_samples.make_samples(tmp_path)
    assert sorted(p.name for p in paths) == sorted(ALL_SAMPLES) == sorted(listing(tmp_path))
    assert sum(p.stat().st_size for p in paths) < 1_000_000
    for path in paths:
        kept = SAMPLES_DIR / path.name
        if path.suffix == ".safetensors":
            assert path.read_bytes() == kept.read_bytes(), path.name
        assert _same_object(read(path), read(kept), TRAINED.get(path.name, 0.0)), path.name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_kept(tmp_path: Path, dtype: torch.dtype) -> None:
    model = make_samples.build("balle").to(dtype)
    source = tmp_path / "m.pt"
    torch.save(model.state_dict(), source)
    assert spectral("convert", source).exit_code == 0
    converted = read(tmp_path / "m.spectral.pt")
    assert {v.dtype for v in converted.values()} == {dtype}
    assert spectral("bake", tmp_path / "m.spectral.pt").exit_code == 0
    tol = 1e-12 if dtype == torch.float64 else 8 * torch.finfo(dtype).eps
    assert_same_tensors(read(tmp_path / "m.baked.pt"), model.state_dict(), tol=tol)


def test_wrapper_prefix_module(tmp_path: Path) -> None:
    """A DataParallel / DDP state dict (every key under ``module.``): globs name the layers without it."""
    model = make_samples.build("conv1d")
    source = tmp_path / "ddp.pt"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": 3}, source)
    result = spectral("convert", source, "--json", "--include", "conv2")
    assert result.exit_code == 0, result.stderr
    assert names(parse_json(result.stdout)) == ["module.conv2"]
    assert spectral("bake", tmp_path / "ddp.spectral.pt").exit_code == 0
    baked = read(tmp_path / "ddp.baked.pt")
    assert baked["step"] == 3
    unwrapped = {k.removeprefix("module."): v for k, v in baked["model_state_dict"].items()}
    assert_same_tensors(unwrapped, model.state_dict())


def test_several_state_dicts_in_one_container(tmp_path: Path) -> None:
    """A trainer's checkpoint with the weights and their EMA: both converted, both baked, each in its place."""
    weights, ema = make_samples.build("conv3d", seed=0).state_dict(), make_samples.build("conv3d", seed=1).state_dict()
    source = tmp_path / "ema.pt"
    torch.save({"state_dict": weights, "model_ema": ema, "epoch": 4}, source)
    result = spectral("convert", source, "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    assert [(layer["location"], layer["name"]) for layer in doc["layers"]] == [
        ("state_dict", "enc"),
        ("state_dict", "dec"),
        ("model_ema", "enc"),
        ("model_ema", "dec"),
    ]
    result = spectral("inspect", tmp_path / "ema.spectral.pt", "--json")
    doc = parse_json(result.stdout)
    check_inspect_json(doc)
    energy = {(layer["location"], layer["name"]): layer["energy"] for layer in doc["layers"]}
    assert energy["state_dict", "enc"] != energy["model_ema", "enc"]  # each state dict its own profile
    result = spectral("inspect", tmp_path / "ema.spectral.pt")
    assert "state_dict/enc" in result.stdout and "model_ema/dec" in result.stdout
    assert spectral("bake", tmp_path / "ema.spectral.pt").exit_code == 0
    baked = read(tmp_path / "ema.baked.pt")
    assert baked["epoch"] == 4
    assert_same_tensors(baked["state_dict"], weights)
    assert_same_tensors(baked["model_ema"], ema)


def test_legacy_torch_file_is_written_back_as_a_zip(tmp_path: Path) -> None:
    state = make_samples.build("conv1d").state_dict()
    source = tmp_path / "old.pth"
    torch.save(state, source, _use_new_zipfile_serialization=False)
    assert source.read_bytes()[:2] != b"PK"
    result = spectral("inspect", source, "--all", "--json")
    assert parse_json(result.stdout)["format"] == "torch-legacy"
    assert spectral("convert", source).exit_code == 0
    assert (tmp_path / "old.spectral.pth").read_bytes()[:2] == b"PK"
    assert spectral("bake", tmp_path / "old.spectral.pth").exit_code == 0
    assert_same_tensors(read(tmp_path / "old.baked.pth"), state)


def test_safetensors_metadata_of_the_input_is_kept(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = make_samples.build("conv1d").state_dict()
    source = tmp_path / "m.safetensors"
    save_file(dict(state), str(source), metadata={"format": "pt", "author": "someone", "step": "12"})
    assert spectral("convert", source).exit_code == 0
    meta = safetensors_metadata(tmp_path / "m.spectral.safetensors")
    assert (meta["author"], meta["step"], meta["format"]) == ("someone", "12", "pt") and "spectral_cli" in meta
    assert spectral("bake", tmp_path / "m.spectral.safetensors").exit_code == 0
    assert safetensors_metadata(tmp_path / "m.baked.safetensors") == {"format": "pt", "author": "someone", "step": "12"}
    bare = tmp_path / "bare.safetensors"
    save_file(dict(state), str(bare))  # no metadata at all: the output still says format pt
    assert spectral("convert", bare).exit_code == 0
    assert safetensors_metadata(tmp_path / "bare.spectral.safetensors")["format"] == "pt"


def test_nan_and_inf_weights_are_carried_with_a_warning(tmp_path: Path) -> None:
    state = make_samples.build("conv1d").state_dict()
    state["conv1.weight"][1, 0, 2] = float("nan")
    state["conv2.weight"][0, 3, 1] = float("inf")
    source = tmp_path / "bad.pt"
    torch.save(state, source)
    result = spectral("convert", source, "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)  # strict: no NaN in the document
    check_file_report_json(doc, "convert")
    assert doc["max_error"] is None and len(doc["warnings"]) == 2
    assert "conv1.weight" in result.stderr and "conv2.weight" in result.stderr
    for path in (source, tmp_path / "bad.spectral.pt"):
        result = spectral("inspect", path, "--all", "--json")
        assert result.exit_code == 0, result.stderr
        doc = parse_json(result.stdout)
        check_inspect_json(doc)
        assert {layer["name"]: layer["energy"] for layer in doc["layers"]} == {"conv1": None, "conv2": None}
    result = spectral("bake", tmp_path / "bad.spectral.pt")
    assert result.exit_code == 0, result.stderr
    baked = read(tmp_path / "bad.baked.pt")
    for key, kernel in (("conv1.weight", (1, 0)), ("conv2.weight", (0, 3))):
        original, back = state[key], baked[key]
        assert not torch.isfinite(back[kernel]).any()  # the transform mixes every tap of that kernel
        finite = torch.ones(original.shape[:2], dtype=torch.bool)
        finite[kernel] = False
        assert rel_err(back[finite], original[finite]) <= 1e-6  # every other kernel comes back
    assert torch.equal(baked["proj.weight"], state["proj.weight"])


# ---- real processes -----------------------------------------------------------------------------------------


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=child_env(), capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.slow
def test_python_m_and_console_script(tmp_path: Path) -> None:
    work = copy_samples(tmp_path, ["balle.pt"])
    done = _run([sys.executable, "-m", "spectral_cli", "convert", "balle.pt", "--json"], work)
    assert done.returncode == 0, done.stderr
    doc = parse_json(done.stdout)
    check_file_report_json(doc, "convert")
    assert doc["written"] and doc["output"] == "balle.spectral.pt"
    script = shutil.which("spectral", path=str(Path(sys.executable).parent)) or shutil.which("spectral")
    assert script is not None, "the spectral console script is not installed"
    done = _run([script, "bake", "balle.spectral.pt", "-o", "baked.pt"], work)
    assert done.returncode == 0, done.stderr
    assert summary(done.stdout)[6] == "baked.pt"
    assert_same_tensors(read(work / "baked.pt"), read(work / "balle.pt"))


# ---- real architectures, random weights (nothing is downloaded) ---------------------------------------------


def _factorized_prior() -> nn.Module:
    from compressai.models import FactorizedPrior

    return FactorizedPrior(N=16, M=24)


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None)


def _convnext_atto() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", pretrained=False)


ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "compressai-factorized-prior": (_factorized_prior, (1, 3, 64, 64)),
    "torchvision-resnet18": (_resnet18, (1, 3, 32, 32)),
    "timm-convnext_atto": (_convnext_atto, (1, 3, 32, 32)),
}


def _build(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch][0]().eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_real_architecture_round_trip(tmp_path: Path, arch: str) -> None:
    model = _build(arch, seed=0)
    source = tmp_path / "model.pt"
    torch.save(model.state_dict(), source)
    digest = sha256(source)

    result = spectral("convert", source, "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    check_file_report_json(doc, "convert")
    assert names(doc) == conv_names(model)
    converted = read(tmp_path / "model.spectral.pt")

    registered = _build(arch, seed=1)
    register_spectral_parametrization(registered)
    registered.load_state_dict(converted, strict=True)
    x = torch.randn(ARCHITECTURES[arch][1], generator=torch.Generator().manual_seed(2))
    assert_same_outputs(registered, model, x)

    result = spectral("bake", tmp_path / "model.spectral.pt")
    assert result.exit_code == 0, result.stderr
    assert summary(result.stdout)[2] == str(len(conv_names(model)))
    assert_same_tensors(read(tmp_path / "model.baked.pt"), model.state_dict())
    assert sha256(source) == digest
