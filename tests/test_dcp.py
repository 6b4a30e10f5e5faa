"""Distributed checkpoints: saved by ``torch.distributed.checkpoint.save`` from a 2-rank gloo FSDP2 run, converted,
loaded into a registered model after ``dcp.load``, baked back; and DCP directories that would run code."""

from __future__ import annotations

import datetime
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import check_inspect_json, listing, one_line, parse_json, rel_err, rendezvous, spawn_ranks, spectral
from torch import nn

from spectral_cli import load_spectral, register_spectral_parametrization

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
]

WORLD = 2


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, (3, 5), padding=(1, 2)))


def _fsdp2_worker(rank: int, init_method: str, out: str) -> None:
    """Two Adam steps under FSDP2 (plain convs), then dcp.save of the model and optimizer, and the full weights."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = build()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(2):
            x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 2}, checkpoint_id=out + "/ckpt")
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(full, out + "/full.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("dcp")
    spawn_ranks(_fsdp2_worker, (rendezvous(out), str(out)), WORLD, [out / "full.pt"])
    return out / "ckpt", torch.load(out / "full.pt", weights_only=True)


def _dcp_load(model: nn.Module, directory: Path, key: str = "model") -> None:
    import torch.distributed.checkpoint as dcp

    state = {key: model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    model.load_state_dict(state[key], strict=True)


def test_an_fsdp2_checkpoint_converts_loads_and_bakes_back(tmp_path: Path, fsdp2_checkpoint: Any) -> None:
    source, full = fsdp2_checkpoint
    assert len([n for n in listing(source) if n.endswith(".distcp")]) >= WORLD  # written by both ranks
    reference = build(1)
    reference.load_state_dict(full, strict=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))

    converted = tmp_path / "ckpt.spectral"
    result = spectral("convert", source, "-o", converted, "--json")
    assert result.exit_code == 0, result.stderr
    doc = parse_json(result.stdout)
    assert [(layer["location"], layer["name"]) for layer in doc["layers"]] == [("model", "0"), ("model", "2")]
    assert doc["dropped"] == [] and result.stderr == ""  # opt.state_dict() by position: aligned and converted
    (optim,) = doc["optimizer"]
    assert (optim["location"], optim["optimizer"], optim["parameters"]) == ("optim", "Adam", 4)
    assert optim["converted"] == ["0.weight", "2.weight"] and optim["dropped"] == []
    inspected = parse_json(spectral("inspect", converted, "--json").stdout)
    check_inspect_json(inspected)
    assert inspected["format"] == "dcp" and [layer["basis"] for layer in inspected["layers"]] == ["rfft", "rfft"]
    assert not any(layer["inferred"] for layer in inspected["layers"])  # the records are read back

    registered = build(2)
    register_spectral_parametrization(registered)
    _dcp_load(registered, converted)  # torch's own loader, the records entry ignored
    assert rel_err(registered(x), reference(x)) <= 1e-5
    one_call = build(3)
    assert [name for name, _, _ in load_spectral(one_call, converted).registered] == ["0", "2"]
    assert rel_err(one_call(x), reference(x)) <= 1e-5

    baked = tmp_path / "ckpt.baked"
    assert spectral("bake", converted, "-o", baked).exit_code == 0
    plain = build(4)
    _dcp_load(plain, baked)
    for key, value in full.items():
        assert rel_err(plain.state_dict()[key], value) <= 1e-6, key
    before, spectral_state, back = (_as_torch(d, tmp_path)["optim"] for d in (source, converted, baked))
    assert tuple(spectral_state["state"]["1"]["exp_avg"].shape) == (2, 8, 3, 3, 2)  # renumbered: bias first
    assert back["param_groups"] == before["param_groups"]
    for i, state in before["state"].items():  # the first moment back exactly, up to rounding
        assert rel_err(back["state"][i]["exp_avg"], state["exp_avg"]) <= 1e-6, i
    single = tmp_path / "model.safetensors"  # one state dict of a DCP checkpoint, for deployment
    assert spectral("bake", converted, "-o", single).exit_code == 0
    from safetensors.torch import load_file

    assert sorted(load_file(str(single))) == sorted(full)


def _as_torch(directory: Path, tmp_path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{directory.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(directory, out)
    return dict(torch.load(out, weights_only=False))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("where", ["metadata", "entry"])
def test_a_dcp_directory_that_would_run_code_is_refused(tmp_path: Path, fsdp2_checkpoint: Any, where: str) -> None:
    """torch's reader unpickles .metadata and non-tensor entries without restriction; spectral does not."""
    import shutil

    source = tmp_path / "evil"
    shutil.copytree(fsdp2_checkpoint[0], source)
    marker = tmp_path / "pwned"
    if where == "metadata":
        (source / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    else:
        import torch.distributed.checkpoint as dcp

        shutil.rmtree(source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": build().state_dict(), "note": _Payload(marker)}, checkpoint_id=str(source), no_dist=True)
        marker.unlink(missing_ok=True)  # saving ran nothing; loading must not either
    for command in ("convert", "inspect", "bake"):
        result = spectral(command, source)
        assert not marker.exists(), "the checkpoint ran code"
        if where == "entry" and command != "convert":  # inspect lists tensors, bake finds none: that entry is not read
            assert result.exit_code == (0 if command == "inspect" else 6), result.stderr
            continue
        assert result.exit_code == (3 if where == "metadata" else 5), (command, result.stderr)
        line = one_line(result.stderr)
        assert "internal" not in line and ("--trust-pickle" in line or where == "metadata"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil"]
