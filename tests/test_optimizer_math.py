"""The optimizer-state maps of :mod:`spectral_cli.transform.optimizer` against independent references.

* Linear (gradient-like) state: equal to autograd's vector-Jacobian product through a registered
  ``SpectralParametrization`` (float64), for 1-D, 2-D and 3-D kernels, odd, even and rectangular sizes,
  conv and transposed-conv layouts, a kernel of the separable method, both bases.
* Along a trajectory: real ``torch.optim`` optimizers fed the same spatial gradients, one on the weight and one
  on the stored tensor (fed the parametrization's gradients): the converted spatial state equals the spectral
  optimizer's own state, exactly up to rounding, for SGD momentum (plain and Nesterov) and Adam/AdamW's
  ``exp_avg``.
* Bake inverts convert on every state built from gradients; it is the Moore-Penrose pseudo-inverse of the
  adjoint (``torch.linalg.pinv`` of the autograd Jacobian).
* Second moments: the diagonal map is the exact second moment of uncorrelated gradients (Jacobian squared),
  the correlated one bounds the second moment of any gradients from above; both non-negative; exact where the
  synthesis is a permutation (1-tap kernels).
* dtypes, re-aging, the optimizer table and the refusals.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import parametrize

import spectral_cli.transform.optimizer as optmath
from spectral_cli import SpectralError, SpectralParametrization, to_spectral
from spectral_cli.transform.kernels import spectral_shape
from spectral_cli.transform.optimizer import (
    convert_state,
    gradient_to_spatial,
    gradient_to_spectral,
    param_to_spatial,
    param_to_spectral,
    reage_factor,
    second_moment_to_spatial,
    second_moment_to_spectral,
)

BASES = ("rfft", "rdft")
#: (weight shape, kernel size): conv and transposed-conv layouts (the lead dims are only a shape here), 1-D to
#: 3-D, odd, even and rectangular kernels, and 24x24 (576 taps: the separable method's FFTs)
SHAPES = [
    ((4, 3, 5), (5,)),
    ((2, 3, 6), (6,)),
    ((5, 2, 3, 3), (3, 3)),
    ((3, 4, 4, 4), (4, 4)),  # e.g. a ConvTranspose2d(3, 4, 4): (in, out, kh, kw)
    ((2, 2, 2, 5), (2, 5)),
    ((2, 3, 5, 4), (5, 4)),
    ((2, 1, 3, 2, 4), (3, 2, 4)),
    ((2, 2, 3, 3, 3), (3, 3, 3)),
    ((2, 1, 24, 24), (24, 24)),
]
IDS = [f"{'x'.join(map(str, ks))}-{'x'.join(map(str, s))}" for s, ks in SHAPES]


def synthesis(ks: tuple[int, ...], basis: str) -> SpectralParametrization:
    return SpectralParametrization(ks, basis).double()  # type: ignore[arg-type]


def vjp(g: torch.Tensor, ks: tuple[int, ...], basis: str) -> torch.Tensor:
    """Autograd's gradient with respect to the stored tensor of a loss whose gradient in the weight is ``g``."""
    p = synthesis(ks, basis)
    c = to_spectral(torch.randn(g.shape, dtype=torch.float64), ks, basis).requires_grad_()  # type: ignore[arg-type]
    (grad,) = torch.autograd.grad(p(c), c, g)
    return grad


def jacobian(ks: tuple[int, ...], basis: str) -> torch.Tensor:
    """``J[f, s] = ∂W_s / ∂c_f`` of the synthesis of one kernel, from autograd (stored entries x taps)."""
    p = synthesis(ks, basis)
    shape = spectral_shape((1, *ks), ks, basis)  # type: ignore[arg-type]
    c = torch.zeros(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: p(x).reshape(-1), c)  # (taps, *shape)
    return jac.reshape(math.prod(ks), -1).T


def flat_spectral(x: torch.Tensor) -> torch.Tensor:
    """One kernel's stored tensor ``(1, *kernel)`` or ``(2, 1, *kernel)`` as the flat vector of ``jacobian``'s rows."""
    return x.reshape(-1)


# ------------------------------------------------------------------------------------------------ linear state


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize(("shape", "ks"), SHAPES, ids=IDS)
def test_linear_state_is_autograds_vector_jacobian_product(
    shape: tuple[int, ...], ks: tuple[int, ...], basis: str
) -> None:
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    ours = gradient_to_spectral(g, ks, basis)  # type: ignore[arg-type]
    expected = vjp(g, ks, basis)
    assert ours.shape == expected.shape and ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize(("shape", "ks"), SHAPES, ids=IDS)
def test_bake_inverts_convert_on_gradient_states(shape: tuple[int, ...], ks: tuple[int, ...], basis: str) -> None:
    torch.manual_seed(1)
    g = torch.randn(shape, dtype=torch.float64)
    back = gradient_to_spatial(vjp(g, ks, basis), ks, basis)  # type: ignore[arg-type]
    torch.testing.assert_close(back, g, rtol=0, atol=1e-12)
    x = torch.randn(shape, dtype=torch.float64)  # parameter-like: the weight's own map
    torch.testing.assert_close(param_to_spatial(param_to_spectral(x, ks, basis), ks, basis), x, rtol=0, atol=1e-12)  # type: ignore[arg-type]


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("ks", [(3, 3), (4,), (2, 3, 4), (4, 4)])
def test_bake_is_the_pseudo_inverse_of_the_adjoint(ks: tuple[int, ...], basis: str) -> None:
    """Any stored tensor, also one outside the range of Sᵀ (rfft's redundant entries set): the result is
    pinv(Jᵀ) applied, i.e. the part no kernel reaches is ignored."""
    torch.manual_seed(2)
    jac = jacobian(ks, basis)
    shape = spectral_shape((1, *ks), ks, basis)  # type: ignore[arg-type]
    y = torch.randn(shape, dtype=torch.float64)
    expected = torch.linalg.pinv(jac) @ flat_spectral(y)
    ours = gradient_to_spatial(y, ks, basis)  # type: ignore[arg-type]
    torch.testing.assert_close(ours.reshape(-1), expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ trajectories


def _trajectory(make: type[torch.optim.Optimizer], kwargs: dict[str, object], basis: str, steps: int = 7) -> None:
    torch.manual_seed(3)
    ks = (3, 3)
    conv = torch.nn.Conv2d(2, 3, ks, bias=False).double()
    spatial = torch.nn.Parameter(conv.weight.detach().clone())
    parametrize.register_parametrization(conv, "weight", SpectralParametrization(ks, basis), unsafe=True)  # type: ignore[arg-type]
    stored = conv.parametrizations.weight.original
    opt_w = make([spatial], **kwargs)  # type: ignore[call-arg]
    opt_c = make([stored], **kwargs)  # type: ignore[call-arg]
    for _ in range(steps):
        g = torch.randn_like(spatial)  # the same spatial gradient for both
        spatial.grad = g.clone()
        (stored.grad,) = torch.autograd.grad(conv.weight, stored, g)
        opt_w.step()
        opt_c.step()
    name = type(opt_w).__name__
    converted = convert_state(opt_w.state[spatial], name, ks, basis, "to_spectral")  # type: ignore[arg-type]
    assert converted.state is not None
    own = opt_c.state[stored]
    exact = [k for k, kind in optmath.KEYS[name].items() if kind == "gradient"]
    assert exact and all(k in own for k in exact)
    for key in exact:
        torch.testing.assert_close(converted.state[key], own[key], rtol=0, atol=1e-12)
    if "step" in own:
        assert float(converted.state["step"]) == float(own["step"]) == steps
    # and back: bake gives the spatial optimizer's state
    baked = convert_state(own, name, ks, basis, "to_spatial")  # type: ignore[arg-type]
    assert baked.state is not None
    for key in exact:
        torch.testing.assert_close(baked.state[key], opt_w.state[spatial][key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize(
    ("make", "kwargs"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "dampening": 0.0}),
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
        (torch.optim.NAdam, {"lr": 1e-2}),
        (torch.optim.RMSprop, {"lr": 1e-2, "centered": True}),
    ],
    ids=["sgd", "sgd-nesterov", "adam", "adamw-amsgrad", "nadam", "rmsprop-centered"],
)
def test_linear_state_along_a_trajectory(
    make: type[torch.optim.Optimizer], kwargs: dict[str, object], basis: str
) -> None:
    _trajectory(make, kwargs, basis)


# ----------------------------------------------------------------------------------------------- second moments


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("ks", [(3, 3), (5,), (2, 3, 4), (4, 4), (1, 5)])
def test_second_moment_maps_against_the_jacobian(ks: tuple[int, ...], basis: str) -> None:
    """Diagonal: E[(Jg)²] for independent taps of variances v (Σ J² v); correlated: (Σ |J| √v)², which bounds
    the true second moment of any gradients whose per-tap second moment is v (Minkowski)."""
    torch.manual_seed(4)
    jac = jacobian(ks, basis)
    grads = torch.randn(4000, *ks, dtype=torch.float64) @ torch.randn(ks[-1], ks[-1], dtype=torch.float64)
    grads = grads + 0.5 * grads.roll(1, dims=1)  # correlated neighbours
    v = (grads**2).mean(0)
    diag = second_moment_to_spectral(v[None], ks, basis, "diagonal")  # type: ignore[arg-type]
    corr = second_moment_to_spectral(v[None], ks, basis, "correlated")  # type: ignore[arg-type]
    torch.testing.assert_close(flat_spectral(diag), (jac**2) @ v.reshape(-1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat_spectral(corr), (jac.abs() @ v.reshape(-1).sqrt()) ** 2, rtol=1e-12, atol=1e-14)
    true = ((grads.reshape(len(grads), -1) @ jac.T) ** 2).mean(0)
    assert bool((true <= flat_spectral(corr) * (1 + 1e-12) + 1e-14).all())
    assert bool((diag >= 0).all()) and bool((corr >= diag * (1 - 1e-12)).all())
    # uncorrelated taps: the diagonal map is their exact second moment
    independent = torch.randn(20000, math.prod(ks), dtype=torch.float64) * v.reshape(-1).sqrt()
    sampled = ((independent @ jac.T) ** 2).mean(0)
    torch.testing.assert_close(sampled, flat_spectral(diag), rtol=0.1, atol=0.02 * float(diag.max()))


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("ks", [(1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("option", ["diagonal", "correlated"])
def test_second_moment_is_exact_where_the_synthesis_is_a_permutation(
    ks: tuple[int, ...], basis: str, option: str
) -> None:
    torch.manual_seed(5)
    grads = torch.randn(64, 3, 2, *ks, dtype=torch.float64)
    v = (grads**2).mean(0)
    true = (torch.stack([vjp(g, ks, basis) for g in grads]) ** 2).mean(0)
    ours = second_moment_to_spectral(v, ks, basis, option)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, true, rtol=1e-12, atol=0)
    torch.testing.assert_close(second_moment_to_spatial(ours, ks, basis, option), v, rtol=1e-12, atol=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("option", ["diagonal", "correlated"])
def test_second_moment_to_spatial_is_the_same_approximation_through_the_pseudo_inverse(basis: str, option: str) -> None:
    torch.manual_seed(6)
    ks = (3, 4)
    pinv = torch.linalg.pinv(jacobian(ks, basis))  # taps x stored
    shape = spectral_shape((1, *ks), ks, basis)  # type: ignore[arg-type]
    v_c = torch.rand(shape, dtype=torch.float64)
    ours = second_moment_to_spatial(v_c, ks, basis, option).reshape(-1)  # type: ignore[arg-type]
    flat = flat_spectral(v_c)
    expected = (pinv**2) @ flat if option == "diagonal" else (pinv.abs() @ flat.sqrt()) ** 2
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    assert bool((ours >= 0).all())


@pytest.mark.parametrize("basis", BASES)
def test_split_is_exact_when_the_gradient_does_not_vary(basis: str) -> None:
    """Adam fed one constant gradient: its second moment is all mean (v̂ = m̂²), which ``split`` converts
    exactly; the spectral optimizer fed the adjoint of the same gradient holds that state. The diagonal map
    does not (the taps are fully correlated)."""
    torch.manual_seed(12)
    ks, steps, betas = (3, 3), 5, (0.9, 0.999)
    g = torch.randn(2, 3, *ks, dtype=torch.float64)
    spatial = torch.nn.Parameter(torch.zeros_like(g))
    g_c = vjp(g, ks, basis)
    stored = torch.nn.Parameter(torch.zeros_like(g_c))
    opt_w, opt_c = torch.optim.Adam([spatial], betas=betas), torch.optim.Adam([stored], betas=betas)
    for _ in range(steps):
        spatial.grad, stored.grad = g.clone(), g_c.clone()
        opt_w.step()
        opt_c.step()
    own = opt_c.state[stored]["exp_avg_sq"]
    split = convert_state(opt_w.state[spatial], "Adam", ks, basis, "to_spectral", second_moment="split", betas=betas)  # type: ignore[arg-type]
    diagonal = convert_state(opt_w.state[spatial], "Adam", ks, basis, "to_spectral", second_moment="diagonal")  # type: ignore[arg-type]
    assert split.state is not None and diagonal.state is not None
    # v and m̂² agree to the bias corrections' rounding; the leftover variance is of that order
    torch.testing.assert_close(split.state["exp_avg_sq"], own, rtol=1e-9, atol=1e-12 * float(own.max()))
    assert not torch.allclose(diagonal.state["exp_avg_sq"], own, rtol=1e-3)
    back = convert_state(opt_c.state[stored], "Adam", ks, basis, "to_spatial", second_moment="split", betas=betas)  # type: ignore[arg-type]
    assert back.state is not None
    torch.testing.assert_close(back.state["exp_avg_sq"], opt_w.state[spatial]["exp_avg_sq"], rtol=1e-9, atol=1e-14)
    # without a first moment (Adagrad) split is the diagonal map
    v = g * g
    adagrad = convert_state(
        {"step": torch.tensor(3.0), "sum": v}, "Adagrad", ks, basis, "to_spectral", second_moment="split"
    )  # type: ignore[arg-type]
    assert adagrad.state is not None
    torch.testing.assert_close(adagrad.state["sum"], second_moment_to_spectral(v, ks, basis, "diagonal"))  # type: ignore[arg-type]


@pytest.mark.parametrize("basis", BASES)
def test_large_kernels_are_built_block_by_block(basis: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rfft matrix of a large kernel is built in blocks of bins (its whole would grow as taps²); rdft axis by
    axis. Forced to small blocks, the results equal those of the whole matrix."""
    torch.manual_seed(7)
    ks = (6, 7)
    v = torch.rand(2, 3, *ks, dtype=torch.float64)
    whole = {o: second_moment_to_spectral(v, ks, basis, o) for o in ("diagonal", "correlated")}  # type: ignore[arg-type]
    back = {o: second_moment_to_spatial(whole[o], ks, basis, o) for o in ("diagonal", "correlated")}  # type: ignore[arg-type]
    monkeypatch.setattr(optmath, "_BLOCK_NUMBERS", 2 * 42 * 5)  # 5 bins a block
    for o in ("diagonal", "correlated"):
        torch.testing.assert_close(second_moment_to_spectral(v, ks, basis, o), whole[o], rtol=1e-13, atol=0)  # type: ignore[arg-type]
        torch.testing.assert_close(second_moment_to_spatial(whole[o], ks, basis, o), back[o], rtol=1e-13, atol=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 2**-7), (torch.float16, 2**-10)], ids=str
)
def test_dtypes_are_kept_and_computed_in_float64(basis: str, dtype: torch.dtype, rtol: float) -> None:
    torch.manual_seed(8)
    ks = (3, 3)
    m64 = torch.randn(4, 2, *ks, dtype=torch.float64)
    v64 = m64**2
    for fn, x in ((gradient_to_spectral, m64), (second_moment_to_spectral, v64)):
        ours = fn(x.to(dtype), ks, basis)  # type: ignore[operator]
        assert ours.dtype == dtype
        expected = fn(x.to(dtype).to(torch.float64), ks, basis)  # type: ignore[operator]
        torch.testing.assert_close(ours.to(torch.float64), expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def test_a_float16_bound_past_the_largest_float16_is_clamped() -> None:
    v = torch.full((1, 1, 5, 5), 60000.0, dtype=torch.float16)
    out = second_moment_to_spectral(v, (5, 5), "rfft", "correlated")
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
    assert float(out.max()) == torch.finfo(torch.float16).max


# ------------------------------------------------------------------------------------------ whole states, table


def test_reaging_keeps_the_bias_corrected_estimates() -> None:
    torch.manual_seed(9)
    ks, t, s, (b1, b2) = (3, 3), 300, 10, (0.8, 0.99)
    state = {
        "step": torch.tensor(float(t)),
        "exp_avg": torch.randn(2, 2, *ks),
        "exp_avg_sq": torch.rand(2, 2, *ks),
        "max_exp_avg_sq": torch.rand(2, 2, *ks) + 1,
    }
    plain = convert_state(state, "Adam", ks, "rdft", "to_spectral", betas=(b1, b2))
    aged = convert_state(state, "Adam", ks, "rdft", "to_spectral", reage_to=s, betas=(b1, b2))
    assert plain.state is not None and aged.state is not None and aged.reaged == s and plain.reaged is None
    assert aged.state["step"].dtype == state["step"].dtype and float(aged.state["step"]) == s
    assert float(state["step"]) == t  # the input is not modified
    torch.testing.assert_close(aged.state["exp_avg"] / (1 - b1**s), plain.state["exp_avg"] / (1 - b1**t))
    for key in ("exp_avg_sq", "max_exp_avg_sq"):
        torch.testing.assert_close(aged.state[key] / (1 - b2**s), plain.state[key] / (1 - b2**t))
    assert reage_factor(0.999, 300, 10) == pytest.approx((1 - 0.999**10) / (1 - 0.999**300))
    younger = convert_state({**state, "step": torch.tensor(5.0)}, "Adam", ks, "rdft", "to_spectral", reage_to=s)
    assert younger.reaged is None and younger.state is not None and float(younger.state["step"]) == 5
    sgd = convert_state({"momentum_buffer": torch.randn(2, 2, *ks)}, "SGD", ks, "rfft", "to_spectral", reage_to=s)
    assert sgd.reaged is None and sgd.notes and "not re-aged" in sgd.notes[0]


def test_a_converted_adam_state_loads_into_torch_and_steps() -> None:
    """What the caller does with the result: a registered conv's optimizer takes the converted state."""
    torch.manual_seed(10)
    conv = torch.nn.Conv2d(3, 4, 5, padding=2)
    opt = torch.optim.Adam(conv.parameters(), lr=1e-3, amsgrad=True)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    spatial_state = opt.state[conv.weight]
    parametrize.register_parametrization(conv, "weight", SpectralParametrization((5, 5)), unsafe=True)
    stored = conv.parametrizations.weight.original
    new = torch.optim.Adam([stored, conv.bias], lr=1e-3, amsgrad=True)
    converted = convert_state(spatial_state, "Adam", (5, 5), "rfft", "to_spectral")
    assert converted.state is not None and set(converted.approximated) == {"exp_avg_sq", "max_exp_avg_sq"}
    new.state[stored] = converted.state
    new.state[conv.bias] = opt.state[conv.bias]
    new.load_state_dict(new.state_dict())  # the round trip through a state dict the lead's plumbing takes
    new.zero_grad()
    conv(x).square().mean().backward()
    new.step()
    assert float(new.state[stored]["step"]) == 4 and new.state[stored]["exp_avg"].shape == stored.shape


@pytest.mark.parametrize("name", ["Rprop", "LBFGS", "Adafactor", "Muon"])
def test_optimizers_whose_state_is_dropped_say_why(name: str) -> None:
    out = convert_state({"step": torch.tensor(1.0)}, name, (3, 3), "rfft", "to_spectral")
    assert out.state is None and out.reason and name in out.reason


def test_every_torch_optimizer_is_classified() -> None:
    """A torch release that adds an optimizer fails here until the table says how its state maps."""
    names = {n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type) and n != "Optimizer"}
    names = {n for n in names if issubclass(getattr(torch.optim, n), torch.optim.Optimizer)}
    assert names == set(optmath.KEYS) | set(optmath.DROPPED)


@pytest.mark.parametrize(
    ("make", "kwargs"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
        (torch.optim.NAdam, {"lr": 1e-2}),
        (torch.optim.RAdam, {"lr": 1e-2}),
        (torch.optim.Adamax, {"lr": 1e-2}),
        (torch.optim.Adagrad, {"lr": 1e-2}),
        (torch.optim.RMSprop, {"lr": 1e-2, "momentum": 0.9, "centered": True}),
        (torch.optim.Adadelta, {"lr": 1.0}),
        (torch.optim.ASGD, {"lr": 1e-2}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
@pytest.mark.parametrize("basis", BASES)
def test_the_real_state_keys_of_each_optimizer_convert_and_step(
    make: type[torch.optim.Optimizer], kwargs: dict[str, object], basis: str
) -> None:
    """Every key a torch optimizer really writes is in the table; baked back, the converted state's linear and
    carried keys are the spatial ones; the spectral optimizer steps on the converted state."""
    torch.manual_seed(11)
    ks = (3, 3)
    conv = torch.nn.Conv2d(2, 3, ks, bias=False)
    opt = make(conv.parameters(), **kwargs)  # type: ignore[call-arg]
    x = torch.randn(2, 2, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    name = type(opt).__name__
    state = opt.state[conv.weight]
    assert set(state) <= set(optmath.KEYS[name])
    converted = convert_state(state, name, ks, basis, "to_spectral")  # type: ignore[arg-type]
    assert converted.state is not None and set(converted.state) == set(state)
    baked = convert_state(converted.state, name, ks, basis, "to_spatial")  # type: ignore[arg-type]
    assert baked.state is not None
    for key, kind in optmath.KEYS[name].items():
        if key in state and kind in ("gradient", "param", "carried"):
            torch.testing.assert_close(baked.state[key], state[key], rtol=1e-5, atol=1e-6)
    parametrize.register_parametrization(conv, "weight", SpectralParametrization(ks, basis), unsafe=True)  # type: ignore[arg-type]
    stored = conv.parametrizations.weight.original
    new = make([stored], **kwargs)  # type: ignore[call-arg]
    new.state[stored] = converted.state
    new.zero_grad()
    conv(x).square().mean().backward()
    new.step()
    assert all(bool(torch.isfinite(t).all()) for t in new.state[stored].values() if isinstance(t, torch.Tensor))


def test_refusals() -> None:
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(SpectralError, match="does not end in"):
        gradient_to_spectral(w, (5, 5), "rfft")
    with pytest.raises(SpectralError, match="unknown second-moment"):
        second_moment_to_spectral(w.abs(), (3, 3), "rfft", "exact")
    with pytest.raises(SpectralError, match="kernel size"):
        convert_state({"exp_avg": w}, "Adam", (5, 5), "rfft", "to_spectral")
    with pytest.raises(SpectralError, match="rfft"):
        convert_state({"exp_avg": w}, "Adam", (3, 3), "rfft", "to_spatial")  # a spatial state is not an rfft one
    unknown = convert_state({"exp_avg": w}, "Lion", (3, 3), "rfft", "to_spectral")
    assert unknown.state is None and unknown.reason and "Lion" in unknown.reason and "Adam" in unknown.reason
    odd = convert_state({"exp_avg": w, "ema": w}, "Adam", (3, 3), "rfft", "to_spectral")
    assert odd.state is None and odd.reason and "ema" in odd.reason
    assert convert_state({}, "Adam", (3, 3), "rfft", "to_spectral").state == {}
