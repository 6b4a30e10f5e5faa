"""Checkpoints written by other libraries' own save code (random weights, nothing downloaded), through the real CLI.

Each test builds the checkpoint with the package itself: timm's ``CheckpointSaver`` (pickled ``argparse.Namespace``
beside the weights), ``torch.ao.quantization`` and torchvision's quantized models (``_packed_params`` entries that
are not tensors), the old-style ``weight_norm``/``spectral_norm`` hooks.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from models import assert_same_outputs, listing, one_line, parse_json, read, sha256, spectral
from torch import nn

from spectral_cli import register_spectral_parametrization

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))).mean(dim=(-2, -1)))


def _net(seed: int) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet().eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
ARGS = argparse.Namespace(model="smallnet", lr=0.1, epochs=3)


# ---- trusted pickles: the written file is read back with the same trust ----------------------------------------


def test_a_timm_checkpoint_with_pickled_args_converts_and_bakes_with_trust(tmp_path: Path) -> None:
    """timm's CheckpointSaver pickles the training ``argparse.Namespace`` beside the weights."""
    from timm.utils import CheckpointSaver

    model = _net(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, optimizer, args=ARGS, checkpoint_dir=str(tmp_path),
                            recovery_dir=str(tmp_path))  # fmt: skip
    saver.save_checkpoint(epoch=0, metric=1.0)
    source = tmp_path / "last.pth.tar"
    digest = sha256(source)
    result = spectral("convert", source, "-o", tmp_path / "spectral.pt")
    assert result.exit_code == 5 and "--trust-pickle" in one_line(result.stderr)
    result = spectral("convert", source, "-o", tmp_path / "spectral.pt", "--trust-pickle")
    assert result.exit_code == 0, result.stderr
    assert "optimizer" in result.stderr  # dropped, with a warning
    converted = torch.load(tmp_path / "spectral.pt", weights_only=False)
    assert converted["args"] == ARGS and converted["epoch"] == 0
    registered = _net(1)
    register_spectral_parametrization(registered)
    registered.load_state_dict(converted["state_dict"], strict=True)
    assert_same_outputs(registered, model, X, tol=1e-5)
    result = spectral("bake", tmp_path / "spectral.pt", "-o", tmp_path / "baked.pt", "--trust-pickle")
    assert result.exit_code == 0, result.stderr
    plain = _net(2)
    plain.load_state_dict(torch.load(tmp_path / "baked.pt", weights_only=False)["state_dict"], strict=True)
    assert_same_outputs(plain, model, X, tol=1e-5)
    assert sha256(source) == digest


def test_an_unimportable_class_in_a_trusted_pickle_names_what_is_missing(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "gone_module.py").write_text("class Config:\n    def __init__(self):\n        self.lr = 0.1\n")
    sys.path.insert(0, str(package))
    try:
        import gone_module

        torch.save({"state_dict": _net(0).state_dict(), "config": gone_module.Config()}, tmp_path / "ckpt.pt")
    finally:
        sys.path.remove(str(package))
        sys.modules.pop("gone_module", None)
    result = spectral("convert", tmp_path / "ckpt.pt", "--trust-pickle")
    assert result.exit_code == 3
    line = one_line(result.stderr)
    assert "'gone_module'" in line and "not installed" in line and "damaged" not in line, line
    assert listing(tmp_path) == ["ckpt.pt", "pkg"]


# ---- quantized models: the float convs convert, the rest is kept -----------------------------------------------


def test_a_dynamically_quantized_model_converts_its_float_convs(tmp_path: Path) -> None:
    model = _net(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        torch.save(quantized.state_dict(), tmp_path / "q.pt")
    result = spectral("convert", tmp_path / "q.pt", "--json")
    assert result.exit_code == 0, result.stderr
    assert [layer["name"] for layer in parse_json(result.stdout)["layers"]] == ["stem", "body"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = torch.load(tmp_path / "q.spectral.pt", weights_only=True)
        target = torch.ao.quantization.quantize_dynamic(_net(1), {nn.Linear}, dtype=torch.qint8)
    assert converted["head._packed_params.dtype"] == torch.qint8
    register_spectral_parametrization(target)
    target.load_state_dict(converted, strict=True)
    assert_same_outputs(target, quantized, X, tol=1e-5)
    assert spectral("bake", tmp_path / "q.spectral.pt").exit_code == 0


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
        )
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    registration = register_spectral_parametrization(net)
    assert registration.changed == ("0", "3")
    reasons = dict(registration.skipped)
    assert reasons["1"].startswith("old-style weight_norm") and reasons["2"].startswith("old-style spectral_norm")
    assert register_spectral_parametrization(net, undo=True).changed == ("0", "3")
    for key, value in net.state_dict().items():
        assert torch.allclose(value, reference[key], atol=1e-6), key
    torch.save(net.state_dict(), tmp_path / "hooks.pt")
    result = spectral("inspect", tmp_path / "hooks.pt", "--all", "--json")
    assert result.exit_code == 0, result.stderr
    domains = {layer["name"]: layer["domain"] for layer in parse_json(result.stdout)["layers"]}
    assert domains == {"0": "spatial", "1": "weight_norm", "2": "spectral_norm", "3": "spatial"}
    result = spectral("convert", tmp_path / "hooks.pt", "--json")
    assert result.exit_code == 0, result.stderr
    assert [layer["name"] for layer in parse_json(result.stdout)["layers"]] == ["0", "3"]
    assert math.isfinite(parse_json(result.stdout)["max_error"])
    assert set(read(tmp_path / "hooks.spectral.pt")) >= {"1.weight_g", "1.weight_v", "2.weight_orig"}
