"""load_spectral: a converted checkpoint into a plain model in one call, every format; its refusals leave the model
untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import SAMPLE_MODEL, assert_same_outputs, copy_samples, make_samples, model_state, read, spectral
from torch import nn
from torch.nn.utils import parametrize

from spectral_cli import (
    SpectralError,
    convert_state_dict,
    load_spectral,
    register_spectral_parametrization,
)


def _parametrized(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]


@pytest.mark.parametrize("basis", ["rfft", "rdft"])
@pytest.mark.parametrize("sample", ["balle.pt", "balle.safetensors", "lightning.ckpt", "conv1d.pt", "conv3d.pt"])
def test_a_converted_sample_loads_in_one_call(tmp_path: Path, sample: str, basis: str) -> None:
    work = copy_samples(tmp_path, [sample])
    out = work / f"out{Path(sample).suffix}"
    assert spectral("convert", work / sample, "-o", out, "--basis", basis).exit_code == 0
    name = SAMPLE_MODEL[sample]
    reference = make_samples.build(name, seed=9)
    reference.load_state_dict(model_state(read(work / sample)), strict=True)
    model = make_samples.build(name, seed=10)
    loaded = load_spectral(model, out)
    assert loaded.prefix == ("model." if sample == "lightning.ckpt" else "")
    assert loaded.location == ("state_dict" if sample == "lightning.ckpt" else "")
    assert {layer for layer, b, _ in loaded.registered if b == basis} == set(_parametrized(model))
    assert_same_outputs(model, reference, make_samples.example_input(name), tol=1e-5)
    again = load_spectral(model, out)  # a second load: the layers are registered already
    assert again.registered == () and set(again.already) == set(_parametrized(model))


def test_a_partly_converted_sharded_directory_and_a_state_dict(tmp_path: Path) -> None:
    work = copy_samples(tmp_path, ["balle.safetensors"])
    shards = work / "shards"
    result = spectral("convert", work / "balle.safetensors", "-o", shards, "--max-shard-size", "40KB",
                      "--exclude", "g_s.*")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    model = make_samples.build("balle", seed=3)
    loaded = load_spectral(model, shards)
    assert sorted(layer for layer, _, _ in loaded.registered) == sorted(_parametrized(model))
    assert all(layer.startswith("g_a.") for layer in _parametrized(model))
    plain = make_samples.build("balle", seed=4)
    state = convert_state_dict(plain.state_dict(), include="g_s.*").state_dict
    fresh = make_samples.build("balle", seed=5)
    load_spectral(fresh, state)
    assert all(layer.startswith("g_s.") for layer in _parametrized(fresh))
    assert_same_outputs(fresh, plain, make_samples.example_input("balle"), tol=1e-5)


def test_a_pytorch_parametrizations_checkpoint_loads_without_records(tmp_path: Path) -> None:
    from pytorch_parametrizations.spectral.utils import register_spectral_parametrization as seed_register

    torch.manual_seed(0)
    seed_net = nn.Sequential(nn.Conv2d(3, 4, (3, 5)), nn.ReLU(), nn.Conv2d(4, 2, 3))
    seed_register(seed_net)
    torch.save(seed_net.state_dict(), tmp_path / "seed.pt")
    model = nn.Sequential(nn.Conv2d(3, 4, (3, 5)), nn.ReLU(), nn.Conv2d(4, 2, 3))
    loaded = load_spectral(model, tmp_path / "seed.pt")  # the model's kernel sizes settle what a shape cannot
    assert loaded.registered == (("0", "rfft", (3, 5)), ("2", "rfft", (3, 3)))
    assert_same_outputs(model, seed_net, torch.randn(1, 3, 9, 9), tol=1e-5)


def _converted(basis: str = "rfft") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 5))
    return convert_state_dict(net.state_dict(), basis=basis).state_dict  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "says"),
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3)), "the model has no layer '2'"),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 8)), "a Linear, not a conv"),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), "kernel size (5, 5)"),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 5), nn.Conv2d(8, 8, 1)), "lacks"),
    ],
    ids=["missing-layer", "not-a-conv", "kernel-size", "other-keys"],
)
def test_a_checkpoint_that_does_not_fit_leaves_the_model_untouched(model: object, says: str) -> None:
    target = model()  # type: ignore[operator]
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(SpectralError, match=says.replace("(", r"\(").replace(")", r"\)")) as refused:
        load_spectral(target, _converted())
    assert "\n" not in str(refused.value)
    assert _parametrized(target) == []
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_a_basis_that_differs_from_the_models_registration_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 5))
    register_spectral_parametrization(model, basis="rdft")
    with pytest.raises(SpectralError, match=r"stores '0' in the rfft basis, the model has it registered in rdft"):
        load_spectral(model, _converted("rfft"))
    load_spectral(model, _converted("rdft"))


def test_a_container_location_is_chosen_and_a_missing_one_named(tmp_path: Path) -> None:
    weights, ema = _converted(), _converted()
    torch.save({"state_dict": weights, "model_ema": ema, "epoch": 1}, tmp_path / "ckpt.pt")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 5))
    assert load_spectral(model, tmp_path / "ckpt.pt", location="model_ema").location == "model_ema"
    with pytest.raises(SpectralError, match=r"no state dict at 'ema'.*'state_dict', 'model_ema'"):
        load_spectral(model, tmp_path / "ckpt.pt", location="ema")
