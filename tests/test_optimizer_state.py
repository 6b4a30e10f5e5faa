"""Optimizer state through ``spectral convert`` and ``bake`` (issue 21's plumbing): positions aligned with the state
dict's parameters and renumbered for the registered order, refused where ambiguous; torch containers, Lightning
runs that resume (``Trainer.fit(ckpt_path=...)``), DCP optimizer entries keyed by parameter name; the library's
``load_spectral(..., optimizer=)`` and ``convert_optimizer_state``. The math itself: tests/test_optimizer_math.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import one_line, parse_json, read, rel_err, spectral
from torch import nn

from spectral_cli import SpectralError, convert_optimizer_state, load_spectral, register_spectral_parametrization
from spectral_cli.transform.optimizer import gradient_to_spectral

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

SPECTRAL = "parametrizations.weight.original"


class WithBuffer(nn.Module):
    """Conv, BatchNorm (known buffers), a module with a float buffer of its own, conv: buffers between parameters."""

    def __init__(self, scale_shape: tuple[int, ...] = (3,)) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gate = nn.Module()
        self.gate.register_buffer("scale", torch.ones(scale_shape))  # not a known buffer: may be a parameter
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.bn(self.c1(x))))


def _trained(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    for step in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def _container(tmp_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    return path


# ---- index alignment ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("basis", "kind"), [("rfft", "Adam"), ("rdft", "Adam"), ("rfft", "SGD")])
def test_a_container_converts_with_buffers_between_parameters_and_bakes_back(
    tmp_path: Path, basis: str, kind: str
) -> None:
    torch.manual_seed(0)
    model = WithBuffer()
    make = (lambda p: torch.optim.Adam(p, lr=1e-2)) if kind == "Adam" else (lambda p: torch.optim.SGD(p, 0.1, 0.9))
    key = "exp_avg" if kind == "Adam" else "momentum_buffer"  # exact: the adjoint of the synthesis
    optimizer = make(model.parameters())
    _trained(model, optimizer)
    source = _container(tmp_path, model, optimizer)
    before = optimizer.state_dict()

    result = spectral("convert", source, "--basis", basis, "--json")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    (report,) = parse_json(result.stdout)["optimizer"]
    assert (report["location"], report["optimizer"]) == ("optimizer", kind)
    assert report["converted"] == ["c1.weight", "c2.weight"] and report["dropped"] == []
    assert report["approximated"] == (["c1.weight", "c2.weight"] if kind == "Adam" else [])
    converted = read(tmp_path / "ckpt.spectral.pt")
    assert converted["epoch"] == 3 and converted["optimizer"]["param_groups"] == before["param_groups"]

    # the registered model's optimizer order: c1.bias first, the spectral weight after it; the state at each
    # position is the one an optimizer built after registering expects, the same as the library's (names: exact)
    registered = WithBuffer()
    register_spectral_parametrization(registered, basis=basis)
    order = [n for n, _ in registered.named_parameters()]
    assert order[:2] == ["c1.bias", f"c1.{SPECTRAL}"]
    state = converted["optimizer"]["state"]
    position = order.index(f"c2.{SPECTRAL}")
    expected = gradient_to_spectral(before["state"][4][key], (3, 3), basis)  # c2.weight was position 4
    assert rel_err(state[position][key], expected) <= 1e-6
    library = convert_optimizer_state(registered, before)
    assert library.names == order
    for i, own in library.state_dict["state"].items():
        for entry, value in own.items():
            assert torch.equal(state[i][entry], value), (i, entry)

    resumed = make(registered.parameters())
    assert load_spectral(registered, tmp_path / "ckpt.spectral.pt", optimizer=resumed).optimizer == "optimizer"
    _trained(registered, resumed, steps=1)  # the converted state steps
    assert int(resumed.state_dict()["state"][position].get("step", 4)) == 4

    assert spectral("bake", tmp_path / "ckpt.spectral.pt", "-o", tmp_path / "baked.pt").exit_code == 0
    back = read(tmp_path / "baked.pt")["optimizer"]
    assert back["param_groups"] == before["param_groups"]
    for i, own in before["state"].items():  # positions in the plain order again; exact parts back exactly
        assert sorted(back["state"][i]) == sorted(own)
        assert rel_err(back["state"][i][key], own[key]) <= 1e-6, i
        if kind == "Adam":
            assert torch.equal(back["state"][i]["step"], own["step"])


def _dropped_because(tmp_path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Convert through the CLI; the optimizer state must be dropped (param groups kept); return the warning."""
    source = _container(tmp_path, model, optimizer)
    result = spectral("convert", source, "--json")
    assert result.exit_code == 0, result.stderr
    (report,) = parse_json(result.stdout)["optimizer"]
    assert report["converted"] == [] and [d["parameter"] for d in report["dropped"]] == ["*"]
    written = read(tmp_path / "ckpt.spectral.pt")["optimizer"]
    assert written["state"] == {} and written["param_groups"] == optimizer.state_dict()["param_groups"]
    return one_line(result.stderr)


def test_alike_shapes_around_a_buffer_are_refused(tmp_path: Path) -> None:
    """The unknown buffer has the bias's shape: position 1 may be c1.bias or gate.scale (or a bn parameter)."""
    model = WithBuffer(scale_shape=(8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _trained(model, optimizer)
    warning = _dropped_because(tmp_path, model, optimizer)
    assert "several alignments fit: its position 1 may be c1.bias or bn.weight" in warning, warning


def test_a_frozen_layer_of_the_same_shape_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    _trained(model, optimizer)
    assert "several alignments fit: its position 0 may be 0.weight or 1.weight" in _dropped_because(
        tmp_path, model, optimizer
    )


def test_a_frozen_layer_of_another_shape_aligns(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.Adam(model[1].parameters())
    _trained(model, optimizer)
    result = spectral("convert", _container(tmp_path, model, optimizer), "--json")
    assert result.exit_code == 0 and result.stderr == ""
    (report,) = parse_json(result.stdout)["optimizer"]
    assert report["converted"] == ["1.weight"] and report["parameters"] == 2


def test_several_groups_and_a_count_mismatch_are_refused(tmp_path: Path) -> None:
    model = WithBuffer()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}])
    _trained(model, optimizer)
    assert "2 parameter groups" in _dropped_because(tmp_path, model, optimizer)

    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
    optimizer = torch.optim.Adam(other.parameters())
    source = tmp_path / "mismatch.pt"
    torch.save({"model": WithBuffer().state_dict(), "optimizer": optimizer.state_dict()}, source)
    result = spectral("convert", source)
    assert result.exit_code == 0 and "8 parameters and the state dict only 7" in result.stderr, result.stderr


def test_an_unknown_optimizer_is_named_and_its_kernels_dropped(tmp_path: Path) -> None:
    class Mine(torch.optim.Optimizer):
        def __init__(self, params: Any) -> None:
            super().__init__(params, {"lr": 0.1, "wd_ratio": 0.1})

        def step(self, closure: Any = None) -> None:
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["velocity"] = torch.zeros_like(p)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 3, 3))
    optimizer = Mine(model.parameters())
    optimizer.step()
    result = spectral("convert", _container(tmp_path, model, optimizer), "--json")
    assert result.exit_code == 0
    (report,) = parse_json(result.stdout)["optimizer"]
    assert report["optimizer"] == "unknown" and [d["parameter"] for d in report["dropped"]] == ["0.weight", "1.weight"]
    assert "options lr, wd_ratio; state velocity" in result.stderr, result.stderr
    written = read(tmp_path / "ckpt.spectral.pt")["optimizer"]["state"]
    assert sorted(written) == [0, 2]  # the biases' states, renumbered (bias first), carried


def test_optimizer_drop_keeps_the_groups(tmp_path: Path) -> None:
    model = WithBuffer()
    optimizer = torch.optim.Adam(model.parameters())
    _trained(model, optimizer)
    result = spectral("convert", _container(tmp_path, model, optimizer), "--optimizer", "drop")
    assert result.exit_code == 0 and "--optimizer drop" in result.stderr
    written = read(tmp_path / "ckpt.spectral.pt")["optimizer"]
    assert written == {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]}
    assert spectral("bake", tmp_path / "ckpt.spectral.pt", "--optimizer", "sideways").exit_code == 2


def test_load_spectral_refuses_an_optimizer_built_before_registering(tmp_path: Path) -> None:
    model = WithBuffer()
    optimizer = torch.optim.Adam(model.parameters())
    _trained(model, optimizer)
    assert spectral("convert", _container(tmp_path, model, optimizer)).exit_code == 0
    fresh = WithBuffer()
    early = torch.optim.Adam(fresh.parameters())
    with pytest.raises(SpectralError, match="register first"):
        load_spectral(fresh, tmp_path / "ckpt.spectral.pt", optimizer=early)
    assert type(fresh.c1) is nn.Conv2d  # refused before the model was touched
    with pytest.raises(SpectralError, match="holds no optimizer state"):
        register_spectral_parametrization(fresh)
        torch.save(read(tmp_path / "ckpt.spectral.pt")["model"], tmp_path / "bare.pt")
        load_spectral(fresh, tmp_path / "bare.pt", optimizer=torch.optim.Adam(fresh.parameters()))


# ---- Lightning: a run resumes from the converted checkpoint, and from the baked one -------------------------------


def _fit(module: Any, steps: int, ckpt: Path | None = None) -> Any:
    import lightning

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 8, 8)), batch_size=4)
    trainer = lightning.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt)
    return trainer


@pytest.mark.parametrize("registers", ["LitSpectralInit", "LitSpectralConfigure"])
def test_lightning_resumes_from_the_converted_checkpoint_and_back(tmp_path: Path, registers: str) -> None:
    pytest.importorskip("lightning", reason="Lightning is not installed")
    import lightning_module

    torch.manual_seed(0)
    trainer = _fit(lightning_module.LitScheduled(), 4)  # 2 epochs of 2 steps, the lr halved every 2 steps
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    result = spectral("convert", tmp_path / "last.ckpt", "--json")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert parse_json(result.stdout)["optimizer"][0]["location"] == "optimizer_states/0"

    reference = _fit(lightning_module.LitScheduled(), 6, tmp_path / "last.ckpt")  # the plain run, resumed
    module = getattr(lightning_module, registers)()
    resumed = _fit(module, 6, tmp_path / "last.spectral.ckpt")
    assert (resumed.global_step, resumed.current_epoch) == (6, reference.current_epoch)  # continued, not restarted
    assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == 6
    optimizer = resumed.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == reference.optimizers[0].param_groups[0]["lr"] == 0.01 * 0.5**3
    names = [n for n, _ in module.named_parameters()]
    state = optimizer.state_dict()["state"]
    assert int(state[names.index(f"net.0.{SPECTRAL}")]["step"]) == 6  # the converted state went on, not afresh

    resumed.save_checkpoint(tmp_path / "more.ckpt")
    assert spectral("bake", tmp_path / "more.ckpt").exit_code == 0
    plain = _fit(lightning_module.LitScheduled(), 8, tmp_path / "more.baked.ckpt")
    assert (plain.global_step, plain.optimizers[0].param_groups[0]["lr"]) == (8, pytest.approx(0.01 * 0.5**4))
    assert int(plain.optimizers[0].state_dict()["state"][0]["step"]) == 8  # net.0.weight, position 0 again


# ---- DCP: optimizer entries keyed by parameter names ----------------------------------------------------------------


@pytest.mark.parametrize("flatten", [False, True])
def test_dcp_optimizer_entries_are_renamed_and_converted(tmp_path: Path, flatten: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _trained(model, optimizer)
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        osd = get_optimizer_state_dict(model, optimizer, options=options)
        dcp.save({"model": model.state_dict(), "optim": osd}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)

    result = spectral("convert", tmp_path / "ckpt", "-o", tmp_path / "spectral", "--json")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    (report,) = parse_json(result.stdout)["optimizer"]
    assert (report["location"], report["converted"], report["dropped"]) == ("optim", ["0.weight", "2.weight"], [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(tmp_path / "spectral"), str(tmp_path / "spectral.pt"))
    optim = torch.load(tmp_path / "spectral.pt", weights_only=False)["optim"]
    exp_avg = optim[f"state.2.{SPECTRAL}.exp_avg"] if flatten else optim["state"][f"2.{SPECTRAL}"]["exp_avg"]
    original = osd["state.2.weight.exp_avg"] if flatten else osd["state"]["2.weight"]["exp_avg"]
    assert rel_err(exp_avg, gradient_to_spectral(original, (3, 3), "rfft")) <= 1e-6
    if flatten:
        assert f"param_groups.0.{SPECTRAL}.lr" in optim and "param_groups.0.weight.lr" not in optim
    else:
        params = optim["param_groups"][0]["params"]
        assert f"0.{SPECTRAL}" in params and "0.weight" not in params

    # the renamed entries load into an optimizer built over the registered model, by name
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    registered = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    load_spectral(registered, tmp_path / "spectral")
    resumed = torch.optim.Adam(registered.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_optimizer_state_dict(registered, resumed, optim, options=options)
    _trained(registered, resumed, steps=1)

    assert spectral("bake", tmp_path / "spectral", "-o", tmp_path / "baked").exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(tmp_path / "baked"), str(tmp_path / "baked.pt"))
    back = torch.load(tmp_path / "baked.pt", weights_only=False)["optim"]
    again = back["state.2.weight.exp_avg"] if flatten else back["state"]["2.weight"]["exp_avg"]
    assert rel_err(again, original) <= 1e-6


@pytest.mark.parametrize(
    "state",
    [
        {"state": 5, "param_groups": "x"},
        {"state": {0: {"exp_avg": "nope"}}, "param_groups": [{"params": [0], "betas": (0.9, 0.999), "amsgrad": False}]},
        {"state": {}, "param_groups": [{"params": None}]},
    ],
)
def test_an_optimizer_state_not_laid_out_as_torch_writes_one_is_dropped(tmp_path: Path, state: Any) -> None:
    source = tmp_path / "odd.pt"
    torch.save({"model": WithBuffer().state_dict(), "optimizer": state}, source)
    result = spectral("convert", source, "--json")
    assert result.exit_code == 0, result.stderr
    assert "every parameter's state dropped" in result.stderr, result.stderr
    written = read(tmp_path / "odd.spectral.pt")["optimizer"]
    assert written["state"] == {}


# ---- generated: architectures x optimizers x bases x containers --------------------------------------------------

#: optimizers whose state converts, with the entries that convert exactly (the adjoint of a linear map)
OPTIMIZERS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "SGD": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ("momentum_buffer",)),
    "Adam": (lambda p: torch.optim.Adam(p, lr=1e-2), ("exp_avg",)),
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=1e-2), ("exp_avg",)),
    "NAdam": (lambda p: torch.optim.NAdam(p, lr=1e-2), ("exp_avg",)),
    "RMSprop": (lambda p: torch.optim.RMSprop(p, lr=1e-3), ()),
    "Adagrad": (lambda p: torch.optim.Adagrad(p, lr=1e-2), ()),
}


def _layer(kind: str, rank: int, channels: int, kernel: int, groups: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
    transposed = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[rank]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
    if kind == "conv":
        return conv(channels, channels, kernel, groups=groups)
    if kind == "transposed":
        return transposed(channels, channels, kernel, groups=groups)
    if kind == "depthwise":
        return conv(channels, channels, kernel, groups=channels, bias=False)
    return norm(channels)


def _model(layers: list[tuple[str, int, int]], rank: int, channels: int) -> nn.Module:
    return nn.Sequential(*(_layer(kind, rank, channels, kernel, groups) for kind, kernel, groups in layers))


def _stepped(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """Two steps with made-up gradients: every parameter gets state, no forward pass needed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()


def _architectures() -> Any:
    from hypothesis import strategies as st

    layer = st.tuples(st.sampled_from(["conv", "transposed", "depthwise", "norm"]), st.integers(2, 4),
                      st.sampled_from([1, 2]))  # fmt: skip
    return st.tuples(st.lists(layer, min_size=1, max_size=5), st.integers(1, 3), st.sampled_from([2, 4]))


def test_generated_checkpoints_convert_their_optimizer_state_as_the_library_does_and_bake_back(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Whatever the architecture (1-D to 3-D, transposed, grouped, depthwise, norms between), optimizer, basis and
    container (plain or Lightning's list): the command line's state, aligned by order and shape, is the library's
    (aligned by name), or every state is dropped with a reason; never another alignment. Baked back, the exact
    entries return within float tolerance."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    outcomes: list[str] = []

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_architectures(), st.sampled_from(sorted(OPTIMIZERS)), st.sampled_from(["rfft", "rdft"]), st.booleans(),
           st.integers(0, 2**16))  # fmt: skip
    def check(arch: Any, kind: str, basis: str, lightning: bool, seed: int) -> None:
        layers, rank, channels = arch
        if not any(k != "norm" for k, _, _ in layers):
            layers = [("conv", 3, 1), *layers]
        work = tmp_path_factory.mktemp("gen")
        torch.manual_seed(seed)
        model = _model(layers, rank, channels)
        make, exact = OPTIMIZERS[kind]
        optimizer = make(model.parameters())
        _stepped(model, optimizer, seed)
        before = optimizer.state_dict()
        container = {"state_dict" if lightning else "model": model.state_dict()}
        container["optimizer_states" if lightning else "optimizer"] = [before] if lightning else before
        torch.save(container, work / "ckpt.pt")

        result = spectral("convert", work / "ckpt.pt", "--basis", basis, "--json")
        assert result.exit_code == 0, result.output
        (report,) = parse_json(result.stdout)["optimizer"]
        written = read(work / "ckpt.spectral.pt")
        state = written["optimizer_states"][0] if lightning else written["optimizer"]
        assert state["param_groups"] == before["param_groups"]
        if [d["parameter"] for d in report["dropped"]] == ["*"]:  # refused: nothing kept, and it says why
            outcomes.append("refused")
            assert state["state"] == {} and report["dropped"][0]["reason"]
            return
        outcomes.append("converted")
        registered = _model(layers, rank, channels)
        register_spectral_parametrization(registered, basis=basis)
        library = convert_optimizer_state(registered, before).state_dict["state"]
        assert sorted(state["state"]) == sorted(library)
        for i, own in library.items():
            assert sorted(state["state"][i]) == sorted(own), i
            for entry, value in own.items():
                assert torch.equal(state["state"][i][entry], value), (i, entry)

        baked = spectral("bake", work / "ckpt.spectral.pt", "-o", work / "baked.pt")
        assert baked.exit_code == 0, baked.output
        back = read(work / "baked.pt")
        back_state = back["optimizer_states"][0] if lightning else back["optimizer"]
        for i, own in before["state"].items():
            assert sorted(back_state["state"][i]) == sorted(own), i
            for entry in exact:
                assert rel_err(back_state["state"][i][entry], own[entry]) <= 1e-5, (i, entry)

    check()
    assert "converted" in outcomes  # the generator reaches the conversion, not only the refusals
