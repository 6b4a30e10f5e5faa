"""Checkpoints written by other libraries' own save code (random weights, nothing downloaded), through the real CLI.

Each test builds the checkpoint with the package itself: timm's ``CheckpointSaver`` (pickled ``argparse.Namespace``
beside the weights), ``torch.ao.quantization`` (``_packed_params`` entries that are not tensors), transformers,
diffusers, MONAI, Lightning with OmegaConf hyperparameters, CompressAI. What they hold that convert cannot take is
in ``tests/test_say_why.py``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pytest
import torch
from models import assert_same_outputs, listing, one_line, parse_json, read, sha256, spectral
from torch import nn

from spectral_cli import load_spectral

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning"),
]


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
    assert result.stderr == ""  # plain SGD's state: nothing to convert, its positions renumbered
    converted = torch.load(tmp_path / "spectral.pt", weights_only=False)
    assert converted["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert converted["args"] == ARGS and converted["epoch"] == 0
    registered = _net(1)
    assert load_spectral(registered, tmp_path / "spectral.pt", trust_pickle=True).location == "state_dict"
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
    load_spectral(target, tmp_path / "q.spectral.pt")
    assert_same_outputs(target, quantized, X, tol=1e-5)
    assert spectral("bake", tmp_path / "q.spectral.pt").exit_code == 0


# ---- model directories and checkpoints of real packages: convert -> load_spectral -> same outputs -> bake -> load ----


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    for attribute in ("last_hidden_state", "sample"):
        out = getattr(out, attribute, out)
    return out if isinstance(out, torch.Tensor) else out[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_a_transformers_directory_round_trips_through_from_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    torch.manual_seed(0)
    model = transformers.ResNetModel(config).eval()
    model.save_pretrained(tmp_path / "resnet")
    (tmp_path / "resnet" / "README.md").write_text("a model card\n")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    result = spectral("convert", tmp_path / "resnet", "--json")
    assert result.exit_code == 0, result.stderr
    converted = tmp_path / "resnet.spectral"
    assert sorted(p.name for p in converted.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert {layer["location"] for layer in parse_json(result.stdout)["layers"]} == {"model.safetensors"}
    # from_pretrained of a spectral directory would keep random conv weights (missing keys): build, then load
    fresh = transformers.ResNetModel(transformers.ResNetConfig.from_pretrained(converted)).eval()
    assert load_spectral(fresh, converted / "model.safetensors").registered
    assert _rel(_outputs(fresh, x), _outputs(model, x)) <= 1e-5

    assert spectral("bake", converted, "-o", tmp_path / "baked", "--max-shard-size", "20KB").exit_code == 0
    names = sorted(p.name for p in (tmp_path / "baked").iterdir())
    assert "model.safetensors.index.json" in names and "config.json" in names and "README.md" in names
    assert next(n for n in names if n.endswith(".safetensors")).startswith("model-00001-of-")  # the stem kept
    again = transformers.ResNetModel.from_pretrained(tmp_path / "baked").eval()
    assert _rel(_outputs(again, x), _outputs(model, x)) <= 1e-5


def test_a_diffusers_pipeline_directory_keeps_its_components(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()  # fmt: skip
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    x, t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10])

    assert spectral("convert", tmp_path / "pipe").exit_code == 0
    converted = tmp_path / "pipe.spectral"
    files = sorted(str(p.relative_to(converted)) for p in converted.rglob("*") if p.is_file())
    assert files == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]  # fmt: skip
    fresh = diffusers.UNet2DModel.from_config(diffusers.UNet2DModel.load_config(converted / "unet")).eval()
    load_spectral(fresh, converted / "unet" / "diffusion_pytorch_model.safetensors")
    with torch.no_grad():
        assert _rel(fresh(x, t).sample, unet(x, t).sample) <= 1e-5

    assert spectral("bake", converted, "-o", tmp_path / "baked").exit_code == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "baked")
    with torch.no_grad():
        assert _rel(pipe.unet.eval()(x, t).sample, unet(x, t).sample) <= 1e-5


def test_a_monai_3d_unet(tmp_path: Path) -> None:
    monai = pytest.importorskip("monai.networks.nets", reason="MONAI is not installed")
    torch.manual_seed(0)
    model = monai.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)).eval()
    torch.save(model.state_dict(), tmp_path / "unet3d.pt")
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    assert spectral("convert", tmp_path / "unet3d.pt").exit_code == 0
    fresh = monai.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)).eval()
    assert all(len(k) == 3 for _, _, k in load_spectral(fresh, tmp_path / "unet3d.spectral.pt").registered)
    assert _rel(_outputs(fresh, x), _outputs(model, x)) <= 1e-5
    assert spectral("bake", tmp_path / "unet3d.spectral.pt").exit_code == 0
    plain = monai.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)).eval()
    plain.load_state_dict(read(tmp_path / "unet3d.baked.pt"), strict=True)
    assert _rel(_outputs(plain, x), _outputs(model, x)) <= 1e-5


def test_a_lightning_checkpoint_with_omegaconf_hparams(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning", reason="Lightning is not installed")
    omegaconf = pytest.importorskip("omegaconf", reason="omegaconf is not installed")
    import lightning_module

    config = omegaconf.OmegaConf.create({"channels": 8, "lr": 0.01})
    torch.manual_seed(0)
    module = lightning_module.LitConv(config)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8)), batch_size=4)
    trainer = lightning.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    module.eval()

    result = spectral("convert", tmp_path / "last.ckpt")
    assert result.exit_code == 5 and "--trust-pickle" in one_line(result.stderr)  # OmegaConf objects are code
    result = spectral("convert", tmp_path / "last.ckpt", "--trust-pickle")
    assert result.exit_code == 0, result.stderr
    # load_from_checkpoint would load strictly into plain convs: build the module from its hparams, then load
    checkpoint = torch.load(tmp_path / "last.spectral.ckpt", weights_only=False)
    fresh = lightning_module.LitConv(checkpoint["hyper_parameters"]["config"]).eval()
    loaded = load_spectral(fresh, tmp_path / "last.spectral.ckpt", trust_pickle=True)
    assert loaded.location == "state_dict" and len(loaded.registered) == 2
    assert _rel(_outputs(fresh, X), _outputs(module, X)) <= 1e-5
    assert spectral("bake", tmp_path / "last.spectral.ckpt", "--trust-pickle").exit_code == 0
    again = lightning_module.LitConv.load_from_checkpoint(tmp_path / "last.baked.ckpt", weights_only=False).eval()
    assert _rel(_outputs(again, X), _outputs(module, X)) <= 1e-5


def test_a_compressai_model_loads_without_from_state_dict(tmp_path: Path) -> None:
    """from_state_dict reads the sizes from the spatial weights: build with the sizes, then load_spectral."""
    from compressai.models import FactorizedPrior

    torch.manual_seed(0)
    model = FactorizedPrior(N=16, M=24).eval()
    model.update(force=True)
    torch.save(model.state_dict(), tmp_path / "fp.pt")
    assert spectral("convert", tmp_path / "fp.pt").exit_code == 0
    fresh = FactorizedPrior(N=16, M=24).eval()
    assert len(load_spectral(fresh, tmp_path / "fp.spectral.pt").registered) == 8
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(fresh(x)["x_hat"], model(x)["x_hat"]) <= 1e-5
    assert spectral("bake", tmp_path / "fp.spectral.pt").exit_code == 0
    plain = FactorizedPrior.from_state_dict(read(tmp_path / "fp.baked.pt")).eval()
    with torch.no_grad():
        assert _rel(plain(x)["x_hat"], model(x)["x_hat"]) <= 1e-5
