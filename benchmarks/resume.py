"""Resume benchmark: a spatially trained network switched to spectral kernels mid-run, with Adam's state kept,
dropped or converted (:mod:`spectral_cli.transform.optimizer`).

The model, data, PSNR and smoothing are those of :mod:`benchmarks.convergence` (its CPU preset). For each seed
and learning rate one spatial run of ``--prefix`` steps is shared by every variant (model, optimizer and the
crop generator copied at the switch), then each variant continues ``--after`` steps on the same batches:

``spatial_kept``
    plain kernels, Adam's state kept (what an uninterrupted run does: the reference);
``spatial_dropped``
    plain kernels, a fresh Adam;
``<basis>_dropped``
    the kernels converted, a fresh Adam (what ``spectral convert`` does on main: the state is dropped);
``<basis>_<v>``
    the kernels converted and Adam's state converted: ``exp_avg`` exactly, ``exp_avg_sq`` by the ``v``
    approximation (``diagonal`` or ``correlated``);
``<basis>_<v>_s<s>``
    as ``<basis>_<v>``, the converted weights' states re-aged to step ``s``.

Figures per variant: the dip (the minimum PSNR over the first 20 steps after the switch, minus that of
``spatial_kept``: the batches are the same), and the smoothed PSNR (trailing mean of 50 steps, as
convergence.py) at +100, +300 and +1000 steps after the switch.

One command (the default variants to +1000 steps: 62 000 steps, about 25 min at 25 ms a step; docs/resume.md
lists the runs it reports, which a loaded 2-core machine split in four)::

    nice -n 10 python -m benchmarks.resume --out /tmp/resume

writes ``results.json``, ``table.md`` and ``resume.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._model import Autoencoder
from .convergence import PRESETS, CropSampler, environment, load_images, psnr_from_mse, trailing_mean

BASES: tuple[str, ...] = ("rfft", "rdft")
SECOND: tuple[str, ...] = ("diagonal", "correlated", "split")
#: the variants run unless --variants names others
DEFAULT_VARIANTS: tuple[str, ...] = (
    "spatial_kept",
    "spatial_dropped",
    "rfft_dropped",
    "rfft_diagonal",
    "rfft_correlated",
    "rfft_diagonal_s1",
    "rfft_diagonal_s10",
    "rdft_dropped",
    "rdft_diagonal",
    "rdft_diagonal_s1",
)
DIP_STEPS = 20
AT_STEPS: tuple[int, ...] = (100, 300, 1000)
NO_DIP_DB = 0.5


@dataclass(frozen=True)
class Config:
    """The benchmark's configuration (model and data: the convergence CPU preset)."""

    channels: int = PRESETS["cpu"].channels
    kernel: int = PRESETS["cpu"].kernel
    stages: int = PRESETS["cpu"].stages
    batch: int = PRESETS["cpu"].batch
    crop: int = PRESETS["cpu"].crop
    prefix: int = 300
    after: int = 1000
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    window: int = 50
    threads: int = 1


@dataclass(frozen=True)
class Variant:
    """What happens at the switch."""

    basis: str | None  # None: the kernels stay spatial
    state: str  # "kept", "dropped" or "converted"
    second: str = "correlated"
    reage: int | None = None
    reage_all: bool = False  # re-age every parameter's state, not only the converted weights'


def _reage_suffix(name: str, part: str) -> int:
    if not (part.startswith("s") and part[1:].isdigit() and int(part[1:]) > 0):
        raise SystemExit(f"variant {name!r}: the re-aging suffix is s<steps>, e.g. s50")
    return int(part[1:])


def parse_variant(name: str) -> Variant:
    """``spatial_kept``, ``spatial_dropped``, ``spatial_s<steps>`` (kept, every state re-aged),
    ``<basis>_dropped``, ``<basis>_<second>``, ``<basis>_<second>_s<steps>`` (the converted weights' states
    re-aged) or ``<basis>_<second>_s<steps>_all`` (every parameter's state re-aged)."""
    parts = name.split("_")
    if parts[0] == "spatial" and len(parts) == 2:
        if parts[1] in ("kept", "dropped"):
            return Variant(None, parts[1])
        return Variant(None, "kept", reage=_reage_suffix(name, parts[1]), reage_all=True)
    if parts[0] in BASES and parts[1:] == ["dropped"]:
        return Variant(parts[0], "dropped")
    if parts[0] in BASES and len(parts) in (2, 3, 4) and parts[1] in SECOND:
        if len(parts) == 4 and parts[3] != "all":
            raise SystemExit(f"variant {name!r}: the only suffix after s<steps> is _all")
        reage = _reage_suffix(name, parts[2]) if len(parts) > 2 else None
        return Variant(parts[0], "converted", parts[1], reage, len(parts) == 4)
    raise SystemExit(f"unknown variant {name!r}: see python -m benchmarks.resume --help")


def _reaged(state: dict[str, Any], s: int, betas: tuple[float, float]) -> dict[str, Any]:
    """An Adam state re-aged to step ``s`` (see spectral_cli.transform.optimizer.reage_factor)."""
    from spectral_cli.transform.optimizer import reage_factor

    if not state or float(state["step"]) <= s:
        return state
    t = float(state["step"])
    f1, f2 = reage_factor(betas[0], t, s), reage_factor(betas[1], t, s)
    out = {**state, "step": torch.full_like(state["step"], s), "exp_avg": state["exp_avg"] * f1}
    out["exp_avg_sq"] = state["exp_avg_sq"] * f2
    return out


# ------------------------------------------------------------------------------------------------ the switch


def switch(variant: Variant, model: nn.Module, optimizer: torch.optim.Adam) -> tuple[nn.Module, torch.optim.Adam]:
    """The network and optimizer that continue after the switch: copies, so the shared prefix stays intact."""
    from spectral_cli import register_spectral_parametrization
    from spectral_cli.transform.optimizer import convert_state

    model = copy.deepcopy(model)
    old_state = copy.deepcopy(optimizer.state_dict())
    group = optimizer.param_groups[0]
    names = [n for n, _ in model.named_parameters()]  # the order the optimizer was built in
    by_name = {n: old_state["state"].get(i, {}) for i, n in enumerate(names)}
    if variant.basis is not None:
        register_spectral_parametrization(model, basis=variant.basis)  # type: ignore[arg-type]
    new = torch.optim.Adam(model.parameters(), lr=group["lr"], betas=group["betas"], eps=group["eps"])
    if variant.state == "dropped":
        return model, new
    suffix = ".parametrizations.weight.original"
    for name, p in model.named_parameters():
        if name.endswith(suffix):
            prefix = name[: -len(suffix)]
            module = model.get_submodule(prefix)
            ks = tuple(module.parametrizations.weight[0].kernel_size)  # type: ignore[union-attr,index]
            converted = convert_state(
                by_name[prefix + ".weight"],
                "Adam",
                ks,
                variant.basis,  # type: ignore[arg-type]
                "to_spectral",
                second_moment=variant.second,
                reage_to=variant.reage,
                betas=group["betas"],
            )
            assert converted.state is not None, converted.reason
            new.state[p] = converted.state
        elif variant.reage_all and variant.reage is not None:
            new.state[p] = _reaged(by_name[name], variant.reage, group["betas"])
        else:
            new.state[p] = by_name[name]
    return model, new


# ------------------------------------------------------------------------------------------------- training


def train(model: nn.Module, optimizer: torch.optim.Optimizer, sampler: CropSampler, steps: int) -> list[float]:
    """``steps`` Adam steps; the PSNR of each step's batch before its update (stops at a non-finite loss)."""
    losses = torch.empty(steps)
    done = 0
    for step in range(steps):
        x = sampler()
        loss = torch.mean((model(x) - x) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        done = step + 1
        if not math.isfinite(float(losses[step])):
            break
    return [round(p, 3) for p in psnr_from_mse(losses[:done].double()).tolist()]


def run_cell(seed: int, lr: float, images: list[torch.Tensor], cfg: Config, say: Any) -> list[dict[str, Any]]:
    """The shared spatial prefix of a seed and learning rate, then every variant from it."""
    torch.manual_seed(seed)
    model = Autoencoder(cfg.channels, cfg.kernel, cfg.stages)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    sampler = CropSampler(images, cfg.crop, cfg.batch, seed)
    t0 = time.perf_counter()
    prefix = train(model, optimizer, sampler, cfg.prefix)
    say(f"seed {seed} lr {lr:g}: prefix {len(prefix)} steps, last 50 {statistics.fmean(prefix[-50:]):.2f} dB, "
        f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    generator_state = sampler.generator.get_state()
    runs = []
    for name in cfg.variants:
        t0 = time.perf_counter()
        m, opt = switch(parse_variant(name), model, optimizer)
        s = CropSampler(images, cfg.crop, cfg.batch, seed)
        s.generator.set_state(generator_state)
        after = train(m, opt, s, cfg.after)
        wall = time.perf_counter() - t0
        runs.append(
            {"variant": name, "seed": seed, "lr": lr, "prefix": prefix, "after": after, "wall_s": round(wall, 2)}
        )
        say(f"  {name:>24}: first-20 min {min(after[:DIP_STEPS]):6.2f}, last 50 "
            f"{statistics.fmean(after[-50:]):6.2f} dB, {1000 * wall / max(len(after), 1):.1f} ms/step")  # fmt: skip
    return runs


# -------------------------------------------------------------------------------------------------- summary


def figures(run: dict[str, Any], reference: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Dip and smoothed PSNR at +k of one run, against the spatial_kept run of its seed and learning rate.

    A run has diverged at +k when its loss went non-finite before, or its smoothed PSNR there is below the
    untrained network's first step (convergence.py's rule): its +k is then None, left out of the means.
    """
    after = run["after"]
    stopped = len(after) < cfg.after or not all(math.isfinite(p) for p in after)
    smooth = trailing_mean(run["prefix"] + after, cfg.window)
    untrained = run["prefix"][0]
    at: dict[str, float | None] = {}
    for k in AT_STEPS:
        i = cfg.prefix + k - 1
        ok = k <= len(after) and (k < len(after) or not stopped) and smooth[i] >= untrained
        at[str(k)] = round(smooth[i], 3) if ok else None
    low = min(after[:DIP_STEPS]) if after else -math.inf
    return {
        "min20": low,
        "dip": round(low - min(reference["after"][:DIP_STEPS]), 3),
        "at": at,
        "diverged": stopped or smooth[-1] < untrained,
    }


def summarise(runs: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Per run figures; per variant and lr the mean, min and max over seeds; the goal check."""
    refs = {(r["seed"], r["lr"]): r for r in runs if r["variant"] == "spatial_kept"}
    for r in runs:
        r["figures"] = figures(r, refs[(r["seed"], r["lr"])], cfg)
    cells: dict[str, dict[str, Any]] = {}
    for v in cfg.variants:
        cells[v] = {}
        for lr in cfg.lrs:
            rs = [r for r in runs if r["variant"] == v and r["lr"] == lr]
            dips = [r["figures"]["dip"] for r in rs]
            c: dict[str, Any] = {"n": len(rs), "diverged": sum(r["figures"]["diverged"] for r in rs)}
            c["dip_mean"], c["dip_worst"] = round(statistics.fmean(dips), 3), min(dips)
            for k in AT_STEPS:
                vals = [r["figures"]["at"][str(k)] for r in rs]
                ok = [x for x in vals if x is not None]
                c[f"at{k}_mean"] = round(statistics.fmean(ok), 3) if ok else None  # diverged runs left out
                c[f"at{k}"] = vals
            cells[v][str(lr)] = c
    goal = {}
    for v in cfg.variants:
        basis = parse_variant(v).basis
        if basis is None or parse_variant(v).state != "converted":
            continue
        checks = []
        for lr in cfg.lrs:
            c, d = cells[v][str(lr)], cells.get(f"{basis}_dropped", {}).get(str(lr))
            no_dip = c["dip_worst"] >= -NO_DIP_DB
            gain = None if d is None or c["at300_mean"] is None or d["at300_mean"] is None else (
                c["at300_mean"] >= d["at300_mean"])  # fmt: skip
            checks.append({"lr": lr, "no_dip": no_dip, "at300_at_least_dropped": gain})
        goal[v] = checks
    return {"cells": cells, "goal": goal}


def _f(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def _goal_mark(goal: dict[str, Any] | None) -> str:
    if goal is None:
        return ""
    if goal["no_dip"] and goal["at300_at_least_dropped"]:
        return "yes"
    misses = ([] if goal["no_dip"] else ["dip"]) + (
        ["below dropped"] if goal["at300_at_least_dropped"] is False else []
    )
    return ", ".join(misses)


def render_table(result: dict[str, Any]) -> str:
    cfg, summ = result["config"], result["summary"]
    lines = [
        f"# Resume after {cfg['prefix']} spatial steps: {len(cfg['seeds'])} seeds, Adam lr "
        + ", ".join(f"{lr:g}" for lr in cfg["lrs"]),
        "",
        f"Dip: min PSNR over the first {DIP_STEPS} steps after the switch minus spatial_kept's (same batches); "
        f"mean over seeds (worst seed). +k: PSNR, trailing mean of {cfg['window']} steps, at k steps after the "
        f"switch; mean over the seeds that had not diverged by then. Goal: dip within {NO_DIP_DB} dB for every "
        "seed, and +300 at least the dropped run's of the same basis.",
        "",
    ]
    ks = [k for k in AT_STEPS if k <= cfg["after"]]
    for lr in cfg["lrs"]:
        lines += [
            f"## lr {lr:g}",
            "",
            "| variant | dip dB, mean (worst) | " + " | ".join(f"+{k}" for k in ks) + " | goal |",
            "|---|---|" + "---|" * len(ks) + "---|",
        ]
        for v in cfg["variants"]:
            c = summ["cells"][v][str(lr)]
            goal = next((g for g in summ["goal"].get(v, []) if g["lr"] == lr), None)
            mark = _goal_mark(goal)
            div = f" ({c['diverged']} diverged)" if c["diverged"] else ""
            lines.append(
                f"| {v}{div} | {_f(c['dip_mean'], True)} ({_f(c['dip_worst'], True)}) | "
                + " | ".join(_f(c[f"at{k}_mean"]) for k in ks)
                + f" | {mark} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """Per learning rate and basis: the first 60 steps after the switch (per-step PSNR, median over seeds) and
    the whole continuation (trailing mean, median over seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cfg = result["config"]
    lrs, variants, window, prefix = cfg["lrs"], cfg["variants"], cfg["window"], cfg["prefix"]
    fig, grid = plt.subplots(len(lrs), 2 * len(BASES), figsize=(18, 3.8 * len(lrs)), squeeze=False)
    palette = plt.get_cmap("tab10")
    for row, lr in enumerate(lrs):
        for b, basis in enumerate(BASES):
            shown = [v for v in variants if v.startswith(("spatial_", f"{basis}_"))]
            zoom, full = grid[row][2 * b], grid[row][2 * b + 1]
            for i, v in enumerate(shown):
                rs = [r for r in result["runs"] if r["variant"] == v and r["lr"] == lr]
                n = min(len(r["after"]) for r in rs)
                style = {"color": "black" if v == "spatial_kept" else palette(i % 10),
                         "linestyle": "--" if v.endswith("dropped") else "-", "linewidth": 1.2, "label": v}  # fmt: skip
                raw = [statistics.median(r["after"][j] for r in rs) for j in range(min(n, 60))]
                zoom.plot(range(1, len(raw) + 1), raw, **style)
                curves = [trailing_mean(r["prefix"] + r["after"][:n], window)[prefix:] for r in rs]
                med = [statistics.median(c[j] for c in curves) for j in range(n)]
                full.plot(range(1, n + 1), med, **style)
            zoom.set_title(f"{basis}, lr {lr:g}: first 60 steps (per step)", fontsize=9)
            full.set_title(f"{basis}, lr {lr:g}: {window}-step trailing mean", fontsize=9)
            for ax in (zoom, full):
                ax.set_xlabel("steps after the switch", fontsize=8)
                ax.grid(alpha=0.3)
            zoom.set_ylabel("PSNR dB, median of seeds", fontsize=8)
            full.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"switch to spectral after {prefix} spatial Adam steps ({len(cfg['seeds'])} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.resume", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-out-resume"))
    p.add_argument("--prefix", type=int, help="spatial steps before the switch (default 300)")
    p.add_argument("--after", type=int, help="steps after the switch (default 1000)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--lrs", type=float, nargs="+")
    p.add_argument("--variants", nargs="+", help="default: " + " ".join(DEFAULT_VARIANTS))
    p.add_argument("--channels", type=int)
    p.add_argument("--stages", type=int)
    p.add_argument("--crop", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--from-results", type=Path, help="train nothing: re-render this results.json")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to ``results.json``."""
    args = parse_args(argv)
    command = "python -m benchmarks.resume " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.from_results:
        result = json.loads(args.from_results.read_text())
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()})
        done = result["runs"]  # a run stopped early holds fewer seeds (whole seed and lr cells only)
        cfg = replace(cfg, seeds=tuple(s for s in cfg.seeds if any(r["seed"] == s for r in done)),
                      lrs=tuple(lr for lr in cfg.lrs if any(r["lr"] == lr for r in done)))  # fmt: skip
        result["config"] = asdict(cfg)
    else:
        overrides = {k: getattr(args, k) for k in ("prefix", "after", "channels", "stages", "crop", "batch",
                                                    "threads") if getattr(args, k) is not None}  # fmt: skip
        for k in ("seeds", "lrs", "variants"):
            if getattr(args, k):
                overrides[k] = tuple(getattr(args, k))
        cfg = replace(Config(), **overrides)
        names = list(cfg.variants)
        for name in names:
            parse_variant(name)
        if "spatial_kept" not in names:
            cfg = replace(cfg, variants=("spatial_kept", *names))
        if cfg.after < DIP_STEPS or cfg.prefix < 1:
            raise SystemExit(f"--after must be at least {DIP_STEPS} and --prefix positive")
        torch.set_num_threads(cfg.threads)
        images = load_images(torch.device("cpu"))
        t0 = time.perf_counter()
        runs = []
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"command": command, "config": asdict(cfg), "environment": environment(torch.device("cpu"))}
        for seed in cfg.seeds:
            for lr in cfg.lrs:
                runs += run_cell(seed, lr, images, cfg, lambda s: print(s, flush=True))
                # what is done so far, so that a run stopped early can still be rendered (--from-results)
                result.update(total_wall_s=round(time.perf_counter() - t0, 1), runs=runs)
                (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    result["summary"] = summarise(result["runs"], cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    result["plot"] = "resume.png" if not args.no_plot and plot(result, args.out / "resume.png") else None
    table = render_table(result)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
