"""Checkpoints of real ecosystems that convert cannot take as they are: each is converted or skipped with its reason
and the fix, or refused with the fix, through the real CLI; and following the fix then converts.

Built with the packages themselves (random weights, nothing downloaded): transformers' Encodec (weight_norm
parametrizations), torch.nn.utils.prune, float8 weights, peft LoRA adapters, a Hugging Face hub cache laid out as
huggingface_hub lays it out, and a container of pickled modules as ultralytics writes one
(``{"model": DetectionModel, "ema": ..., "train_args": ...}``; ultralytics itself is not a test dependency: its
container is rebuilt here with a module class of this file, which is what its pickle looks like); torchvision's
quantized models, the old-style ``weight_norm``/``spectral_norm`` hooks, and tensors no transform takes (quantized,
integer, complex, float8, sparse, nested, meta, empty), which are carried over untouched.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile_inputs import conv_state, quantize
from models import assert_same_outputs, listing, one_line, parse_json, read, rel_err, spectral
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import prune

from spectral_cli import load_spectral, register_spectral_parametrization

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

WEIGHT_NORM_FIX = 'torch.nn.utils.parametrize.remove_parametrizations(module, "weight")'


def _encodec() -> nn.Module:
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    config = EncodecConfig(num_filters=4, hidden_size=8, upsampling_ratios=[2, 2], num_lstm_layers=1,
                           codebook_size=16, target_bandwidths=[1.5], kernel_size=3, last_kernel_size=3)  # fmt: skip
    return EncodecModel(config).eval()


def _weight_normed(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.ConvTranspose1d)
            and torch.nn.utils.parametrize.is_parametrized(m, "weight")]  # fmt: skip


def _skipped(doc: dict[str, Any]) -> dict[str, str]:
    return {s["key"]: s["reason"] for s in doc["skipped"]}


# ---- weight_norm (transformers' Encodec) -----------------------------------------------------------------------


@pytest.mark.slow
def test_encodec_weight_norm_layers_are_named_with_the_fix_and_the_fix_converts_them(tmp_path: Path) -> None:
    model = _encodec()
    normed = _weight_normed(model)
    assert len(normed) >= 10
    model.save_pretrained(tmp_path / "encodec")
    source = tmp_path / "encodec" / "model.safetensors"
    before = listing(tmp_path / "encodec")

    modules = dict(model.named_modules())
    one_tap = {n for n in normed if modules[n].weight.shape[-1] == 1}
    assert 0 < len(one_tap) < len(normed)

    result = spectral("convert", source)
    assert result.exit_code == 6, result.output
    line = one_line(result.stderr)
    # every conv of the model is under weight_norm: the message says so, how many, and the fix (1-tap ones are
    # named as such: removing weight_norm would not make them convertible)
    assert f"weight_norm parametrization ({len(normed) - len(one_tap)})" in line, line
    assert f"1x1 kernel ({len(one_tap)})" in line, line
    assert f"to convert the weight_norm parametrization ones, remove it ({WEIGHT_NORM_FIX})" in line, line
    assert "register_spectral_parametrization" in line, line
    assert listing(tmp_path / "encodec") == before

    # inspect --all: each layer once, by its direction (original1), whose shape is the kernel's
    result = spectral("inspect", source, "--all", "--json")
    assert result.exit_code == 0, result.stderr
    layers = {layer["name"]: layer for layer in parse_json(result.stdout)["layers"]}
    assert set(layers) == set(normed)
    for name, layer in layers.items():
        assert layer["domain"] == "weight_norm"
        assert layer["key"] == f"{name}.parametrizations.weight.original1"
        assert layer["shape"] == list(modules[name].parametrizations.weight.original1.shape)
        assert layer["shape"] == list(modules[name].weight.shape)

    # the fix: remove the parametrization on the model, save its state dict, convert it; it loads and runs equal
    for name in normed:
        torch.nn.utils.parametrize.remove_parametrizations(modules[name], "weight")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    result = spectral("convert", tmp_path / "plain.pt", "--json")
    assert result.exit_code == 0, result.stderr
    converted = {layer["name"] for layer in parse_json(result.stdout)["layers"]}
    assert converted == set(normed) - one_tap
    fresh = _encodec()
    for name in _weight_normed(fresh):
        torch.nn.utils.parametrize.remove_parametrizations(dict(fresh.named_modules())[name], "weight")
    load_spectral(fresh, tmp_path / "plain.spectral.pt")
    audio = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, reference = fresh.encoder(audio), model.encoder(audio)
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4)


def test_a_mixed_checkpoint_lists_every_kernel_it_does_not_convert(tmp_path: Path) -> None:
    """weight_norm (new and old style), spectral_norm, pruned, float8 and a plain conv in one state dict: the plain
    conv is converted, every other kernel is listed with its reason, and each kind's fix is said once."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = nn.ModuleDict({
            "plain": nn.Conv2d(3, 4, 3),
            "wn": nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3)),
            "sn": nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 4, 3)),
            "old_wn": nn.utils.weight_norm(nn.Conv1d(4, 4, 5)),
            "old_sn": nn.utils.spectral_norm(nn.Conv2d(4, 4, 3)),
            "pruned": nn.Conv2d(4, 4, 3),
            "lin": nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)),
        })  # fmt: skip
    prune.l1_unstructured(net["pruned"], "weight", amount=0.5)
    state = dict(net.state_dict())
    state["f8.weight"] = torch.randn(4, 4, 3, 3).to(torch.float8_e4m3fn)
    torch.save(state, tmp_path / "mixed.pt")

    result = spectral("convert", tmp_path / "mixed.pt", "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    assert [layer["name"] for layer in doc["layers"]] == ["plain"]
    assert _skipped(doc) == {
        "wn.parametrizations.weight.original1": "weight_norm parametrization",
        "sn.parametrizations.weight.original": "spectral_norm parametrization",
        "old_wn.weight_v": "old-style weight_norm hook (weight_g, weight_v)",
        "old_sn.weight_orig": "old-style spectral_norm hook (weight_orig)",
        "pruned.weight_orig": "pruned (weight_orig, weight_mask)",
        "f8.weight": "float8 (float8_e4m3fn)",
    }
    fixes = "\n".join(doc["warnings"])
    for fix in (
        WEIGHT_NORM_FIX,
        "torch.nn.utils.remove_weight_norm(module)",
        "torch.nn.utils.remove_spectral_norm",
        'torch.nn.utils.prune.remove(module, "weight")',
        "to bfloat16",
    ):
        assert fix in fixes, fixes
    # each skipped entry carries its own fix (the one its kind's warning says)
    per_key = {s["key"]: s["fix"] for s in doc["skipped"]}
    assert 'torch.nn.utils.prune.remove(module, "weight")' in per_key["pruned.weight_orig"]
    assert "to bfloat16" in per_key["f8.weight"] and WEIGHT_NORM_FIX in per_key["wn.parametrizations.weight.original1"]
    assert all(fix and fix in fixes for fix in per_key.values()), per_key
    assert len(doc["warnings"]) == 5  # one per fix: parametrizations, two old hooks, pruned, float8
    assert doc["warnings"][0].startswith("2 layers skipped (weight_norm parametrization, spectral_norm "
                                         "parametrization): to convert them, remove it")  # fmt: skip
    written = read(tmp_path / "mixed.spectral.pt")
    for key in _skipped(doc):
        assert torch.equal(written[key].view(torch.uint8), state[key].view(torch.uint8)), key  # carried over

    result = spectral("convert", tmp_path / "mixed.pt", "-o", tmp_path / "table.pt")
    assert result.exit_code == 0, result.stderr
    assert "converted 1 layers, skipped 6" in result.stdout
    assert result.stderr.count("warning: ") == 5 and "prune.remove" in result.stderr


def test_the_prune_fix_converts_the_pruned_layer_and_it_runs_equal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    prune.l1_unstructured(net[2], "weight", amount=0.5)
    torch.save(net.state_dict(), tmp_path / "pruned.pt")
    result = spectral("convert", tmp_path / "pruned.pt", "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    assert [layer["name"] for layer in doc["layers"]] == ["0"]
    assert _skipped(doc) == {"2.weight_orig": "pruned (weight_orig, weight_mask)"}
    assert any('torch.nn.utils.prune.remove(module, "weight")' in w for w in doc["warnings"])

    prune.remove(net[2], "weight")
    torch.save(net.state_dict(), tmp_path / "permanent.pt")
    result = spectral("convert", tmp_path / "permanent.pt", "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    assert [layer["name"] for layer in doc["layers"]] == ["0", "2"] and doc["skipped"] == doc["warnings"] == []
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    load_spectral(fresh, tmp_path / "permanent.spectral.pt")
    assert_same_outputs(fresh, net, torch.randn(2, 3, 8, 8))


def test_float8_kernels_are_named_with_the_cast_that_converts_them(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {f"conv{i}.weight": torch.randn(8, 4, 3, 3).to(dtype) for i, dtype in
             enumerate((torch.float8_e4m3fn, torch.float8_e5m2))}  # fmt: skip
    save_file(state, str(tmp_path / "fp8.safetensors"))
    result = spectral("convert", tmp_path / "fp8.safetensors")
    assert result.exit_code == 6, result.output
    line = one_line(result.stderr)
    assert "float8 (float8_e4m3fn) (1)" in line and "float8 (float8_e5m2) (1)" in line, line
    assert line.count("cast the checkpoint's float8 tensors to bfloat16") == 1 and "not float" not in line, line
    assert listing(tmp_path) == ["fp8.safetensors"]

    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp_path / "bf16.safetensors"))
    result = spectral("convert", tmp_path / "bf16.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    assert [layer["name"] for layer in parse_json(result.stdout)["layers"]] == ["conv0", "conv1"]


# ---- a container of pickled modules (ultralytics' layout) --------------------------------------------------------


class Detector(nn.Module):
    """Stands for ultralytics' DetectionModel: unpickling it leaves a mark (the proof that the pickle ran)."""

    def __init__(self, mark: str) -> None:
        super().__init__()
        self.mark = mark
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.stem(x)))

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["mark"]).touch()
        super().__setstate__(state)


def _ultralytics_like(tmp_path: Path) -> tuple[Path, Path, Detector]:
    mark = tmp_path / "unpickled"
    torch.manual_seed(0)
    model = Detector(str(mark)).eval()
    ckpt = {"date": "2026-12-03", "version": "8.3.0", "epoch": -1, "best_fitness": None, "model": model,
            "ema": Detector(str(mark)), "updates": 0, "optimizer": None, "train_args": {"imgsz": 64}}  # fmt: skip
    source = tmp_path / "best.pt"
    torch.save(ckpt, source)
    return source, mark, model


@pytest.mark.slow
@pytest.mark.parametrize("trust", [False, True], ids=["untrusted", "trusted"])
def test_a_container_of_pickled_modules_is_refused_before_unpickling_with_the_recipe(
    tmp_path: Path, trust: bool
) -> None:
    source, mark, model = _ultralytics_like(tmp_path)
    before = listing(tmp_path)
    for command in ("convert", "inspect"):
        result = spectral(command, source, *(["--trust-pickle"] if trust else []))
        assert result.exit_code == 3, result.output
        line = one_line(result.stderr)
        assert f"'model' ({__name__}.Detector), 'ema' ({__name__}.Detector)" in line, line
        assert "python -c" in line and ".state_dict()" in line, line
        assert not mark.exists(), "the pickle ran"
        assert listing(tmp_path) == before

    # the recipe, run as printed (by someone who trusts the file), saves a state dict that converts and runs equal
    recipe = re.search(r'python -c "([^"]+)"', result.stderr)
    assert recipe is not None, result.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, "-c", recipe[1]], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    saved = tmp_path / "best.model.state_dict.pt"
    assert saved.is_file()
    result = spectral("convert", saved, "-o", tmp_path / "spectral.pt", "--json")
    assert result.exit_code == 0, result.stderr
    assert [layer["name"] for layer in parse_json(result.stdout)["layers"]] == ["stem", "head"]
    fresh = Detector(str(tmp_path / "unused"))
    load_spectral(fresh, tmp_path / "spectral.pt")
    assert_same_outputs(fresh, model, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickled_modules_are_found_in_any_pickle_protocol_and_any_container(tmp_path: Path, protocol: int) -> None:
    """Protocol 4 and 5 name classes with STACK_GLOBAL and memoize with MEMOIZE; modules may sit in lists."""
    mark = tmp_path / "unpickled"
    torch.save({"epoch": 3, "models": [Detector(str(mark)), Detector(str(mark))], "state_dict": None},
               tmp_path / "list.pt", pickle_protocol=protocol)  # fmt: skip
    result = spectral("convert", tmp_path / "list.pt", "--trust-pickle")
    assert result.exit_code == 3, result.output
    line = one_line(result.stderr)
    assert f"'models/0' ({__name__}.Detector), 'models/1' ({__name__}.Detector)" in line, line
    assert "torch.save(c['models'][0].state_dict()" in line, line
    assert not mark.exists(), "the pickle ran"


# ---- peft adapters ---------------------------------------------------------------------------------------------


class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(x)))


def _adapter(tmp_path: Path) -> tuple[nn.Module, Path]:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Base()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "out"],
                                                      init_lora_weights=False))  # fmt: skip
    model.save_pretrained(str(tmp_path / "adapter"))
    return model.eval(), tmp_path / "adapter"


@pytest.mark.slow
def test_a_peft_adapter_is_refused_with_the_fix_and_the_merged_model_converts(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model, adapter = _adapter(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    loose = tmp_path / "loose.safetensors"  # the adapter's tensors away from their config: known by their keys
    loose.write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    before = listing(tmp_path), listing(adapter)
    for source in (adapter / "adapter_model.safetensors", adapter, loose):
        result = spectral("convert", source)
        assert result.exit_code == 5, result.output
        line = one_line(result.stderr)
        assert "peft" in line and "adapter" in line and "merge_and_unload()" in line, line
        assert (listing(tmp_path), listing(adapter)) == before

    # the fix: merge the adapter into the base model and convert that; it loads and runs as the adapted model
    base = Base()
    base.load_state_dict(torch.load(tmp_path / "base.pt", weights_only=True))
    merged = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    torch.save(merged.state_dict(), tmp_path / "merged.pt")
    result = spectral("convert", tmp_path / "merged.pt", "--json")
    assert result.exit_code == 0, result.stderr
    assert [layer["name"] for layer in parse_json(result.stdout)["layers"]] == ["conv", "out"]
    fresh = Base()
    load_spectral(fresh, tmp_path / "merged.spectral.pt")
    assert_same_outputs(fresh, model, torch.randn(2, 3, 8, 8))


# ---- inputs inside a Hugging Face hub cache ---------------------------------------------------------------------


def _hub_cache(root: Path, files: dict[str, bytes]) -> Path:
    """A hub cache laid out as huggingface_hub lays it out: blobs by hash, a snapshot of symlinks, refs/main."""
    repo = root / "models--org--tiny-net"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def _revisions(cache: Path) -> tuple[int, list[str]]:
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    return sum(len(repo.revisions) for repo in info.repos), [str(w) for w in info.warnings]


def test_an_input_inside_a_hub_cache_is_written_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file({"conv.weight": torch.randn(8, 3, 3, 3), "conv.bias": torch.zeros(8)}, str(weights))
    cache = tmp_path / "hub"
    snapshot = _hub_cache(cache, {"model.safetensors": weights.read_bytes(), "config.json": b"{}"})
    assert _revisions(cache) == (1, [])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    result = spectral("convert", snapshot / "model.safetensors")
    assert result.exit_code == 0, result.output
    target = work / "tiny-net.model.spectral.safetensors"
    assert f"wrote {target}" in " ".join(result.stdout.split()), result.stdout  # absolute: says where it went
    assert set(read(target)) == {"conv.parametrizations.weight.original", "conv.bias"}

    result = spectral("convert", snapshot)  # the snapshot as a model directory
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (work / "tiny-net.spectral").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in work.iterdir()) == ["tiny-net.model.spectral.safetensors", "tiny-net.spectral"]
    assert _revisions(cache) == (1, [])  # nothing was added to the cache
    assert sorted(p.name for p in snapshot.parent.iterdir()) == [snapshot.name]


# ---- torchvision's quantized models: their convs are listed as skipped -----------------------------------------------


def test_a_torchvision_quantized_model_lists_its_quantized_convs_as_skipped(tmp_path: Path) -> None:
    from torchvision.models.quantization import mobilenet_v2

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mobilenet_v2(weights=None, quantize=False).eval()
        model.fuse_model()
        model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
        torch.ao.quantization.prepare(model, inplace=True)
        model(torch.randn(1, 3, 32, 32))
        torch.ao.quantization.convert(model, inplace=True)
        torch.save(model.state_dict(), tmp_path / "mobilenet_q.pt")
    result = spectral("convert", tmp_path / "mobilenet_q.pt")
    assert result.exit_code == 6, result.stderr
    line = one_line(result.stderr)
    assert "nothing to convert" in line and "not float (qint8)" in line, line
    result = spectral("inspect", tmp_path / "mobilenet_q.pt", "--all", "--json")
    assert result.exit_code == 0 and parse_json(result.stdout)["totals"]["layers"] == 0


# ---- old-style hooks: skipped by the registrar, named by inspect --------------------------------------------------


def test_old_style_weight_norm_and_spectral_norm_are_skipped_before_anything_changes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.utils.weight_norm(nn.Conv2d(4, 4, 3)),
            nn.utils.spectral_norm(nn.Conv2d(4, 4, 3)),
            nn.Conv2d(4, 4, 3),
            nn.Conv2d(4, 4, 3),
        )
    prune.l1_unstructured(net[4], "weight", amount=0.5)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    registration = register_spectral_parametrization(net)
    assert registration.changed == ("0", "3")
    reasons = dict(registration.skipped)
    assert reasons["1"].startswith("old-style weight_norm") and reasons["2"].startswith("old-style spectral_norm")
    assert reasons["4"].startswith("pruned") and 'torch.nn.utils.prune.remove(module, "weight")' in reasons["4"]
    assert register_spectral_parametrization(net, undo=True).changed == ("0", "3")
    for key, value in net.state_dict().items():
        assert torch.allclose(value, reference[key], atol=1e-6), key
    torch.save(net.state_dict(), tmp_path / "hooks.pt")
    result = spectral("inspect", tmp_path / "hooks.pt", "--all", "--json")
    assert result.exit_code == 0, result.stderr
    domains = {layer["name"]: layer["domain"] for layer in parse_json(result.stdout)["layers"]}
    assert domains == {"0": "spatial", "1": "weight_norm", "2": "spectral_norm", "3": "spatial", "4": "pruned"}
    result = spectral("convert", tmp_path / "hooks.pt", "--json")
    assert result.exit_code == 0, result.stderr
    assert [layer["name"] for layer in parse_json(result.stdout)["layers"]] == ["0", "3"]
    assert math.isfinite(parse_json(result.stdout)["max_error"])
    assert set(read(tmp_path / "hooks.spectral.pt")) >= {"1.weight_g", "1.weight_v", "2.weight_orig"}


# ---- exotic tensors beside a real conv: carried over untouched, skipped with a reason ---------------------------


def _nested() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.ones(2, 3), torch.zeros(1, 3)])


EXOTIC: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "int8": (lambda w: (w * 20).to(torch.int8), "not float (int8)"),
    "quantized": (quantize, "not float (qint8)"),
    "complex64": (lambda w: w.to(torch.complex64), "not float (complex64)"),
    "float8": (lambda w: w.to(torch.float8_e4m3fn), "float8 (float8_e4m3fn)"),
    "sparse": (lambda w: w.to_sparse(), "not a dense tensor (sparse_coo)"),
    "meta": (lambda w: torch.empty_like(w, device="meta"), "not a dense tensor (meta)"),
    "nested": (lambda w: _nested(), ""),
    "empty": (lambda w: w[:0].clone(), ""),
}


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_nested:
        return all(torch.equal(x, y) for x, y in zip(a.unbind(), b.unbind(), strict=True))
    if a.is_meta:
        return b.is_meta and a.shape == b.shape and a.dtype == b.dtype
    if a.layout != torch.strided:
        return a.layout == b.layout and torch.equal(a.to_dense(), b.to_dense())
    if a.is_quantized:
        return b.is_quantized and torch.equal(a.int_repr(), b.int_repr()) and a.q_scale() == b.q_scale()
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _load(path: Path) -> Any:
    with warnings.catch_warnings():  # sparse tensors: torch warns that it validates them
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=True)


@pytest.mark.parametrize("exotic", list(EXOTIC))
def test_exotic_tensors_are_carried_over(tmp_path: Path, exotic: str) -> None:
    make, reason = EXOTIC[exotic]
    state = conv_state()
    odd = make(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1)))
    state["odd.weight"] = odd
    source = tmp_path / "mixed.pt"
    torch.save(state, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()

    result = spectral("convert", source, "--json")
    assert result.exit_code == 0, result.stderr
    fixes = ["1 layer skipped (float8 (float8_e4m3fn)): to convert it, cast"] if exotic == "float8" else []
    assert [w[: len(f)] for w, f in zip(parse_json(result.stdout)["warnings"], fixes, strict=True)] == fixes
    assert (result.stderr == "") == (not fixes)
    doc = parse_json(result.stdout)
    assert [layer["name"] for layer in doc["layers"]] == ["conv", "head"] + (["odd"] if exotic == "empty" else [])
    skipped = {s["key"]: s["reason"] for s in doc["skipped"]}
    if reason:
        assert skipped == {"odd.weight": reason}
    converted = _load(tmp_path / "mixed.spectral.pt")
    if exotic != "empty":
        assert _equal(converted["odd.weight"], odd)

    result = spectral("inspect", tmp_path / "mixed.spectral.pt", "--all")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    result = spectral("bake", tmp_path / "mixed.spectral.pt")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    baked = _load(tmp_path / "mixed.baked.pt")
    assert list(baked) == list(state)
    assert _equal(baked["odd.weight"], odd)
    for key in ("conv.weight", "head.weight"):
        assert rel_err(baked[key], state[key]) <= 1e-6
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    assert math.isfinite(doc["max_error"])
