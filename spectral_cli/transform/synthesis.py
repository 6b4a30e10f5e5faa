"""The forward of a registered conv: spectral coefficients to spatial kernels as one product over all kernels
(or, for large kernels, FFTs over all kernels).

:func:`apply_synthesis` is what :class:`~spectral_cli.parametrization.SpectralParametrization` runs on every
forward pass. Unlike :func:`~spectral_cli.transform.bases.to_spatial` it takes no runs (one product, so its last
bits may differ from ``to_spatial``'s on tensors of more than :func:`~spectral_cli.transform.bases.chunk_rows`
kernels) and the rfft product has a backward of its own.

Example:
    >>> import torch
    >>> from spectral_cli.transform.bases import to_spectral
    >>> from spectral_cli.transform.matrices import matrices
    >>> w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    >>> x = to_spectral(w, (3, 3))
    >>> s = matrices("rfft", (3, 3), torch.float64, x.device).synthesis
    >>> torch.allclose(apply_synthesis(x, s, (3, 3), "rfft"), w)
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .bases import check_spectral
from .kernels import Basis, spectral_kernel_shape
from .matrices import compute_dtype, without_autocast
from .separable import synthesis_planes

__all__ = ["apply_synthesis"]


class _RfftSynthesis(torch.autograd.Function):
    """``planes[0] @ synthesis[0] + planes[1] @ synthesis[1]`` with a backward of one batched product.

    Autograd's own backward of the two products fills two zero tensors of the whole ``(2, R, n)`` shape, copies
    each plane's gradient into one and adds them, a cost the training step of the default basis shows
    (docs/measurements.md).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(planes: torch.Tensor, synthesis: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Out of place, though addmm copies its first argument (a memcpy per conv): with addmm_ here, torch 2.11's
        # torch.compile trained on zero gradients for ``original`` (tests/test_training.py, CPU and CUDA).
        return torch.addmm(planes[0] @ synthesis[0], planes[1], synthesis[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        planes, synthesis = inputs
        ctx.save_for_backward(synthesis, planes if ctx.needs_input_grad[1] else None)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        synthesis, planes = ctx.saved_tensors
        # (R, taps) @ (2, taps, n): the gradient broadcast over both planes without a copy
        grad_planes = torch.matmul(grad, synthesis.mT) if ctx.needs_input_grad[0] else None
        grad_synthesis = torch.matmul(planes.mT, grad) if ctx.needs_input_grad[1] else None
        return grad_planes, grad_synthesis


def apply_synthesis(x: torch.Tensor, synthesis: torch.Tensor | None, ks: tuple[int, ...], basis: Basis) -> torch.Tensor:
    """``to_spatial(x, ks, basis)`` with the synthesis matrix given (``matrices(...).synthesis`` in
    ``compute_dtype(x.dtype)`` on ``x.device``), or ``None`` for kernels of the separable method (FFTs over all
    kernels at once); differentiable in ``x``; keeps ``x.dtype``; computed as without ``torch.autocast``."""
    check_spectral(x, ks, basis)
    with without_autocast(x.device):
        return _synthesize(x, synthesis, ks, basis)


def _synthesize(x: torch.Tensor, synthesis: torch.Tensor | None, ks: tuple[int, ...], basis: Basis) -> torch.Tensor:
    cdtype = compute_dtype(x.dtype) if synthesis is None else synthesis.dtype
    n_in = math.prod(spectral_kernel_shape(ks, basis))
    rows: torch.Tensor
    if basis == "rfft":
        planes = x.to(cdtype).reshape(2, -1, n_in)
        if synthesis is None:
            rows = synthesis_planes(tuple(planes), ks, basis)
        else:
            rows = _RfftSynthesis.apply(planes, synthesis)
        lead = x.shape[1 : x.dim() - len(ks)]
    else:
        flat = x.to(cdtype).reshape(-1, n_in)
        rows = synthesis_planes((flat,), ks, basis) if synthesis is None else flat @ synthesis
        lead = x.shape[: x.dim() - len(ks)]
    return rows.reshape(*lead, *ks).to(x.dtype)
