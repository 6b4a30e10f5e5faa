"""``spectral inspect --plot FILE.png``: each layer's spectral energy as one row of a heatmap.

A row is a layer, a column a band of radial frequency (DC first; a 3x3 kernel has 3 bands, larger kernels up to
8, so shorter rows end early), the colour the share of the layer's energy in that band. One row per layer keeps
the picture readable from a handful of layers to a few hundred: the figure grows with the layers, and labels
stay legible. matplotlib is an optional extra (``pip install 'spectral-cli[plot]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import NothingToDoError, SpectralError
from .render import printable

if TYPE_CHECKING:
    from .files.listing import InspectReport

#: inches per layer row, and the tallest figure drawn (inches)
ROW_INCHES = 0.17
MAX_INCHES = 60.0


def plot_energy(report: InspectReport, target: Path) -> int:
    """Draw the energy profiles of ``report`` into the PNG ``target`` (written atomically); the rows drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpectralError("--plot needs matplotlib: pip install 'spectral-cli[plot]'") from None
    import numpy as np

    from .files.atomic import Output
    from .files.formats import check_output

    several = len({loc for loc, _ in report.layers}) > 1
    rows = [(f"{loc}/{info.name}" if several and loc else info.name or "(root)", info, report.energy[loc, info.key])
            for loc, info in report.layers if (loc, info.key) in report.energy]  # fmt: skip
    if not rows:
        raise NothingToDoError(f"{report.source}: no layer with an energy profile to plot; pass --all for spatial ones")
    check_output([report.source], target, force=True)
    grid = np.full((len(rows), max(len(e) for _, _, e in rows)), np.nan)
    for i, (_, _, energy) in enumerate(rows):
        grid[i, : len(energy)] = energy
    height = min(MAX_INCHES, 1.8 + ROW_INCHES * len(rows))
    fig, ax = plt.subplots(figsize=(7.5, height), layout="constrained")
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(rows)))
    size = 8 if len(rows) <= 40 else 6 if len(rows) <= 120 else 5
    ax.set_yticklabels([printable(f"{label}  {info.domain[:4]} {'x'.join(map(str, info.kernel_size or ()))}")
                        for label, info, _ in rows], fontsize=size)  # fmt: skip
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xticklabels(["DC", *map(str, range(1, grid.shape[1]))], fontsize=8)
    ax.set_xlabel("radial frequency band, DC first (each row's last band is its kernel's highest frequency)")
    ax.set_title(printable(f"{report.source}: energy per frequency band, {len(rows)} layers"), fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the layer's energy", shrink=min(1.0, 12 / height + 0.2))
    with Output(target) as out:
        fig.savefig(out.file().stream(), format="png", dpi=110)  # type: ignore[arg-type]
        out.commit()
    plt.close(fig)
    return len(rows)
