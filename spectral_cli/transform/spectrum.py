"""Where a kernel's energy sits in frequency: radial bins of the power spectrum, for ``spectral inspect``.

Example:
    >>> import torch
    >>> w = torch.ones(4, 4, 3, 3)  # a constant kernel is all DC
    >>> [round(e, 3) for e in radial_energy(w, (3, 3), "spatial", bins=3)]
    [1.0, 0.0, 0.0]
"""

from __future__ import annotations

import torch

from .bases import to_spatial, to_spectral
from .kernels import Basis


def _axis_frequency(n: int, half: bool) -> torch.Tensor:
    """|frequency| in cycles per tap of each rfft bin along one axis (0 to 0.5)."""
    k = torch.arange(n // 2 + 1 if half else n, dtype=torch.float64)
    return torch.minimum(k, n - k) / n


def radial_energy(tensor: torch.Tensor, kernel_size: tuple[int, ...], basis: Basis | str, bins: int = 8) -> list[float]:
    """Fraction of the kernels' energy per band of radial frequency, DC first.

    The bands are the kernel's distinct radial frequencies (a 3x3 kernel has 3, a 5x5 has 6), merged into
    ``bins`` equal bands when there are more. ``basis`` is the tensor's layout: ``"spatial"`` for a plain
    weight, or the spectral basis it is stored in.
    """
    x = tensor.detach().to(torch.float64)
    if basis != "rfft":
        w = x if basis == "spatial" else to_spatial(x, kernel_size, "rdft")
        x = to_spectral(w, kernel_size, "rfft")
    k = len(kernel_size)
    power = (x[0] ** 2 + x[1] ** 2).reshape(-1, *x.shape[-k:]).sum(0)
    grids = torch.meshgrid(*[_axis_frequency(n, half=i == k - 1) for i, n in enumerate(kernel_size)], indexing="ij")
    radius = torch.sqrt(torch.stack([g**2 for g in grids]).sum(0)).flatten()
    last = torch.arange(power.shape[-1])
    n_last = kernel_size[-1]
    # Interior bins of the halved axis stand for themselves and their conjugate twin.
    twin = ((last > 0) & ~((n_last % 2 == 0) & (last == n_last // 2))).to(torch.float64) + 1
    power = (power * twin).flatten()
    distinct, band = torch.unique(torch.round(radius, decimals=9), return_inverse=True)
    if len(distinct) > bins:
        band = torch.clamp((radius / radius.max() * bins).long(), max=bins - 1)
    energy = torch.zeros(min(bins, len(distinct)), dtype=torch.float64).index_add_(0, band, power)
    total = energy.sum().item()
    return [e / total if total > 0 else 0.0 for e in energy.tolist()]
