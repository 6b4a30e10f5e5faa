"""Convergence benchmark: spectral vs spatial conv kernels under Adam (Balle, PCS 2018; Rippel et al., NIPS 2015).

A Balle-style conv+GDN autoencoder is trained to minimise MSE on random crops of the natural photographs that
scikit-image ships inside its wheel (no downloads). The same initial network (per seed) is trained as

``spatial``
    plain conv kernels;
``rfft``
    ``spectral_cli`` with ``basis="rfft"`` (half spectrum, real and imaginary planes stacked);
``rdft``
    ``spectral_cli`` with ``basis="rdft"`` (orthonormal packed real DFT);
``peer``
    ``pytorch_parametrizations.spectral.utils.register_spectral_parametrization`` (the seed package, 1.0.0).

Two diagnostic variants isolate the step-size effect of the rfft map (not run unless named with --variants):

``rfft_unit``
    the rfft coordinates with every non-DC coefficient scaled by 1/sqrt(2), so that an Adam step of size lr
    moves the kernel by lr along every direction, as in the orthonormal rdft basis;
``rdft_sqrt2``
    the rdft coordinates with every non-DC coefficient scaled by sqrt(2): the rdft basis with the spatial
    step sizes of rfft.

One command::

    python -m benchmarks.convergence --config cpu --out bench-out

writes ``results.json``, ``table.md`` and (when matplotlib is importable) ``convergence.png`` into ``--out``.

Definitions (also written into ``table.md``):

* PSNR of a step: ``10 log10(1 / MSE)`` of that step's training batch (pixels in [0, 1]), before the update.
* final PSNR: mean PSNR of the last 50 steps (fewer if the run is shorter).
* smoothed curve: trailing mean over the same window.
* diverged: a non-finite loss, or a final PSNR below the PSNR of the first step (worse than the untrained
  network).
* unstable: not diverged, but the final PSNR is more than ``collapse_db`` (3 dB) below the best smoothed PSNR
  of the run (a late loss spike).
* best learning rate of a variant: the one with the highest mean final PSNR over seeds (a diverged run counts
  as minus infinity, so a learning rate that diverged once is never "best"). The target of seed s is the final
  PSNR of spatial at its best learning rate with seed s.
* steps to reach: first step at which the smoothed curve reaches the target of its seed.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._model import Autoencoder

VARIANTS: tuple[str, ...] = ("spatial", "rfft", "rdft", "peer")
DIAGNOSTIC_VARIANTS: tuple[str, ...] = ("rfft_unit", "rdft_sqrt2")
ALL_VARIANTS: tuple[str, ...] = VARIANTS + DIAGNOSTIC_VARIANTS

# Colour photographs shipped inside the scikit-image wheel (skimage/data/*.png|jpg): no pooch download needed.
IMAGE_LOADERS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")


@dataclass(frozen=True)
class Config:
    """One benchmark configuration. The presets are in :data:`PRESETS`; every field can be overridden."""

    channels: int = 128
    kernel: int = 5
    stages: int = 4
    batch: int = 16
    crop: int = 128
    steps: int = 3000
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS
    window: int = 50
    collapse_db: float = 3.0
    device: str = "cuda"
    threads: int | None = None


PRESETS: dict[str, Config] = {
    # The H100 configuration of the issue: 128 channels, 5x5 kernels, batch 16 of 128x128 crops.
    "gpu": Config(),
    # Small enough for 2 shared CPU cores at 1 thread; higher learning rates because the spectral advantage
    # opens late at lr 1e-4 on a small model (see docs/convergence.md).
    "cpu": Config(
        channels=32,
        kernel=5,
        stages=3,
        batch=8,
        crop=48,
        steps=500,
        lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        seeds=(0, 1, 2),
        device="cpu",
        threads=1,
    ),
}


# ----------------------------------------------------------------------------------------------------- data


def load_images(device: torch.device) -> list[torch.Tensor]:
    """The bundled colour photographs as float tensors (3, H, W) in [0, 1]."""
    try:
        from skimage import data as skdata
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise SystemExit(
            "benchmarks.convergence needs scikit-image for its bundled photographs: pip install 'spectral-cli[bench]'"
        ) from exc
    images = []
    for name in IMAGE_LOADERS:
        array = getattr(skdata, name)()
        if name == "stereo_motorcycle":
            array = array[0]
        t = torch.from_numpy(array[..., :3].copy()).permute(2, 0, 1).to(torch.float32) / 255.0
        images.append(t.contiguous().to(device))
    return images


class CropSampler:
    """Random crops, deterministic per seed and independent of the model (same batches for every variant)."""

    def __init__(self, images: list[torch.Tensor], crop: int, batch: int, seed: int) -> None:
        self.images, self.crop, self.batch = images, crop, batch
        self.generator = torch.Generator().manual_seed(10_007 * seed + 1)
        too_small = [tuple(im.shape) for im in images if min(im.shape[1:]) < crop]
        if too_small:
            raise ValueError(f"crop {crop} is larger than images of shape {too_small}")

    def __call__(self) -> torch.Tensor:
        g, c = self.generator, self.crop
        picks = torch.randint(len(self.images), (self.batch,), generator=g).tolist()
        out = []
        for i in picks:
            im = self.images[i]
            top = int(torch.randint(im.shape[1] - c + 1, (1,), generator=g))
            left = int(torch.randint(im.shape[2] - c + 1, (1,), generator=g))
            out.append(im[:, top : top + c, left : left + c])
        return torch.stack(out)


# ---------------------------------------------------------------------------------------------------- model


class _ScaledSpectral(nn.Module):
    """Diagnostic parametrization: a spectral_cli basis with every non-DC coefficient multiplied by ``scale``.

    ``W = to_spatial(S * X)``: under Adam this multiplies the spatial step along the non-DC directions by
    ``scale`` while keeping the directions of the basis.
    """

    def __init__(self, kernel_size: tuple[int, ...], basis: str, scale: float) -> None:
        super().__init__()
        self.kernel_size, self.basis, self.scale = kernel_size, basis, scale

    def _factor(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.full(x.shape[-2:], self.scale, dtype=x.dtype, device=x.device)
        s[0, 0] = 1.0  # DC is bin (0, 0) in both layouts
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spectral_cli import to_spatial

        return to_spatial(x * self._factor(x), self.kernel_size, self.basis)  # type: ignore[arg-type]

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        from spectral_cli import to_spectral

        x = to_spectral(w, self.kernel_size, self.basis)  # type: ignore[arg-type]
        return x / self._factor(x)


def _register_scaled(model: nn.Module, basis: str, scale: float) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and math.prod(m.kernel_size) > 1:
            p = _ScaledSpectral(tuple(m.kernel_size), basis, scale)
            parametrize.register_parametrization(m, "weight", p, unsafe=True)


def _register_peer(model: nn.Module) -> None:
    from pytorch_parametrizations.spectral.utils import register_spectral_parametrization

    register_spectral_parametrization(model)


def _register_ours(basis: str) -> Callable[[nn.Module], None]:
    def register(model: nn.Module) -> None:
        from spectral_cli import register_spectral_parametrization

        register_spectral_parametrization(model, basis=basis)  # type: ignore[arg-type]

    return register


REGISTRARS: dict[str, Callable[[nn.Module], None]] = {
    "spatial": lambda model: None,
    "rfft": _register_ours("rfft"),
    "rdft": _register_ours("rdft"),
    "peer": _register_peer,
    "rfft_unit": lambda model: _register_scaled(model, "rfft", 1 / math.sqrt(2)),
    "rdft_sqrt2": lambda model: _register_scaled(model, "rdft", math.sqrt(2)),
}


def build_model(variant: str, base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` (the spatial network of a seed) parametrized as ``variant``: same function."""
    model = copy.deepcopy(base)
    REGISTRARS[variant](model)
    return model


# ------------------------------------------------------------------------------------------------- training


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    return -10.0 * torch.log10(mse)


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (shorter window at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def train_run(
    variant: str,
    lr: float,
    seed: int,
    base: nn.Module,
    images: list[torch.Tensor],
    cfg: Config,
    device: torch.device,
) -> dict[str, Any]:
    """Train one variant from the seed's initial weights; PSNR of every step, and whether it diverged."""
    model = build_model(variant, base).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    sampler = CropSampler(images, cfg.crop, cfg.batch, seed)
    losses = torch.empty(cfg.steps, device=device)
    check_every = 25
    nonfinite_at: int | None = None
    done = 0
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        x = sampler()
        loss = torch.mean((model(x) - x) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        done = step + 1
        if done % check_every == 0 or done == cfg.steps:
            chunk = losses[done - (done - 1) % check_every - 1 : done]
            bad = (~torch.isfinite(chunk)).nonzero()
            if len(bad):
                nonfinite_at = done - len(chunk) + int(bad[0])
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    # Rounded once, here: the final PSNR and every later comparison use exactly the numbers that are stored.
    psnr = [round(p, 3) for p in psnr_from_mse(losses[:done].double()).cpu().tolist()]
    if nonfinite_at is not None:
        psnr = psnr[:nonfinite_at]
    return {
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "steps_run": done,
        "psnr": psnr,
        **assess(psnr, nonfinite_at, cfg),
        "diverged_at_step": nonfinite_at,
        "wall_s": round(wall, 3),
        "ms_per_step": round(1000 * wall / max(done, 1), 3),
    }


def assess(psnr: list[float], nonfinite_at: int | None, cfg: Config) -> dict[str, Any]:
    """Final PSNR, best smoothed PSNR, diverged / unstable, from a run's PSNR list (finite values only)."""
    finite = [p for p in psnr if math.isfinite(p)]
    window = min(cfg.window, max(len(finite), 1))
    final = statistics.fmean(finite[-window:]) if finite and nonfinite_at is None else None
    smooth = trailing_mean(finite, window) if finite else []
    best_smooth = max(smooth) if smooth else None
    blown_up = final is not None and final < psnr[0]
    unstable = not blown_up and final is not None and best_smooth is not None and final < best_smooth - cfg.collapse_db
    return {
        "final_psnr": final,
        "best_smoothed_psnr": best_smooth,
        "diverged": nonfinite_at is not None or blown_up,
        "diverged_reason": "non-finite loss" if nonfinite_at is not None else ("blew up" if blown_up else None),
        "unstable": unstable,
    }


# -------------------------------------------------------------------------------------------------- summary


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def steps_to_reach(psnr: Sequence[float], target: float, window: int) -> int | None:
    """First step (1-based) at which the trailing mean of PSNR reaches ``target``; None if never."""
    for i, v in enumerate(trailing_mean(psnr, window)):
        if v >= target - 1e-9:
            return i + 1
    return None


def summarise(runs: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Best learning rates, targets, steps to reach, divergences and the goal check."""
    window = min(cfg.window, cfg.steps)

    def cell(variant: str, lr: float) -> list[dict[str, Any]]:
        return [r for r in runs if r["variant"] == variant and r["lr"] == lr]

    def score(rs: list[dict[str, Any]]) -> float:
        finals = [-math.inf if r["diverged"] or r["final_psnr"] is None else r["final_psnr"] for r in rs]
        return statistics.fmean(finals) if finals else -math.inf

    variants = [v for v in cfg.variants]
    best_lr = {v: max(cfg.lrs, key=lambda lr, v=v: (score(cell(v, lr)), -lr)) for v in variants}
    out: dict[str, Any] = {"window": window, "best_lr": best_lr}
    if "spatial" not in variants:
        out["note"] = "no spatial variant: no target, no steps to reach"
        out["cells"] = {v: {str(lr): _cell_stats(cell(v, lr), {}, window) for lr in cfg.lrs} for v in variants}
        return out

    spatial_best = cell("spatial", best_lr["spatial"])
    ok = [r for r in spatial_best if not r["diverged"] and r["final_psnr"] is not None]
    median_target = _median([r["final_psnr"] for r in ok]) if ok else math.nan
    targets = {}
    for seed in cfg.seeds:
        own = [r for r in ok if r["seed"] == seed]
        targets[seed] = own[0]["final_psnr"] if own else median_target
    out["spatial_best_lr"] = best_lr["spatial"]
    out["target_median_psnr"] = None if math.isnan(median_target) else round(median_target, 4)
    out["targets_by_seed"] = {str(s): t for s, t in targets.items()}
    out["cells"] = {v: {str(lr): _cell_stats(cell(v, lr), targets, window) for lr in cfg.lrs} for v in variants}

    # Spatial's final PSNR is, by definition, what it has at the end of its run: the reference is the run length.
    # (Its smoothed curve may touch that value earlier, on a plateau; that first crossing is reported too.)
    ref_steps = cfg.steps
    out["spatial_first_crossing_median"] = out["cells"]["spatial"][str(best_lr["spatial"])]["steps_to_reach_median"]
    at_best = {}
    for v in variants:
        c = out["cells"][v][str(best_lr[v])]
        steps = c["steps_to_reach_median"]
        ratio = None if steps is None or ref_steps is None else round(steps / ref_steps, 4)
        at_best[v] = {
            "lr": best_lr[v],
            "final_psnr_median": c["final_psnr_median"],
            "steps_to_reach_median": steps,
            "fraction_of_spatial_steps": ratio,
            "speedup": None if not ratio else round(1 / ratio, 3),
        }
    out["at_best_lr"] = at_best
    ten_x = 10 * best_lr["spatial"]
    lr_10x = next((lr for lr in cfg.lrs if math.isclose(lr, ten_x, rel_tol=1e-6)), None)
    out["lr_10x_spatial_best"] = ten_x
    out["stable_at_10x"] = {
        v: (
            None
            if lr_10x is None
            else out["cells"][v][str(lr_10x)]["diverged"] + out["cells"][v][str(lr_10x)]["unstable"] == 0
        )
        for v in variants
    }
    return out


def _cell_stats(rs: list[dict[str, Any]], targets: dict[int, float], window: int) -> dict[str, Any]:
    finals = [r["final_psnr"] for r in rs if not r["diverged"] and r["final_psnr"] is not None]
    reach: list[float] = []
    per_seed = {}
    for r in rs:
        t = targets.get(r["seed"])
        s = None
        if t is not None and not math.isnan(t) and not r["diverged"]:
            s = steps_to_reach(r["psnr"], t, window)
        per_seed[str(r["seed"])] = s
        if t is not None:
            reach.append(math.inf if s is None else s)
    med = _median(reach) if reach else math.nan
    return {
        "n": len(rs),
        "diverged": sum(r["diverged"] for r in rs),
        "unstable": sum(r["unstable"] for r in rs),
        "final_psnr_mean": round(statistics.fmean(finals), 4) if len(finals) == len(rs) and finals else None,
        "final_psnr_median": round(_median(finals), 4) if finals else None,
        "final_psnr_min": min(finals) if finals else None,
        "final_psnr_max": max(finals) if finals else None,
        "steps_to_reach_by_seed": per_seed,
        "steps_to_reach_median": None if not math.isfinite(med) else round(med, 1),
        "reached": sum(1 for s in per_seed.values() if s is not None),
    }


# ------------------------------------------------------------------------------------------------- reporting


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "versions": {
            d: _version(d)
            for d in (
                "torch",
                "spectral-cli",
                "pytorch-parametrizations",
                "compressai",
                "scikit-image",
                "numpy",
                "matplotlib",
            )
        },
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    env["git"] = _git_revision()
    return env


def _git_revision() -> str | None:
    """Commit of the checkout this file lives in, with ``+dirty`` if spectral_cli/ or benchmarks/ has changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "spectral_cli", "benchmarks"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _fmt_opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _fmt_final(c: dict[str, Any]) -> str:
    if c["final_psnr_median"] is None:
        return f"diverged {c['diverged']}/{c['n']}"
    s = f"{c['final_psnr_median']:.2f} ({c['final_psnr_min']:.2f}-{c['final_psnr_max']:.2f})"
    if c["diverged"]:
        s += f", div {c['diverged']}/{c['n']}"
    if c["unstable"]:
        s += f", unstable {c['unstable']}/{c['n']}"
    return s


def _fmt_steps(c: dict[str, Any]) -> str:
    seeds = [v for v in c["steps_to_reach_by_seed"].values()]
    if not seeds:
        return "-"
    med = c["steps_to_reach_median"]
    got = sorted(v for v in seeds if v is not None)
    if med is None:
        return f"not reached ({c['reached']}/{c['n']})"
    span = f"{got[0]}-{got[-1]}" if got else ""
    return f"{med:.0f} ({span}; {c['reached']}/{c['n']})"


def render_table(result: dict[str, Any]) -> str:
    cfg, summ, env = result["config"], result["summary"], result["environment"]
    lrs, variants = cfg["lrs"], cfg["variants"]
    lines = [
        "# Convergence benchmark",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Config `{result['config_name']}`: {cfg['channels']} channels, {cfg['kernel']}x{cfg['kernel']} kernels, "
        f"{cfg['stages']} stages, batch {cfg['batch']} of {cfg['crop']}x{cfg['crop']} crops, {cfg['steps']} steps, "
        f"Adam, seeds {cfg['seeds']}.",
        "",
        f"Machine: {env['cpu']} ({env['cpu_count']} cores, torch threads {env['torch_threads']}), device "
        f"{env.get('gpu', env['device'])}; {env['platform']}; Python {env['python']}; {env['date_utc']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; git {env.get('git')}.",
        f"Total wall time {result['total_wall_s']:.0f} s.",
        "",
        f"## Final PSNR (dB, mean of the last {summ['window']} steps): median (min-max) over seeds",
        "",
        "| variant | " + " | ".join(f"lr {_fmt_lr(lr)}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(_fmt_final(summ["cells"][v][str(lr)]) for lr in lrs) + " |")
    lines.append("")
    if "target_median_psnr" in summ:
        targets = ", ".join(f"seed {s}: {t:.2f}" for s, t in summ["targets_by_seed"].items() if t is not None)
        lines += [
            f"## Steps to reach spatial's final PSNR at its best lr ({_fmt_lr(summ['spatial_best_lr'])}; "
            f"median {summ['target_median_psnr']} dB; {targets})",
            "",
            f"Trailing {summ['window']}-step mean of the PSNR, compared with the same seed's target. "
            "Median (min-max of the runs that reached; reached/runs).",
            "",
            "| variant | " + " | ".join(f"lr {_fmt_lr(lr)}" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs),
        ]
        for v in variants:
            lines.append(f"| {v} | " + " | ".join(_fmt_steps(summ["cells"][v][str(lr)]) for lr in lrs) + " |")
        lines += [
            "",
            "## Each variant at its own best learning rate",
            "",
            f"Spatial's final PSNR is the mean of its last {summ['window']} of {cfg['steps']} steps, so the fraction "
            f"is steps to reach / {cfg['steps']} (spatial's smoothed curve first touched its own final value at "
            f"step {_fmt_opt(summ['spatial_first_crossing_median'])}, median). Goal: fraction <= 0.2 and stable at 10x "
            "spatial's best lr.",
            "",
            "| variant | best lr | final PSNR (median) | steps to reach target (median) | fraction of spatial's "
            f"steps | diverged / unstable runs (all lrs) | stable at lr {_fmt_lr(summ['lr_10x_spatial_best'])} (10x) |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in variants:
            b = summ["at_best_lr"][v]
            div = sum(summ["cells"][v][str(lr)]["diverged"] for lr in lrs)
            uns = sum(summ["cells"][v][str(lr)]["unstable"] for lr in lrs)
            n = sum(summ["cells"][v][str(lr)]["n"] for lr in lrs)
            stable = summ["stable_at_10x"][v]
            stable_s = "not in sweep" if stable is None else ("yes" if stable else "no")
            final = "-" if b["final_psnr_median"] is None else f"{b['final_psnr_median']:.2f}"
            steps = "not reached" if b["steps_to_reach_median"] is None else f"{b['steps_to_reach_median']:.0f}"
            frac = "-" if b["fraction_of_spatial_steps"] is None else f"{b['fraction_of_spatial_steps']:.2f}"
            lines.append(
                f"| {v} | {_fmt_lr(b['lr'])} | {final} | {steps} | {frac} | {div} / {uns} of {n} | {stable_s} |"
            )
    lines += [
        "",
        "Diverged: non-finite loss, or final PSNR below the first step's (worse than the untrained network). "
        f"Unstable: final PSNR more than {cfg['collapse_db']} dB below the run's best smoothed PSNR (late loss "
        "spike). Best lr: highest mean final PSNR over seeds (a diverged run counts as minus infinity). Stable at "
        "10x: no diverged and no unstable run at that lr.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """One panel per learning rate (median smoothed PSNR over seeds, band min-max) and one of final PSNR against
    learning rate; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cfg, summ = result["config"], result["summary"]
    lrs, variants = cfg["lrs"], cfg["variants"]
    window = summ["window"]
    colours = {
        "spatial": "black",
        "rfft": "tab:blue",
        "rdft": "tab:orange",
        "peer": "tab:green",
        "rfft_unit": "tab:purple",
        "rdft_sqrt2": "tab:red",
    }
    styles = {"peer": ":", "rfft_unit": "--", "rdft_sqrt2": "--"}
    ncols = min(3, len(lrs) + 1)
    nrows = math.ceil((len(lrs) + 1) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.5 * nrows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(lrs) + 1 :]:
        ax.set_visible(False)
    lo = math.inf
    for ax, lr in zip(axes, lrs, strict=False):
        for v in variants:
            curves = [trailing_mean(r["psnr"], window) for r in result["runs"] if r["variant"] == v and r["lr"] == lr]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            med = [statistics.median(c[i] for c in curves) for i in range(n)]
            div = summ["cells"][v][str(lr)]["diverged"]
            if not div and len(med) > window:
                lo = min(lo, *med[window:])
            xs = range(1, n + 1)
            ax.plot(xs, med, label=v, color=colours.get(v), linestyle=styles.get(v, "-"), linewidth=1.4)
            if len(curves) > 1:
                lows = [min(c[i] for c in curves) for i in range(n)]
                highs = [max(c[i] for c in curves) for i in range(n)]
                ax.fill_between(xs, lows, highs, color=colours.get(v), alpha=0.12, linewidth=0)
        if summ.get("target_median_psnr") is not None:
            ax.axhline(summ["target_median_psnr"], color="grey", linestyle="--", linewidth=0.8)
        failed = [f"{v} {c['diverged']}/{c['n']}" for v in variants if (c := summ["cells"][v][str(lr)])["diverged"]]
        if failed:
            ax.text(0.98, 0.04, "diverged: " + ", ".join(failed), transform=ax.transAxes, ha="right", fontsize=8)
        ax.set_title(f"Adam lr {_fmt_lr(lr)}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training PSNR (dB), {window}-step mean", fontsize=8)
        ax.grid(alpha=0.3)
    hi = max((ax.get_ylim()[1] for ax in axes[: len(lrs)]), default=1.0)
    for ax in axes[: len(lrs)]:
        ax.set_ylim(bottom=math.floor(lo) - 1 if math.isfinite(lo) else None, top=hi)
    axes[0].legend(loc="lower right", fontsize=8, title="median over seeds", title_fontsize=8)
    ax = axes[len(lrs)]
    for v in variants:
        xs, meds, errs = [], [], [[], []]
        for lr in lrs:
            c = summ["cells"][v][str(lr)]
            if c["final_psnr_median"] is None or c["diverged"]:
                continue
            xs.append(lr)
            meds.append(c["final_psnr_median"])
            errs[0].append(c["final_psnr_median"] - c["final_psnr_min"])
            errs[1].append(c["final_psnr_max"] - c["final_psnr_median"])
        if xs:
            ax.errorbar(
                xs, meds, yerr=errs, label=v, color=colours.get(v), linestyle=styles.get(v, "-"), marker="o", capsize=3
            )
    if summ.get("target_median_psnr") is not None:
        ax.axhline(summ["target_median_psnr"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_title("final PSNR (no point: a seed diverged)")
    ax.set_xlabel("Adam learning rate")
    ax.set_ylabel(f"PSNR of the last {window} steps (dB)", fontsize=8)
    ax.grid(alpha=0.3)
    c = cfg
    fig.suptitle(
        f"{c['channels']} ch, {c['kernel']}x{c['kernel']}, batch {c['batch']} of {c['crop']}^2 crops; "
        f"median over seeds {list(c['seeds'])}, band min-max; dashed: spatial's best final PSNR",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="cpu", help="preset (default: cpu)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default: bench-out)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--lrs", type=float, nargs="+")
    p.add_argument("--variants", nargs="+", choices=ALL_VARIANTS)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--channels", type=int)
    p.add_argument("--kernel", type=int)
    p.add_argument("--stages", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--crop", type=int)
    p.add_argument("--window", type=int, help="steps averaged for the final PSNR and smoothing (default 50)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (cpu preset: 1)")
    p.add_argument("--no-plot", action="store_true", help="skip convergence.png")
    p.add_argument(
        "--from-results",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="train nothing: merge these results.json files (same configuration) and write table and plot",
    )
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    cfg = PRESETS[args.config]
    overrides = {
        k: getattr(args, k)
        for k in ("steps", "device", "channels", "kernel", "stages", "batch", "crop", "window", "threads")
        if getattr(args, k) is not None
    }
    for k in ("seeds", "lrs", "variants"):
        if getattr(args, k):
            overrides[k] = tuple(getattr(args, k))
    cfg = replace(cfg, **overrides)
    if cfg.steps < 1 or cfg.window < 1:
        raise SystemExit("--steps and --window must be positive")
    return cfg


def merge_results(paths: Sequence[Path], command: str) -> tuple[Config, dict[str, Any]]:
    """Runs from one or more ``results.json`` of the same configuration (e.g. a GPU sweep split over several
    calls), re-assessed with this version of the code."""
    sources = [json.loads(Path(p).read_text()) for p in paths]
    if not sources:
        raise SystemExit("--from-results needs at least one results.json")
    first = sources[0]["config"]
    fixed = ("channels", "kernel", "stages", "batch", "crop", "steps", "window", "collapse_db")
    for p, src in zip(paths, sources, strict=True):
        differ = [k for k in fixed if src["config"][k] != first[k]]
        if differ:
            raise SystemExit(f"{p}: configuration differs from {paths[0]} in {', '.join(differ)}")
    runs: dict[tuple[str, float, int], dict[str, Any]] = {}
    for src in sources:
        for r in src["runs"]:
            runs[(r["variant"], r["lr"], r["seed"])] = r
    cfg = Config(
        **{k: first[k] for k in fixed},
        lrs=tuple(sorted({k[1] for k in runs})),
        seeds=tuple(sorted({k[2] for k in runs})),
        variants=tuple(v for v in ALL_VARIANTS if any(k[0] == v for k in runs)),
        device=first["device"],
        threads=first["threads"],
    )
    merged = []
    for r in runs.values():
        merged.append({**r, **assess(r["psnr"], r["diverged_at_step"], cfg)})
    result = {
        "command": command,
        "source_commands": [src["command"] for src in sources],
        "config_name": sources[0]["config_name"],
        "config": asdict(cfg),
        "environment": sources[0]["environment"],
        "total_wall_s": round(sum(src["total_wall_s"] for src in sources), 2),
        "runs": merged,
    }
    return cfg, result


def write_outputs(result: dict[str, Any], cfg: Config, out: Path, make_plot: bool) -> str:
    result["summary"] = summarise(result["runs"], cfg)
    out.mkdir(parents=True, exist_ok=True)
    result["plot"] = "convergence.png" if make_plot and plot(result, out / "convergence.png") else None
    table = render_table(result)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return table


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to ``results.json``."""
    args = parse_args(argv)
    command = "python -m benchmarks.convergence " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.from_results:
        cfg, result = merge_results(args.from_results, command)
        say(write_outputs(result, cfg, args.out, not args.no_plot))
        return result
    cfg = make_config(args)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu (or --config cpu)")
    device = torch.device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    images = load_images(device)
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        base = Autoencoder(cfg.channels, cfg.kernel, cfg.stages)
        for lr in cfg.lrs:
            for variant in cfg.variants:
                r = train_run(variant, lr, seed, base, images, cfg, device)
                runs.append(r)
                status = f"diverged ({r['diverged_reason']})" if r["diverged"] else f"final {r['final_psnr']:.2f} dB"
                status += ", unstable" if r["unstable"] else ""
                say(f"seed {seed} lr {_fmt_lr(lr)} {variant:>10}: {status}, {r['ms_per_step']:.1f} ms/step")
    result: dict[str, Any] = {
        "command": command,
        "config_name": args.config,
        "config": asdict(cfg),
        "environment": environment(device),
        "total_wall_s": round(time.perf_counter() - t_start, 2),
        "runs": runs,
    }
    say(write_outputs(result, cfg, args.out, not args.no_plot))
    return result


if __name__ == "__main__":
    main()
