"""Optimizer state of one conv weight, mapped between the spatial kernel's coordinates and the stored spectral
tensor's (pure math on tensors: no state dicts, no I/O).

The synthesis is linear, ``W = S(c)`` (:func:`~spectral_cli.transform.bases.to_spatial`), so a gradient maps by
the adjoint, ``g_c = Sᵀ g_W``. Along one trajectory anything linear in past gradients converts exactly; averages
of squares do not (``E[(Sᵀg)²]`` needs the gradients' covariance, which no checkpoint holds). ``bake`` goes the
other way through the Moore-Penrose pseudo-inverse of ``Sᵀ``: the identity's inverse for ``rdft``
(orthonormal); for ``rfft`` the stored entries that no kernel reaches (imaginary parts of self-conjugate
frequencies, and the antisymmetric half of the conjugate pairs the last axis keeps twice) are ignored, and every
state built from gradients has none there.

In matrix terms, with the rows of :mod:`~spectral_cli.transform.matrices` (``spatial = spectral @ Syn``) and
``w`` the Hermitian weight of an ``rfft`` bin (1 for bins on the self-conjugate planes of the halved axis, 2
for the others; 1 everywhere for ``rdft``):

=========================  ==========================================  =============================================
kind                       to spectral (convert)                       to spatial (bake)
=========================  ==========================================  =============================================
gradient-like (exact)      ``Sᵀ g = to_spectral(g) * w``               ``to_spatial(g_c / w)``
parameter-like (exact)     ``to_spectral(x)``                          ``to_spatial(x_c)``
second moment, diagonal    ``v @ (Syn∘Syn)ᵀ``                          ``(v_c / w²) @ (Syn∘Syn)``
second moment, correlated  ``(√v @ |Syn|ᵀ)²``                          ``((√v_c / w) @ |Syn|)²``
=========================  ==========================================  =============================================

The diagonal map is exact when the gradients of a kernel's taps are uncorrelated; the correlated one when they
are fully correlated (and then an upper bound: ``|Sᵀg| <= |S|ᵀ|g|``). ``split`` (Adam family, in
:func:`convert_state`) writes ``v̂ = m̂² + (v̂ - m̂²)``: the first moment's part converts exactly (``m`` does), the
rest by the diagonal map; it is exact for a gradient that does not vary, and the diagonal map where the
state has no first moment. Both are non-negative and equal where
``S`` is a signed permutation (a 1-tap axis, the ``rdft`` of 1x2). Second moments of parameter displacements
(Adadelta's ``acc_delta``) use the parameter map's squares (``Syn∘Syn`` divided by ``w²``, ``|Syn|`` by ``w``).

Re-aging (:func:`reage_factor`): PyTorch's Adam bias-corrects with its step count ``t``:
``m̂ = m / (1 - β₁ᵗ)``, ``v̂ = v / (1 - β₂ᵗ)``. Setting the step to ``s < t`` and scaling ``m`` by
``(1 - β₁ˢ) / (1 - β₁ᵗ)`` and ``v`` (and ``max_exp_avg_sq``) by ``(1 - β₂ˢ) / (1 - β₂ᵗ)`` keeps both estimates
and the next step's size, while the new gradients then weigh as if only ``s`` steps had passed: an
approximated ``v`` is replaced by the new coordinates' own statistics within about ``s`` steps instead of
``1 / (1 - β₂)`` (1000).

Every torch optimizer (torch 2.14), by per-parameter state key. A parameter's state is converted whole or
dropped whole (torch optimizers initialize a parameter's state only when it is empty):

==========  ==============================================================  ======================================
optimizer   state keys: how they map                                        notes
==========  ==============================================================  ======================================
SGD         ``momentum_buffer``: exact (gradient-like)                      Nesterov too; weight decay adds
                                                                            ``λc`` to the gradient (exact: ``c``
                                                                            is the parameter)
Adam,       ``exp_avg``: exact; ``exp_avg_sq``, ``max_exp_avg_sq``:         re-aging supported
AdamW,      approximated (second moment); ``step``: carried
SparseAdam
NAdam       as Adam, ``mu_product``: carried                                re-aging not applied (``mu_product``
                                                                            is a product over the past steps)
RAdam       as Adam                                                         re-aging not applied (its rectifier
                                                                            restarts below step 6)
Adamax      ``exp_avg``: exact; ``exp_inf`` (a decayed max of ``|g|``, not  re-aging not applied
            linear): approximated as the square root of a second moment
Adagrad     ``sum`` (of squares, no decay): approximated (second moment)
RMSprop     ``square_avg``: approximated; ``grad_avg`` (centered): exact;   ``momentum_buffer`` is a step in
            ``momentum_buffer``: approximated (parameter-like)              weight space: the next step is kept
Adadelta    ``square_avg``: approximated; ``acc_delta``: approximated
            (second moment of parameter displacements)
ASGD        ``ax`` (the averaged parameter): exact (parameter-like);
            ``eta``, ``mu``, ``step``: carried
Rprop       dropped: ``step_size`` adapts each coordinate by the signs of
            its successive gradients, which have no counterpart in
            other coordinates
LBFGS       dropped: its history is of flat vectors over all parameters,
            not per parameter
Adafactor   dropped: factored row and column variances, not per element
Muon        dropped: takes 2-D parameters only (a conv weight is not)
==========  ==============================================================  ======================================

An optimizer not in this table is dropped with :data:`UNKNOWN_REASON`.

Example:
    >>> import torch
    >>> m = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    >>> m_c = gradient_to_spectral(m, (5, 5), "rfft")
    >>> tuple(m_c.shape)
    (2, 4, 3, 5, 3)
    >>> torch.allclose(gradient_to_spatial(m_c, (5, 5), "rfft"), m)
    True
    >>> v = m * m
    >>> bool((second_moment_to_spectral(v, (5, 5), "rfft", "correlated") >= 0).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import SpectralError
from .bases import check_spectral, to_spatial, to_spectral
from .kernels import Basis, check_basis, check_kernel_size, spectral_kernel_shape, spectral_shape
from .matrices import matrices

__all__ = [
    "DEFAULT_REAGE",
    "DEFAULT_SECOND_MOMENT",
    "DROPPED",
    "KEYS",
    "REAGEABLE",
    "SECOND_MOMENTS",
    "UNKNOWN_REASON",
    "Converted",
    "convert_state",
    "gradient_to_spatial",
    "gradient_to_spectral",
    "param_to_spatial",
    "param_to_spectral",
    "reage_factor",
    "second_moment_to_spatial",
    "second_moment_to_spectral",
    "stored_shape",
]

#: approximations of a second moment in new coordinates (see the module docstring)
SecondMoment = Literal["diagonal", "correlated", "split"]
SECOND_MOMENTS: tuple[str, ...] = ("diagonal", "correlated", "split")
Direction = Literal["to_spectral", "to_spatial"]

#: the defaults docs/resume.md chose for convert: the diagonal map of Adam's second moment, the converted weights'
#: states re-aged to 10 steps (no dip on any seed of the benchmark, most of the spectral gain; dropping the state
#: gains more by +300 steps but collapses the network first)
DEFAULT_SECOND_MOMENT = "diagonal"
DEFAULT_REAGE = 10

#: how a state key maps: ``gradient`` (linear in gradients, exact), ``param`` (a point or step in weight space,
#: exact), ``displacement`` (a preconditioned step in weight space: mapped as a parameter, approximated),
#: ``second`` (an average of squared gradients), ``second_param`` (of squared displacements), ``inf`` (a
#: decayed max of |g|: the square root of a second moment), ``carried`` (scalars, unchanged)
Kind = Literal["gradient", "param", "displacement", "second", "second_param", "inf", "carried"]

_ADAM: dict[str, Kind] = {"step": "carried", "exp_avg": "gradient", "exp_avg_sq": "second",
                          "max_exp_avg_sq": "second"}  # fmt: skip

#: the per-parameter state keys of each torch optimizer whose state converts, and how each maps
KEYS: dict[str, dict[str, Kind]] = {
    "SGD": {"momentum_buffer": "gradient"},
    "Adam": _ADAM,
    "AdamW": _ADAM,
    "SparseAdam": _ADAM,
    "NAdam": {**_ADAM, "mu_product": "carried"},
    "RAdam": _ADAM,
    "Adamax": {"step": "carried", "exp_avg": "gradient", "exp_inf": "inf"},
    "Adagrad": {"step": "carried", "sum": "second"},
    "RMSprop": {"step": "carried", "square_avg": "second", "grad_avg": "gradient", "momentum_buffer": "displacement"},
    "Adadelta": {"step": "carried", "square_avg": "second", "acc_delta": "second_param"},
    "ASGD": {"step": "carried", "eta": "carried", "mu": "carried", "ax": "param"},
}

#: optimizers whose per-parameter state is dropped, and why
DROPPED: dict[str, str] = {
    "Rprop": "Rprop's step_size adapts each coordinate by the signs of its successive gradients, which have no "
    "counterpart in other coordinates",
    "LBFGS": "LBFGS keeps a history of flat vectors over all parameters, not a state per parameter",
    "Adafactor": "Adafactor's second moment is factored (row and column variances), not per element",
    "Muon": "Muon takes 2-D parameters only; a conv weight is not one",
}
UNKNOWN_REASON = "its state keys are not known to spectral_cli (known: {known})"

#: optimizers whose state may be re-aged (bias correction by (1 - β^t) on both moments, nothing else by step)
REAGEABLE = frozenset({"Adam", "AdamW"})

_EXACT: frozenset[str] = frozenset({"gradient", "param", "carried"})


# ------------------------------------------------------------------------------------------ the maps themselves


def _hermitian_weight(ks: tuple[int, ...], basis: Basis, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``w`` of every stored bin (shape ``spectral_kernel_shape``): how many times irfft counts it."""
    shape = spectral_kernel_shape(ks, basis)
    if basis == "rdft":
        return torch.ones(shape, dtype=dtype, device=device)
    last = torch.arange(shape[-1], device=device)
    n = ks[-1]
    self_conjugate = (last == 0) | ((n % 2 == 0) & (last == n // 2))
    return torch.where(self_conjugate, 1.0, 2.0).to(dtype).expand(shape)


def _work(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        raise SpectralError(f"optimizer state must be a floating-point tensor, got {t.dtype}")
    return t.to(torch.float64)


def _back(t: torch.Tensor, like: torch.Tensor, *, clamp: bool = False) -> torch.Tensor:
    """``t`` in ``like``'s dtype; a non-negative state clamped to that dtype's largest finite number (a bound
    on a float16 second moment may exceed it)."""
    if clamp and like.dtype != torch.float64:
        t = t.clamp(max=torch.finfo(like.dtype).max)
    return t.to(like.dtype)


def _check_spatial(t: torch.Tensor, ks: tuple[int, ...]) -> None:
    if t.dim() < len(ks) or tuple(t.shape[t.dim() - len(ks) :]) != ks:
        raise SpectralError(f"optimizer state of shape {tuple(t.shape)} does not end in the kernel size {ks}")


def gradient_to_spectral(g: torch.Tensor, kernel_size: Sequence[int], basis: Basis) -> torch.Tensor:
    """``Sᵀ g``: a gradient-like state of a spatial weight (SGD's ``momentum_buffer``, Adam's ``exp_avg``) in the
    coordinates of the stored spectral tensor, exactly (autograd's vector-Jacobian product of the synthesis).
    Computed in float64, returned in ``g.dtype``."""
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    _check_spatial(g, ks)
    x = to_spectral(_work(g), ks, basis)
    return _back(x * _hermitian_weight(ks, basis, x.dtype, x.device), g)


def gradient_to_spatial(g_c: torch.Tensor, kernel_size: Sequence[int], basis: Basis) -> torch.Tensor:
    """The inverse of :func:`gradient_to_spectral` on every state built from gradients (the pseudo-inverse of
    ``Sᵀ``: an ``rfft`` tensor's entries that no kernel reaches are ignored). Returned in ``g_c.dtype``."""
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    check_spectral(g_c, ks, basis)
    x = _work(g_c)
    return _back(to_spatial(x / _hermitian_weight(ks, basis, x.dtype, x.device), ks, basis), g_c)


def param_to_spectral(x: torch.Tensor, kernel_size: Sequence[int], basis: Basis) -> torch.Tensor:
    """A parameter-like state (ASGD's ``ax``) mapped as the weight itself is (``right_inverse``)."""
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    _check_spatial(x, ks)
    return _back(to_spectral(_work(x), ks, basis), x)


def param_to_spatial(x_c: torch.Tensor, kernel_size: Sequence[int], basis: Basis) -> torch.Tensor:
    """A parameter-like state mapped back as the stored tensor is (the synthesis)."""
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    check_spectral(x_c, ks, basis)
    return _back(to_spatial(_work(x_c), ks, basis), x_c)


#: float64 numbers of one block of rfft synthesis rows at most (the blocks of a large kernel are built in turn)
_BLOCK_NUMBERS = 1 << 22


def _rfft_blocks(ks: tuple[int, ...], device: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(lo, hi, Syn[:, lo:hi])`` over the bins: the library's cached matrix for small kernels, the same closed
    form built block by block for large ones (the whole matrix grows as taps²)."""
    n = math.prod(ks)
    half = spectral_kernel_shape(ks, "rfft")
    bins = math.prod(half)
    if 2 * bins * n <= _BLOCK_NUMBERS:
        yield 0, bins, matrices("rfft", ks, torch.float64, device).synthesis
        return
    taps = torch.cartesian_prod(*[torch.arange(m, dtype=torch.float64, device=device) for m in ks])
    taps = taps.reshape(-1, len(ks)) * torch.tensor([2 * math.pi / m for m in ks], dtype=torch.float64, device=device)
    weight = _hermitian_weight(ks, "rfft", torch.float64, device).reshape(-1)
    step = max(1, _BLOCK_NUMBERS // (2 * n))
    for lo in range(0, bins, step):
        hi = min(bins, lo + step)
        index = torch.arange(lo, hi, device=device)
        freq = []
        for m in reversed(half):  # row-major unravel of the bin index
            freq.append(index % m)
            index = index // m
        f = torch.stack(freq[::-1], dim=1).to(torch.float64)
        theta = f @ taps.T
        norm = 1.0 / math.sqrt(n)
        cos, sin = (torch.where(v.abs() < 1e-12, 0.0, v) * norm for v in (torch.cos(theta), torch.sin(theta)))
        w = weight[lo:hi, None]
        yield lo, hi, torch.stack((cos * w, -sin * w))


def _rdft_axis(n: int, device: torch.device) -> torch.Tensor:
    return matrices("rdft", (n,), torch.float64, device).synthesis  # rows: frequencies, columns: taps


def _square_map(
    x: torch.Tensor, ks: tuple[int, ...], basis: Basis, direction: Direction, absolute: bool
) -> torch.Tensor:
    """``x @ Kᵀ`` (to spectral) or ``x @ K`` (to spatial) with ``K = |Syn|`` or ``Syn∘Syn``, in float64."""

    def entry(m: torch.Tensor) -> torch.Tensor:
        return m.abs() if absolute else m * m

    k = len(ks)
    if basis == "rdft":  # Syn is a Kronecker product: so are |Syn| and Syn∘Syn, applied axis by axis
        out = x
        for axis, n in enumerate(ks):
            m = entry(_rdft_axis(n, x.device))
            dim = x.dim() - k + axis
            moved = out.movedim(dim, -1)
            moved = moved @ (m.T if direction == "to_spectral" else m)
            out = moved.movedim(-1, dim)
        return out.contiguous()
    n = math.prod(ks)
    half = spectral_kernel_shape(ks, "rfft")
    if direction == "to_spectral":
        lead = x.shape[: x.dim() - k]
        rows = x.reshape(-1, n)
        result = rows.new_empty(2, rows.shape[0], math.prod(half))
        for lo, hi, block in _rfft_blocks(ks, x.device):
            result[:, :, lo:hi] = rows @ entry(block).mT
        return result.reshape(2, *lead, *half)
    lead = x.shape[1 : x.dim() - k]
    planes = x.reshape(2, -1, math.prod(half))
    total = planes.new_zeros(planes.shape[1], n)
    for lo, hi, block in _rfft_blocks(ks, x.device):
        b = entry(block)
        total += planes[0, :, lo:hi] @ b[0] + planes[1, :, lo:hi] @ b[1]
    return total.reshape(*lead, *ks)


def _second(
    v: torch.Tensor,
    ks: tuple[int, ...],
    basis: Basis,
    direction: Direction,
    option: str,
    *,
    param_like: bool = False,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    if option not in SECOND_MOMENTS:
        raise SpectralError(f"unknown second-moment approximation {option!r}: use one of "
                            f"{', '.join(repr(s) for s in SECOND_MOMENTS)}")  # fmt: skip
    if option == "split":
        if mean is None or param_like:
            option = "diagonal"  # no first moment to split off: the diagonal map of the whole
        else:
            mu = _work(mean)
            rest = (_work(v) - mu * mu).clamp(min=0)
            mapped = (gradient_to_spectral if direction == "to_spectral" else gradient_to_spatial)(mu, ks, basis)
            out = _second(rest, ks, basis, direction, "diagonal") + mapped * mapped
            return _back(out, v, clamp=True)
    correlated = option == "correlated"
    x = _work(v).clamp(min=0)  # a second moment is non-negative; rounding may leave -0.0
    if correlated:
        x = x.sqrt()
    power = 1 if correlated else 2
    w = _hermitian_weight(ks, basis, torch.float64, x.device)
    if direction == "to_spatial" and not param_like:
        x = x / w**power
    out = _square_map(x, ks, basis, direction, correlated)
    if direction == "to_spectral" and param_like:
        out = out / w**power
    if correlated:
        out = out * out
    return _back(out.clamp(min=0), v, clamp=True)


def second_moment_to_spectral(
    v: torch.Tensor, kernel_size: Sequence[int], basis: Basis, option: str = "diagonal"
) -> torch.Tensor:
    """An average of squared spatial gradients (Adam's ``exp_avg_sq``) approximated in the stored tensor's
    coordinates: ``"diagonal"`` (taps' gradients uncorrelated) or ``"correlated"`` (fully correlated: an upper
    bound); ``"split"`` needs the first moment (:func:`convert_state`) and is ``"diagonal"`` here. Non-negative;
    computed in float64, returned in ``v.dtype``."""
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    _check_spatial(v, ks)
    return _second(v, ks, basis, "to_spectral", option)


def second_moment_to_spatial(
    v_c: torch.Tensor, kernel_size: Sequence[int], basis: Basis, option: str = "diagonal"
) -> torch.Tensor:
    """The reverse of :func:`second_moment_to_spectral` (for bake): the same approximation through the
    pseudo-inverse of ``Sᵀ``."""
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    check_spectral(v_c, ks, basis)
    return _second(v_c, ks, basis, "to_spatial", option)


def reage_factor(beta: float, t: float, s: float) -> float:
    """``(1 - βˢ) / (1 - βᵗ)``: the factor that keeps a moment's bias-corrected estimate when its step count goes
    from ``t`` to ``s`` (1 when ``s >= t``: a state is never aged).

    Example:
        >>> round(reage_factor(0.999, 300, 10), 4)
        0.0384
        >>> reage_factor(0.9, 5, 10)
        1.0
    """
    if not 0 <= beta < 1:
        raise SpectralError(f"a beta must be in [0, 1), got {beta}")
    if s < 1 or t < 1:
        raise SpectralError(f"step counts must be at least 1, got t={t}, s={s}")
    if s >= t:
        return 1.0
    return float((1 - beta**s) / (1 - beta**t))


# -------------------------------------------------------------------------------- one parameter's whole state


@dataclass(frozen=True)
class Converted:
    """One parameter's optimizer state in new coordinates.

    ``state`` is None when the state is dropped (``reason`` says why; the optimizer then starts this parameter
    afresh). ``approximated`` names the keys whose values are approximations; ``reaged`` is the step the state
    was re-aged to, if it was.
    """

    state: dict[str, Any] | None
    reason: str | None = None
    approximated: tuple[str, ...] = ()
    reaged: int | None = None
    notes: tuple[str, ...] = field(default=())


def _step_value(step: Any) -> float:
    return float(step.item() if isinstance(step, torch.Tensor) else step)


def _with_step(step: Any, s: int) -> Any:
    if isinstance(step, torch.Tensor):
        return torch.full_like(step, s)
    return type(step)(s)


def convert_state(
    state: Mapping[str, Any],
    optimizer: str,
    kernel_size: Sequence[int],
    basis: Basis,
    direction: Direction,
    *,
    second_moment: str = DEFAULT_SECOND_MOMENT,
    reage_to: int | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
) -> Converted:
    """One parameter's per-parameter optimizer state (``optimizer.state[p]``, or ``state_dict()["state"][i]``)
    mapped ``"to_spectral"`` (convert) or ``"to_spatial"`` (bake) for a conv weight of ``kernel_size``.

    ``optimizer`` is the class name (``"Adam"``); ``betas`` the parameter group's (Adam family; used when
    re-aging). ``reage_to`` re-ages an Adam/AdamW state whose step is above it (see :func:`reage_factor`);
    ignored, with a note, for other optimizers (None: not re-aged; the measured default for ``convert`` is
    :data:`DEFAULT_REAGE`, passed by the caller). The input is not modified; tensors of the new state are new
    (carried scalars are the same objects). An empty state stays empty.

    Raises :class:`SpectralError` for a state tensor whose shape is not the weight's (convert) or the stored
    tensor's (bake), or an unknown ``second_moment``.
    """
    ks, basis = check_kernel_size(kernel_size), check_basis(basis)
    if direction not in ("to_spectral", "to_spatial"):
        raise SpectralError(f"direction must be 'to_spectral' or 'to_spatial', got {direction!r}")
    if second_moment not in SECOND_MOMENTS:
        raise SpectralError(f"unknown second-moment approximation {second_moment!r}: use one of "
                            f"{', '.join(repr(s) for s in SECOND_MOMENTS)}")  # fmt: skip
    if optimizer in DROPPED:
        return Converted(None, DROPPED[optimizer])
    if optimizer not in KEYS:
        return Converted(None, f"{optimizer}: " + UNKNOWN_REASON.format(known=", ".join(sorted(KEYS))))
    if not state:
        return Converted({})
    kinds = KEYS[optimizer]
    unknown = sorted(set(state) - set(kinds))
    if unknown:
        return Converted(None, f"{optimizer} state holds keys spectral_cli does not know: {', '.join(unknown)}")
    out: dict[str, Any] = {}
    approximated = []
    for key, value in state.items():
        kind = kinds[key]
        if kind == "carried" or not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        if kind not in _EXACT:
            approximated.append(key)
        mean = _mean_part(state, betas) if kind == "second" and second_moment == "split" else None
        out[key] = _map(value, kind, ks, basis, direction, second_moment, f"{optimizer} {key!r}", mean)
    reaged = None
    notes: tuple[str, ...] = ()
    if reage_to is not None:
        if optimizer not in REAGEABLE:
            notes = (f"not re-aged: {optimizer} is not one of {', '.join(sorted(REAGEABLE))}",)
        elif "step" in out:
            t = _step_value(out["step"])
            if reage_to < t:
                b1, b2 = betas
                f1, f2 = reage_factor(b1, t, reage_to), reage_factor(b2, t, reage_to)
                for key, factor in (("exp_avg", f1), ("exp_avg_sq", f2), ("max_exp_avg_sq", f2)):
                    if key in out:
                        out[key] = out[key] * factor
                out["step"] = _with_step(out["step"], reage_to)
                reaged = reage_to
    return Converted(out, None, tuple(approximated), reaged, notes)


def _mean_part(state: Mapping[str, Any], betas: tuple[float, float]) -> torch.Tensor | None:
    """``μ`` with ``μ²`` the part of an Adam second moment that its first moment explains, on the second
    moment's scale: ``v̂ = m̂² + variance``, so ``μ = m̂ · (1 - β₂ᵗ) ** 0.5`` with ``m̂ = m / (1 - β₁ᵗ)``."""
    m, step = state.get("exp_avg"), state.get("step")
    if not isinstance(m, torch.Tensor) or step is None:
        return None
    t = _step_value(step)
    if t < 1:
        return None
    b1, b2 = betas
    scale: float = math.sqrt(1 - b2**t) / (1 - b1**t)
    return _work(m) * scale


def _map(
    value: torch.Tensor,
    kind: Kind,
    ks: tuple[int, ...],
    basis: Basis,
    direction: Direction,
    option: str,
    what: str,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    if direction == "to_spectral":
        if value.dim() < len(ks) or tuple(value.shape[value.dim() - len(ks) :]) != ks:
            raise SpectralError(f"{what} of shape {tuple(value.shape)} is not the state of a weight with kernel "
                                f"size {ks}")  # fmt: skip
    else:
        try:
            check_spectral(value, ks, basis)
        except SpectralError as exc:
            raise SpectralError(f"{what}: {exc}") from None
    if kind == "gradient":
        return (gradient_to_spectral if direction == "to_spectral" else gradient_to_spatial)(value, ks, basis)
    if kind in ("param", "displacement"):
        return (param_to_spectral if direction == "to_spectral" else param_to_spatial)(value, ks, basis)
    if kind == "inf":  # the square root of a second moment
        v = _work(value).clamp(min=0) ** 2
        return _back(_second(v, ks, basis, direction, option).to(torch.float64).sqrt(), value, clamp=True)
    return _second(value, ks, basis, direction, option, param_like=kind == "second_param", mean=mean)


def stored_shape(weight_shape: Sequence[int], kernel_size: Sequence[int], basis: Basis) -> tuple[int, ...]:
    """The shape of the stored tensor (and of its converted state) for a weight of ``weight_shape``."""
    return spectral_shape(weight_shape, check_kernel_size(kernel_size), check_basis(basis))
