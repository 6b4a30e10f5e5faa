"""Training-step overhead of the spectral parametrization: step time with it / without it.

One command::

    python -m benchmarks.train_step [--device cpu|cuda] [--preset NAME] [--repeats 7] [--steps 10]

The model (``--preset``): a Ballé-style conv+GDN autoencoder (``stages`` x (5x5 conv stride 2 + GDN), mirrored
with transposed convs and IGDN; CompressAI's ``GDN``) trained with Adam on an MSE loss, or torchvision's
ResNet-50 (random weights) trained with Adam on cross-entropy against fixed random labels; optionally in
``channels_last`` and under bf16 ``torch.autocast`` (preset ``gpu-resnet50``: batch 64 of 224x224, both). The
same initial network is timed as

``spatial``
    plain conv kernels (the reference of every ratio);
``rfft``
    ``spectral_cli.register_spectral_parametrization`` with the default basis (half spectrum, as one matrix
    product);
``rdft``
    the same with ``basis="rdft"`` (orthonormal real DFT, one matrix product);
``peer``
    ``pytorch_parametrizations.spectral.utils.register_spectral_parametrization`` 1.0.0 (``irfftn``).

each eager and under ``torch.compile`` (the model compiled; the optimizer step eager). A step is
``zero_grad``, forward, MSE, backward, ``Adam.step``. After a warm-up (which for ``torch.compile`` includes
compiling), every repeat times ``--steps`` consecutive steps of each of the 8 configurations in turn (the order
rotates from repeat to repeat), so that all see the same machine load; the ratio of a configuration is the
median over repeats of its time / the time of ``spatial`` in the same mode and repeat.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._common import publish
from ._model import Autoencoder

VARIANTS: tuple[str, ...] = ("spatial", "rfft", "rdft", "peer")
MODES: tuple[str, ...] = ("eager", "compile")


@dataclass(frozen=True)
class Config:
    channels: int
    kernel: int
    stages: int
    batch: int
    crop: int
    threads: int | None
    model: str = "autoencoder"  # or "resnet50" (channels, kernel and stages are the autoencoder's)
    channels_last: bool = False
    autocast: str | None = None  # "bfloat16": forward and loss under torch.autocast


MODELS: tuple[str, ...] = ("autoencoder", "resnet50")


PRESETS: dict[str, Config] = {
    # 2 shared CPU cores, one thread: about 0.17 s a step here
    "cpu": Config(channels=64, kernel=5, stages=3, batch=8, crop=128, threads=1),
    # the convergence benchmark's CPU model (32 channels) on 64x64 crops: about 15 ms a step, where the fixed
    # cost of each parametrized weight (a few small operations per conv, forward and backward) shows most
    "cpu-small": Config(channels=32, kernel=5, stages=3, batch=8, crop=64, threads=1),
    # the figures of docs/spectral-math.md: 128 channels, 5x5 kernels, batch 32 of 256x256
    "gpu": Config(channels=128, kernel=5, stages=4, batch=32, crop=256, threads=None),
    # the same in channels_last under bf16 autocast, as the ResNet-50 row
    "gpu-bf16": Config(channels=128, kernel=5, stages=4, batch=32, crop=256, threads=None, channels_last=True,
                       autocast="bfloat16"),
    # torchvision's ResNet-50, batch 64 of 224x224, channels_last, bf16 autocast
    "gpu-resnet50": Config(channels=0, kernel=0, stages=0, batch=64, crop=224, threads=None, model="resnet50",
                           channels_last=True, autocast="bfloat16"),
    # the same network on 2 CPU cores, small enough to check that it runs (not a figure to quote)
    "cpu-resnet50": Config(channels=0, kernel=0, stages=0, batch=2, crop=64, threads=1, model="resnet50",
                           channels_last=True, autocast="bfloat16"),
}  # fmt: skip


def build(cfg: Config, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """The initial network, its fixed input batch and (for a classifier) its fixed labels."""
    torch.manual_seed(0)
    if cfg.model == "resnet50":
        from torchvision.models import resnet50

        model: nn.Module = resnet50(weights=None)
        labels: torch.Tensor | None = torch.randint(0, 1000, (cfg.batch,), device=device)
    elif cfg.model == "autoencoder":
        model, labels = Autoencoder(cfg.channels, cfg.kernel, cfg.stages), None
    else:
        raise ValueError(f"unknown model {cfg.model!r}: one of {MODELS}")
    x = torch.rand(cfg.batch, 3, cfg.crop, cfg.crop, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x, labels


def _register(variant: str, model: nn.Module) -> None:
    if variant in ("rfft", "rdft"):
        from spectral_cli import register_spectral_parametrization

        register_spectral_parametrization(model, basis=variant)  # type: ignore[arg-type]
    elif variant == "peer":
        from pytorch_parametrizations.spectral.utils import register_spectral_parametrization as peer

        peer(model)


class Trainer:
    """One configuration: its model, optimizer and a fixed batch; ``steps(n)`` runs and times ``n`` steps."""

    def __init__(
        self,
        variant: str,
        mode: str,
        base: nn.Module,
        batch: tuple[torch.Tensor, torch.Tensor | None],
        cfg: Config,
        device: torch.device,
    ) -> None:
        self.name = f"{variant}/{mode}"
        model = copy.deepcopy(base)
        if cfg.channels_last:  # before registering: rfft's rank-5 coefficients cannot take channels_last
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        _register(variant, model)
        self.model = model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.model) if mode == "compile" else self.model  # type: ignore[assignment]
        )
        (self.x, self.labels), self.device = batch, device
        self.autocast = getattr(torch, cfg.autocast) if cfg.autocast else None

    def loss(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            out = self.forward(self.x)
            if self.labels is not None:
                return nn.functional.cross_entropy(out, self.labels)
            return torch.mean((out.float() - self.x) ** 2)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def steps(self, n: int) -> float:
        """Seconds per step over ``n`` consecutive steps."""
        self._sync()
        start = time.perf_counter()
        for _ in range(n):
            self.optimizer.zero_grad(set_to_none=True)
            self.loss().backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
        self._sync()
        return (time.perf_counter() - start) / n


def run(
    cfg: Config,
    device: str = "cpu",
    repeats: int = 7,
    steps: int = 10,
    warmup: int = 3,
    variants: Sequence[str] = VARIANTS,
    modes: Sequence[str] = MODES,
    log: bool = True,
) -> dict[str, Any]:
    """Time every (variant, mode), interleaved; the result document."""
    dev = torch.device(device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    base, x, labels = build(cfg, dev)
    trainers = [Trainer(v, m, base, (x, labels), cfg, dev) for m in modes for v in variants]
    warm: dict[str, float] = {}
    for t in trainers:
        start = time.perf_counter()
        t.steps(warmup)
        warm[t.name] = time.perf_counter() - start
        if log:
            print(f"train_step: warm-up {t.name}: {warm[t.name]:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {t.name: [] for t in trainers}
    for r in range(repeats):
        shift = r % len(trainers)
        for t in trainers[shift:] + trainers[:shift]:
            times[t.name].append(t.steps(steps))
        if log:
            line = "  ".join(f"{name} {ts[-1] * 1e3:.1f}" for name, ts in times.items())
            print(f"train_step: [{r + 1}/{repeats}] ms/step: {line}", file=sys.stderr, flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for variant in variants:
        rows[variant] = {}
        for mode in modes:
            own, ref = times[f"{variant}/{mode}"], times[f"spatial/{mode}"]
            rows[variant][mode] = {
                "ms": 1e3 * statistics.median(own),
                "ratio": statistics.median(a / b for a, b in zip(own, ref, strict=True)),
                "ms_all": [round(1e3 * t, 3) for t in own],
                "warmup_s": warm[f"{variant}/{mode}"],
            }
    convs = sum(1 for m in base.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    params = sum(p.numel() for p in base.parameters())
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "preset": next((name for name, preset in PRESETS.items() if preset == cfg), "custom"),
        "config": asdict(cfg),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "steps": steps,
        "warmup": warmup,
        "model": {"convs": convs, "params": params},
        "rows": rows,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


def render(result: dict[str, Any]) -> str:
    """A Markdown table of a :func:`run` result."""
    cfg = result["config"]
    modes = [m for m in MODES if m in next(iter(result["rows"].values()))]
    if cfg.get("model", "autoencoder") == "resnet50":
        net = "torchvision ResNet-50 (random weights)"
        task = "Adam, cross-entropy on fixed random labels"
    else:
        net = (f"{cfg['stages']} x (conv {cfg['kernel']}x{cfg['kernel']} stride 2 + GDN) and the mirror with IGDN, "
               f"{cfg['channels']} channels")  # fmt: skip
        task = "Adam, MSE"
    extras = ", channels_last" if cfg.get("channels_last") else ""
    extras += f", {cfg['autocast']} autocast" if cfg.get("autocast") else ""
    lines = [
        f"Preset `{result.get('preset', 'custom')}`. Device: {result['device']} ({result['device_name']}), "
        f"{result['torch_threads']} torch thread(s){', torch ' + result['torch'] if 'torch' in result else ''}. Model: "
        f"{net}, {result['model']['convs']} convs, {result['model']['params']:,} parameters; "
        f"{task}; batch {cfg['batch']} of {cfg['crop']}x{cfg['crop']}{extras}. Median of {result['repeats']} "
        f"interleaved repeats of {result['steps']} steps each, after {result['warmup']} warm-up steps.",
        "",
        "| variant | " + " | ".join(f"{m} ms/step | {m} ratio" for m in modes) + " |",
        "|---|" + "---|---|" * len(modes),
    ]
    names = {"spatial": "spatial (reference)", "rfft": "rfft (ours, default)", "rdft": "rdft (ours)",
             "peer": "pytorch-parametrizations 1.0.0 (peer)"}  # fmt: skip
    for variant, row in result["rows"].items():
        cells = " | ".join(f"{row[m]['ms']:.2f} | {row[m]['ratio']:.3f}" for m in modes)
        lines.append(f"| {names.get(variant, variant)} | {cells} |")
    lines.append("")
    raw = "; ".join(f"{variant}/{m}: {row[m]['ms_all']}" for variant, row in result["rows"].items() for m in modes)
    lines += [f"Raw ms/step per repeat: {raw}", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model and batch (default: gpu on cuda, else cpu)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps timed per configuration and repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--channels", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--crop", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path, help="also write the result document here")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    cfg = PRESETS[args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")]
    changes = {k: getattr(args, k) for k in ("channels", "batch", "crop", "threads") if getattr(args, k) is not None}
    return replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if "spatial" not in args.variants:
        args.variants = ["spatial", *args.variants]
    result = run(config_from(args), args.device, args.repeats, args.steps, args.warmup, args.variants, args.modes)
    return publish(result, args.json, render)


if __name__ == "__main__":
    main()
