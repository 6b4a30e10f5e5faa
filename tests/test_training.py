"""Training with the spectral parametrization where users train: torch.compile, DDP and FSDP2, cached evaluation.

* torch.compile (inductor): a registered model (both bases) gives eager's outputs and gradients, compiles one
  graph with no graph break, and does not recompile over several optimizer steps;
* DistributedDataParallel with 2 processes (gloo on the CPU, NCCL where there are two GPUs): the parameters after
  several steps equal those of one process on the same global batch; the same for FSDP2 (``fully_shard``), which
  shards the ``original`` tensors;
* ``parametrize.cached()`` in evaluation computes each kernel once, however often the layer is used;
* the CUDA variants run where a GPU is present and are skipped elsewhere.
"""

from __future__ import annotations

import copy
import datetime
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from models import rel_err, rendezvous, spawn_ranks
from torch import nn

from spectral_cli import SpectralParametrization, register_spectral_parametrization

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


def build(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A small conv model with both bases: rfft on layers 0 and 4 (one transposed), rdft on the grouped layer 2."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, (3, 5), padding=(1, 2), groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1),
    ).to(dtype=dtype, device=device)
    assert register_spectral_parametrization(model, include=["0", "4"]).changed == ("0", "4")
    assert register_spectral_parametrization(model, basis="rdft", include=["2"]).changed == ("2",)
    return model


def batch(step: int, size: int = 8, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(size, 3, 8, 8, generator=g, dtype=dtype), torch.randn(size, 3, 16, 16, generator=g, dtype=dtype)
    return x.to(device), y.to(device)


# ---- torch.compile --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_matches_eager_and_compiles_once(device: str) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    counters.clear()
    graphs: list[torch.fx.GraphModule] = []

    def inductor(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        graphs.append(gm)  # one call per graph dynamo compiles: a recompile shows here
        return compile_fx(gm, example_inputs)

    model, eager = build(device=device), build(device=device)
    compiled = torch.compile(model, backend=inductor, fullgraph=True)  # fullgraph: a graph break is an error
    opt_c = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt_e = torch.optim.Adam(eager.parameters(), lr=1e-2)

    steps = 6
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(steps):
            x, y = batch(step, device=device)
            out_c, out_e = compiled(x), eager(x)
            assert rel_err(out_c, out_e) <= 1e-5, step
            for opt, out in ((opt_c, out_c), (opt_e, out_e)):
                opt.zero_grad()
                nn.functional.mse_loss(out, y).backward()
            if step == 0:  # the same gradients, on the spectral coefficients too
                for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
                    assert p.grad is not None and q.grad is not None
                    assert rel_err(p.grad, q.grad) <= 1e-5, name
            opt_c.step()
            opt_e.step()

    assert len(graphs) == 1, f"compiled {len(graphs)} graphs in {steps} steps"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
        assert rel_err(p, q) <= 1e-4, name  # several Adam steps apart: rounding differences only
    torch._dynamo.reset()


# ---- bf16 autocast ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
@pytest.mark.parametrize("ks", [3, 25], ids=["3x3 dense", "25x25 separable"])
@pytest.mark.parametrize("basis", ["rfft", "rdft"])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_with_the_kernels_of_float32(device: str, basis: str, ks: int, compiled: bool) -> None:
    """Under ``torch.autocast`` (bf16) the kernel is synthesized in float32, with the bits it has without
    autocast (the conv casts it as any weight), and the coefficients get the gradient of that kernel's
    gradient (the rfft backward once met a bf16 gradient here: "expected scalar type Float but found BFloat16")."""
    if compiled and (ks != 3 or basis != "rfft"):
        pytest.skip("one compiled case: compiling costs seconds")
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, ks, padding=ks // 2).to(device)
    register_spectral_parametrization(conv, basis=basis)  # type: ignore[arg-type]
    original = conv.parametrizations.weight.original
    forward = torch.compile(conv, fullgraph=True) if compiled else conv
    x = torch.randn(2, 4, 16, 16, device=device)
    outside = conv.weight.detach().clone()
    with torch.autocast(device, dtype=torch.bfloat16):
        inside = conv.weight.detach().clone()
        out = forward(x)
    assert out.dtype == torch.bfloat16
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)
    out.float().square().sum().backward()

    # the reference: the same autocast conv on a plain weight holding the synthesized kernel, and the
    # transform's own backward (float64) of that weight's gradient
    leaf = outside.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        ref = nn.functional.conv2d(x, leaf, conv.bias, padding=conv.padding)
    ref.float().square().sum().backward()
    assert leaf.grad is not None and original.grad is not None
    coefficients = original.detach().double().requires_grad_(True)
    from spectral_cli import to_spatial

    (expected,) = torch.autograd.grad(to_spatial(coefficients, (ks, ks), basis), coefficients, leaf.grad.double())  # type: ignore[arg-type]
    # compiled, the gradient passes through bf16 in the compiled backward (its values are bf16 numbers):
    # the same gradient to bf16 rounding
    assert rel_err(original.grad, expected) <= (torch.finfo(torch.bfloat16).eps if compiled else 1e-5)


def test_channels_last_is_set_before_registering_as_the_readme_says() -> None:
    """channels_last then register trains; the other order is torch's refusal for rank-5 rfft coefficients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1))
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    reference = copy.deepcopy(model)
    register_spectral_parametrization(model)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert rel_err(model(x), reference(x)) <= 1e-6
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="required rank 4 tensor to use channels_last format"):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


# ---- DDP and FSDP2: two processes on gloo ---------------------------------------------------------------------

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 8


def _train(model: nn.Module, rank: int, world: int, device: str) -> None:
    """``STEPS`` Adam steps; each rank takes its contiguous share of every global batch."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step, GLOBAL_BATCH, torch.float64, device)
        mine = slice(rank * share, (rank + 1) * share)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
        opt.step()


def _distributed_worker(rank: int, init_method: str, out: str, device: str) -> None:
    """One rank: DDP, then FSDP2, each from the same initial model; results (or the error) saved per rank."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on a small machine
    backend, kind = ("nccl", "cuda") if device == "cuda" else ("gloo", "cpu")
    if kind == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    results: dict[str, Any] = {}
    try:
        for mode in ("ddp", "fsdp2"):
            try:
                model = build(dtype=torch.float64, device=device)
                if mode == "ddp":
                    from torch.nn.parallel import DistributedDataParallel

                    _train(DistributedDataParallel(model), rank, WORLD, device)
                    state = model.state_dict()
                else:
                    from torch.distributed.device_mesh import init_device_mesh
                    from torch.distributed.fsdp import fully_shard

                    # the mesh named: fully_shard's default mesh is on CUDA whenever a GPU is present
                    mesh = init_device_mesh(kind, (WORLD,))
                    for layer in (model[0], model[2], model[4]):
                        fully_shard(layer, mesh=mesh)
                    fully_shard(model, mesh=mesh)
                    _train(model, rank, WORLD, device)
                    state = {k: getattr(v, "full_tensor", lambda v=v: v)() for k, v in model.state_dict().items()}
                results[mode] = {k: v.detach().cpu().clone() for k, v in state.items()}
            except Exception:
                results[mode] = traceback.format_exc()
            dist.barrier()
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        # one GPU per rank: NCCL refuses two ranks on one GPU, and gloo's CUDA path crashed there (SIGSEGV, H100)
        pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 GPUs")),
    ],
)
def distributed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Both modes trained once by two spawned processes, and the single-process reference."""

    device = request.param
    out = tmp_path_factory.mktemp(f"dist-{device}")
    spawn_ranks(
        _distributed_worker, (rendezvous(out), str(out), device), WORLD, [out / f"rank{r}.pt" for r in range(WORLD)]
    )
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    reference = build(dtype=torch.float64, device=device)
    _train(reference, 0, 1, device)
    yield ranks, {k: v.detach().cpu() for k, v in reference.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_training_equals_one_process(distributed: Any, mode: str) -> None:
    ranks, reference = distributed
    for rank, results in enumerate(ranks):
        state = results[mode]
        assert not isinstance(state, str), f"{mode} failed on rank {rank}:\n{state}"
        assert list(state) == list(reference)
        for key, value in reference.items():
            assert state[key].shape == value.shape, key
            assert rel_err(state[key], value) <= 1e-6, (mode, rank, key, rel_err(state[key], value))
        assert any(key.endswith("parametrizations.weight.original") for key in state)
    for key in reference:  # every rank holds the same model
        assert torch.equal(ranks[0][mode][key], ranks[1][mode][key]), key


# ---- FSDP2 on 4 ranks: the rfft coefficients sharded on their channels -----------------------------------------

WORLD4 = 4


def build4(seed: int = 0) -> nn.Module:
    """rfft convs whose channels 4 divides (one transposed), and an rdft one: float64 for exact comparisons."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, (3, 5), padding=(1, 2)),
        nn.ReLU(),
        nn.ConvTranspose2d(12, 3, 4, stride=2, padding=1),
    ).to(torch.float64)
    register_spectral_parametrization(model, include=["0", "4"])
    register_spectral_parametrization(model, basis="rdft", include=["2"])
    return model


def _fsdp4_worker(rank: int, init_method: str, out: str) -> None:
    """Each rank trains with and without the placement; saves its local spectral bytes and the full parameters."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from spectral_cli import spectral_shard_placement

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD4, timeout=datetime.timedelta(seconds=120)
    )
    results: dict[str, Any] = {}
    try:
        mesh = init_device_mesh("cpu", (WORLD4,))
        for placed in (False, True):
            model = build4()
            place = spectral_shard_placement(model, mesh) if placed else None
            for layer in (model[0], model[2], model[4]):
                fully_shard(layer, mesh=mesh, shard_placement_fn=place)
            fully_shard(model, mesh=mesh, shard_placement_fn=place)
            local = sum(p.to_local().numel() * p.element_size() for n, p in model.named_parameters()
                        if n.endswith("parametrizations.weight.original"))  # fmt: skip
            _train(model, rank, WORLD4, "cpu")
            state = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
            results["placed" if placed else "default"] = {"bytes": local, "state": state}
            dist.barrier()
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_on_four_ranks_spreads_the_rfft_coefficients(tmp_path: Path) -> None:
    """fully_shard splits dim 0, the rfft planes: 2 of 4 ranks held nothing of those layers. With
    spectral_shard_placement every rank holds a quarter, and training gives one process's parameters."""

    outputs = [tmp_path / f"rank{r}.pt" for r in range(WORLD4)]
    spawn_ranks(_fsdp4_worker, (rendezvous(tmp_path), str(tmp_path)), WORLD4, outputs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD4)]
    assert all("error" not in r for r in ranks), next(r["error"] for r in ranks if "error" in r)
    reference = build4()
    _train(reference, 0, 1, "cpu")
    placed = [r["placed"]["bytes"] for r in ranks]
    default = [r["default"]["bytes"] for r in ranks]
    assert max(placed) <= 1.5 * min(placed), placed
    assert min(default) == 0 or max(default) > 1.5 * min(default), default  # what the placement fixes
    for r in ranks:
        for key, value in reference.state_dict().items():
            assert rel_err(r["placed"]["state"][key], value) <= 1e-6, key


# ---- parametrize.cached() in evaluation -----------------------------------------------------------------------


class Shared(nn.Module):
    """One conv applied three times (a recurrent or weight-tied block), beside two others."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Conv2d(6, 6, (3, 5), padding=(1, 2))
        self.head = nn.ConvTranspose2d(6, 3, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(3):
            x = torch.relu(self.block(x))
        return self.head(x)


def _counting_forward(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Count SpectralParametrization.forward calls, per parametrization object."""
    calls: Counter[int] = Counter()
    inner: Callable[..., torch.Tensor] = SpectralParametrization.forward

    def forward(self: SpectralParametrization, x: torch.Tensor) -> torch.Tensor:
        calls[id(self)] += 1
        return inner(self, x)

    monkeypatch.setattr(SpectralParametrization, "forward", forward)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("basis", ["rfft", "rdft"])
def test_cached_evaluation_computes_each_kernel_once(monkeypatch: pytest.MonkeyPatch, basis: str, device: str) -> None:
    torch.manual_seed(0)
    model = Shared().to(device)
    register_spectral_parametrization(model, basis=basis)  # type: ignore[arg-type]
    model.eval()
    kernels = {id(m.parametrizations.weight[0]) for m in (model.stem, model.block, model.head)}
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        expected = model(x)
    calls = _counting_forward(monkeypatch)
    with torch.no_grad():
        model(x)
    assert dict(calls) == dict.fromkeys(kernels, 1) | {id(model.block.parametrizations.weight[0]): 3}  # per use

    calls.clear()
    with torch.no_grad(), parametrize.cached():
        outputs = [model(x) for _ in range(4)]
    assert dict(calls) == dict.fromkeys(kernels, 1)  # cached: once per kernel, whatever the uses and passes
    for out in outputs:
        assert torch.equal(out, expected)

    calls.clear()
    with torch.no_grad():  # the cache ends with the context
        model(x)
    assert sum(calls.values()) == 5


def test_cached_kernels_follow_an_update_between_contexts() -> None:
    """A kernel cached in one evaluation is recomputed in the next, after the coefficients changed."""
    model = build().eval()
    x, _ = batch(0)
    with torch.no_grad(), parametrize.cached():
        before = model(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with torch.no_grad(), parametrize.cached():
        after = model(x)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(after, reference(x)) and not torch.equal(after, before)
