"""``SpectralParametrization`` and the one-line registrar ``register_spectral_parametrization``.

Example (the seed package's README, with the import switched):
    >>> import torch
    >>> import torch.nn.utils.parametrize as parametrize
    >>> from spectral_cli import SpectralParametrization
    >>> conv = torch.nn.Conv2d(in_channels=3, out_channels=64, kernel_size=3, padding=1)
    >>> _ = parametrize.register_parametrization(conv, "weight", SpectralParametrization(conv.kernel_size), unsafe=True)
    >>> print(conv.parametrizations.weight)
    ParametrizationList(
      (0): SpectralParametrization()
    )
    >>> tuple(conv.parametrizations.weight.original.shape)
    (2, 64, 3, 3, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import SpectralError
from .statedict.selection import glob_patterns, selected, why_not_convertible
from .transform.bases import to_spectral
from .transform.kernels import (
    DEFAULT_BASIS,
    Basis,
    check_basis,
    check_kernel_size,
    dtype_name,
    transform_method,
)
from .transform.matrices import compute_dtype, matrices
from .transform.synthesis import apply_synthesis

CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


class SpectralParametrization(nn.Module):
    """Stores a conv kernel as discrete-Fourier coefficients (Ballé, PCS 2018).

    ``forward`` maps coefficients to the spatial kernel, ``right_inverse`` maps a kernel to its coefficients,
    so it works with :func:`torch.nn.utils.parametrize.register_parametrization` (``unsafe`` True or False),
    with assignment ``conv.weight = W``, inside ``parametrize.cached()`` and after ``.to(device/dtype)``.

    Args:
        kernel_size: the conv's ``kernel_size`` (1 to 3 ints); the last ``len(kernel_size)`` dims of the
            weight are the kernel.
        basis: ``"rfft"`` (default; the layout of pytorch-parametrizations 1.0.0, stored tensor of shape
            ``(2, *W.shape[:-1], kw // 2 + 1)``) or ``"rdft"`` (orthonormal, same shape as the weight).

    Example:
        >>> import torch
        >>> p = SpectralParametrization((5,), basis="rdft")
        >>> w = torch.randn(4, 2, 5, dtype=torch.float64)
        >>> torch.allclose(p(p.right_inverse(w)), w)
        True
        >>> p
        SpectralParametrization(basis='rdft')
    """

    _synthesis: torch.Tensor | None

    def __init__(self, kernel_size: Sequence[int], basis: Basis = DEFAULT_BASIS) -> None:
        super().__init__()
        self.kernel_size: tuple[int, ...] = check_kernel_size(kernel_size)
        self.basis: Basis = check_basis(basis)
        # A non-persistent buffer (not in state dicts) so that torch.compile sees a tensor input rather than
        # tracing the matrix construction, and so that it follows .to(device). None for large kernels: they
        # are transformed with FFTs (a dense matrix would grow as taps^2).
        self.register_buffer("_synthesis", self._matrix(torch.float32, torch.device("cpu")), persistent=False)

    def _matrix(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if transform_method(self.kernel_size) == "separable":
            return None
        return matrices(self.basis, self.kernel_size, compute_dtype(dtype), device).synthesis

    def _apply(self, fn: Any, recurse: bool = True) -> SpectralParametrization:
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        # .half()/.to(dtype) would round the matrix itself; take the exact one for the new device and dtype.
        if self._synthesis is not None:
            self._synthesis = self._matrix(self._synthesis.dtype, self._synthesis.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        synthesis = self._synthesis
        if synthesis is not None and (synthesis.device != x.device or synthesis.dtype != compute_dtype(x.dtype)):
            synthesis = self._synthesis = self._matrix(x.dtype, x.device)
        return apply_synthesis(x, synthesis, self.kernel_size, self.basis)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        self._synthesis = self._matrix(w.dtype, w.device)
        return to_spectral(w, self.kernel_size, self.basis)

    def extra_repr(self) -> str:
        # The default prints as the seed package does: ``SpectralParametrization()``.
        return "" if self.basis == DEFAULT_BASIS else f"basis={self.basis!r}"


@dataclass(frozen=True)
class Registration:
    """What :func:`register_spectral_parametrization` did: module names changed, and skipped with why."""

    changed: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def _weight_parametrizations(module: nn.Module) -> parametrize.ParametrizationList:
    return cast(parametrize.ParametrizationList, module.parametrizations["weight"])  # type: ignore[index]


def spectral_parametrization_of(module: nn.Module) -> SpectralParametrization | None:
    """The ``SpectralParametrization`` on ``module.weight``, or ``None``."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in _weight_parametrizations(module):
        if isinstance(p, SpectralParametrization):
            return p
    return None


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before changing it.

    ``copy.deepcopy`` shares the generated ``Parametrized<Cls>`` class between copies, and removing a
    parametrization deletes the property from that class, which breaks every other copy.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _is_masked(module: nn.Module, weight: torch.Tensor) -> bool:
    """A conv whose forward masks ``weight.data`` by a ``mask`` buffer (CompressAI's ``MaskedConv2d``)."""
    mask = getattr(module, "mask", None)
    return isinstance(mask, torch.Tensor) and mask.shape == weight.shape


def _computed_weight(module: nn.Module) -> str:
    """Why a conv's ``weight`` is not a parameter of its own: an old-style hook computes it before each forward."""
    from torch.nn.utils.prune import BasePruningMethod

    if any(isinstance(h, BasePruningMethod) for h in module._forward_pre_hooks.values()):
        return 'pruned (weight_orig, weight_mask); make it permanent: torch.nn.utils.prune.remove(module, "weight")'
    hooks = {type(h).__name__ for h in module._forward_pre_hooks.values()}
    if "WeightNorm" in hooks:
        return "old-style weight_norm hook (weight_g, weight_v); use torch.nn.utils.parametrizations.weight_norm"
    if "SpectralNorm" in hooks:
        return "old-style spectral_norm hook (weight_orig); use torch.nn.utils.parametrizations.spectral_norm"
    return "weight is not a parameter (computed by a hook)"


def _clear_grad(module: nn.Module) -> None:
    # torch keeps the Parameter object across (un)registration: a gradient from the other coordinates would
    # be added to the new ones on the next backward (or fail on shape).
    weight = module.weight if not parametrize.is_parametrized(module, "weight") else None
    if isinstance(weight, torch.Tensor):
        weight.grad = None


def _plan_register(
    module: nn.Module, include: tuple[str, ...] | None, exclude: tuple[str, ...] | None
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    todo, skipped = [], []
    for name, m in module.named_modules():
        if not isinstance(m, CONV_TYPES):
            continue
        weight = cast(torch.Tensor, m.weight)
        kernel_size = cast(tuple[int, ...], m.kernel_size)
        chosen = selected(name, include, exclude)
        if chosen and spectral_parametrization_of(m) is not None:
            reason: str | None = "already spectral"
        elif chosen and parametrize.is_parametrized(m, "weight"):
            reason = "weight has another parametrization"
        elif chosen and isinstance(weight, nn.parameter.UninitializedParameter):
            reason = "lazy module not initialized"
        elif chosen and not isinstance(m._parameters.get("weight"), torch.Tensor):
            reason = _computed_weight(m)
        else:
            reason = why_not_convertible(kernel_size, dtype_name(weight.dtype), masked=_is_masked(m, weight),
                                         selected=chosen)  # fmt: skip
        if reason is None:
            todo.append((name, m))
        else:
            skipped.append((name, reason))
    return todo, skipped


def _plan_undo(
    module: nn.Module, include: tuple[str, ...] | None, exclude: tuple[str, ...] | None
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    todo, skipped = [], []
    for name, m in module.named_modules():
        if spectral_parametrization_of(m) is None:
            continue
        if not selected(name, include, exclude):
            skipped.append((name, "excluded"))
        elif len(_weight_parametrizations(m)) != 1:
            raise SpectralError(
                f"cannot undo the spectral parametrization of {name or 'the root module'!r}: other "
                "parametrizations are stacked on its weight; remove them first with "
                "torch.nn.utils.parametrize.remove_parametrizations"
            )
        else:
            todo.append((name, m))
    return todo, skipped


def _plan(
    module: nn.Module, undo: bool, include: str | Iterable[str] | None, exclude: str | Iterable[str] | None
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    if not isinstance(module, nn.Module):
        raise SpectralError(f"register_spectral_parametrization takes an nn.Module, got {type(module).__name__}")
    inc, exc = glob_patterns(include, "include"), glob_patterns(exclude, "exclude")
    return (_plan_undo if undo else _plan_register)(module, inc, exc)


def plan_spectral_parametrization(
    module: nn.Module,
    undo: bool = False,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> Registration:
    """What :func:`register_spectral_parametrization` would do with these arguments, without doing it.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1))
        >>> plan_spectral_parametrization(net)
        Registration(changed=('0',), skipped=(('1', '1x1 kernel'),))
        >>> type(net[0]).__name__
        'Conv2d'
    """
    todo, skipped = _plan(module, undo, include, exclude)
    return Registration(changed=tuple(name for name, _ in todo), skipped=tuple(skipped))


def register_spectral_parametrization(
    module: nn.Module,
    undo: bool = False,
    *,
    basis: Basis = DEFAULT_BASIS,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> Registration:
    """Register (or with ``undo=True`` bake and remove) the spectral parametrization on every conv layer.

    Registers on every Conv1d/2d/3d and ConvTranspose1d/2d/3d (grouped and depthwise included) whose kernel
    has more than one tap, skipping layers already spectral, so calling it twice changes nothing, and masked
    convs (CompressAI's ``MaskedConv2d`` writes ``weight.data`` in its forward, which a parametrization ignores).
    ``undo=True`` leaves the spatial weights in place and turns the modules back into their plain classes.
    ``include``/``exclude`` are glob patterns on qualified module names (``"encoder.*"``). Everything is
    checked before the module is touched.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1))
        >>> register_spectral_parametrization(net)
        Registration(changed=('0',), skipped=(('1', '1x1 kernel'),))
        >>> type(net[0]).__name__
        'ParametrizedConv2d'
        >>> register_spectral_parametrization(net, undo=True).changed
        ('0',)
        >>> type(net[0]).__name__
        'Conv2d'
    """
    basis = check_basis(basis)
    todo, skipped = _plan(module, undo, include, exclude)
    for _, m in todo:
        if undo:
            _own_class(m)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            _clear_grad(m)
        else:
            _clear_grad(m)
            if parametrize.is_parametrized(m):
                _own_class(m)
            kernel_size = cast(tuple[int, ...], m.kernel_size)
            parametrize.register_parametrization(m, "weight", SpectralParametrization(kernel_size, basis))
    return Registration(changed=tuple(name for name, _ in todo), skipped=tuple(skipped))


def spectral_shard_placement(module: nn.Module, world_size: Any) -> Callable[[nn.Parameter], Any]:
    """A ``shard_placement_fn`` for FSDP2's ``fully_shard`` that spreads rfft coefficients over every rank.

    FSDP2 shards dim 0 by default, which for the ``rfft`` basis holds the 2 planes (real, imaginary): with more
    than 2 ranks the others would hold nothing of those layers. This shards each of them on its first dim after
    the planes whose size ``world_size`` divides (the output channels, else the input channels: FSDP2 shards other
    dims evenly only), and leaves every other parameter to FSDP2's default. ``world_size`` is the sharding mesh's
    size (an int, or the ``DeviceMesh``). Register the parametrization before calling ``fully_shard``.

    Example:
        >>> import torch
        >>> from spectral_cli import register_spectral_parametrization
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 6, 3))
        >>> _ = register_spectral_parametrization(net)
        >>> place = spectral_shard_placement(net, 4)  # fully_shard(layer, mesh=mesh, shard_placement_fn=place)
        >>> place(net[0].parametrizations.weight.original), place(net[1].parametrizations.weight.original)
        (Shard(dim=1), Shard(dim=2))
        >>> place(net[0].bias) is None
        True
    """
    from torch.distributed.tensor import Shard

    size = world_size.size() if hasattr(world_size, "size") else int(world_size)
    dims: dict[int, int] = {}
    for m in module.modules():
        parametrization = spectral_parametrization_of(m)
        if parametrization is None or parametrization.basis != "rfft":
            continue
        original = _weight_parametrizations(m).original
        dim = next((d for d in range(1, original.dim()) if original.shape[d] % size == 0), None)
        if dim is not None:
            dims[id(original)] = dim

    def placement(param: nn.Parameter) -> Any:
        dim = dims.get(id(param))
        return None if dim is None else Shard(dim)

    return placement
