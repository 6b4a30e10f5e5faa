"""Kernel-size benchmark: the dense product against the separable (FFT) method, from 3x3 to 128x128 and 1-D 4096.

For each kernel size, basis and method, a fresh process transforms about ``--mib`` MiB of float32 kernels
(at least 16 kernels) to spectral coefficients and back (``to_spectral``, ``to_spatial``), on one thread (as
convert's slab workers run) or ``--threads``. Per row: the first call (which builds and caches a dense
method's matrices) and the median of ``--repeats`` warm calls, each way, and the peak memory the transform
takes above what the process held before it (``VmHWM`` reset through ``/proc/self/clear_refs``). The two
methods of a size run one after the other. ``*`` marks the method ``transform_method`` (spectral_cli.transform.kernels)
picks.

Then the acceptance file: a safetensors file holding one 1x1x128x128 float32 kernel (67 KB), converted by
``spectral convert`` in a process of its own (the I/O benchmark's child): time of the operation, of the
whole process, and peak memory above the imports.

One command::

    python -m benchmarks.kernels [--quick] [--dense-all] [--out docs/kernels.md] [--json FILE]

``--dense-all`` also runs the dense method at 128x128 (its matrices take about 10 GB and a minute to build).
``--render-from FILE`` rewrites the Markdown from a ``--json`` document without running anything.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import publish

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20

#: the sizes of the issue: common small kernels, RepLKNet's 31x31, SLaK's 51x51, 128x128 and a long Conv1d
SIZES: tuple[tuple[int, ...], ...] = ((3, 3), (7, 7), (31, 31), (51, 51), (128, 128), (4096,))
BASES = ("rfft", "rdft")
METHODS = ("dense", "separable")

#: dense matrices (float64, both directions) above this many bytes are not built unless --dense-all
DENSE_LIMIT_BYTES = 4 << 30


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def child(ks: tuple[int, ...], basis: str, method: str, kernels: int, repeats: int, threads: int) -> dict[str, Any]:
    """Transform ``kernels`` random kernels of ``ks`` both ways in this (fresh) process."""
    import torch

    from spectral_cli.transform.bases import to_spatial, to_spectral

    torch.set_num_threads(threads)
    w = torch.randn(kernels, *ks, generator=torch.Generator().manual_seed(0))
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    times: dict[str, list[float]] = {"to_spectral": [], "to_spatial": []}
    x = back = w
    for _ in range(1 + repeats):
        start = time.perf_counter()
        x = to_spectral(w, ks, basis, method=method)  # type: ignore[arg-type]
        times["to_spectral"].append(time.perf_counter() - start)
        start = time.perf_counter()
        back = to_spatial(x, ks, basis, method=method)  # type: ignore[arg-type]
        times["to_spatial"].append(time.perf_counter() - start)
    error = ((back - w).abs().max() / w.abs().max()).item()
    peak = _status("VmHWM") - before
    return {
        **{f"{k}_first": v[0] for k, v in times.items()},
        **{k: statistics.median(v[1:]) for k, v in times.items()},
        "peak_above": peak,
        "round_trip_error": error,
        "input_bytes": w.numel() * 4,
    }


def dense_matrix_bytes(ks: tuple[int, ...], basis: str) -> int:
    """Bytes of a dense method's float64 matrices (analysis and synthesis), as cached."""
    taps = math.prod(ks)
    width = taps if basis == "rdft" else 2 * math.prod((*ks[:-1], ks[-1] // 2 + 1))
    return 2 * taps * width * 8


def _run(argv: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_sizes(
    python: str, mib: float, repeats: int, threads: int, dense_all: bool, log: bool
) -> list[dict[str, Any]]:
    from spectral_cli.transform.kernels import transform_method

    rows = []
    for ks in SIZES:
        taps = math.prod(ks)
        kernels = max(16, int(mib * MIB) // (taps * 4))
        for basis in BASES:
            for method in METHODS:
                row: dict[str, Any] = {"kernel_size": list(ks), "basis": basis, "method": method,
                                       "kernels": kernels, "auto": transform_method(ks) == method}  # fmt: skip
                matrix = dense_matrix_bytes(ks, basis)
                if method == "dense" and matrix > DENSE_LIMIT_BYTES and not dense_all:
                    row["skipped"] = f"its float64 matrices alone take {matrix / (1 << 30):.1f} GiB (--dense-all)"
                else:
                    argv = [python, "-m", "benchmarks.kernels", "--child", "x".join(map(str, ks)), basis, method,
                            str(kernels), str(repeats), str(threads)]  # fmt: skip
                    row.update(_run(argv))
                rows.append(row)
                if log:
                    print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def bench_file(python: str, repeats: int, log: bool) -> dict[str, Any]:
    """``spectral convert`` of one 1x1x128x128 float32 kernel in a safetensors file, ``repeats`` times."""
    import torch
    from safetensors.torch import save_file

    from . import io as io_bench

    with tempfile.TemporaryDirectory(prefix="spectral-kernels-") as tmp:
        src, dst = Path(tmp) / "large.safetensors", Path(tmp) / "large.spectral.safetensors"
        save_file({"conv.weight": torch.randn(1, 1, 128, 128)}, str(src))
        runs = []
        for _ in range(repeats):
            dst.unlink(missing_ok=True)
            runs.append(io_bench._run_child(python, "convert", src, dst))
            if log:
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        size = src.stat().st_size
    imports = io_bench.import_torch_rss(python)
    return {
        "import_torch_seconds": imports["import_seconds"],
        "file_bytes": size,
        "seconds": statistics.median(r["seconds"] for r in runs),
        "wall": statistics.median(r["wall"] for r in runs),
        "above_imports": statistics.median(r["peak"] - r["rss_imports"] for r in runs),
        "peak": statistics.median(r["peak"] for r in runs),
        "repeats": repeats,
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Kernel sizes: dense product vs separable FFTs",
        "",
        f"Command: `{result['command']}` ({result['seconds']:.0f} s), {result['date']}",
        "",
        "Written by `python -m benchmarks.kernels`; do not edit by hand.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}. "
        f"{result['threads']} thread(s); about {result['mib']:g} MiB of float32 kernels per row (at least 16), "
        f"medians of {result['repeats']} warm calls after a first one (which builds and caches a dense method's "
        "matrices). Peak: memory the transform took above what its process held before it. `*`: the method "
        f"`transform_method` picks (dense up to {result['dense_max_taps']} taps).",
        "",
        "| kernel | basis | method | kernels | to_spectral | to_spatial | first call (both) | peak | round trip |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["sizes"]:
        ks = "x".join(map(str, r["kernel_size"])) + (" (1-D)" if len(r["kernel_size"]) == 1 else "")
        method = r["method"] + (" *" if r["auto"] else "")
        if "skipped" in r:
            lines.append(f"| {ks} | {r['basis']} | {method} | {r['kernels']} | not run: {r['skipped']} | | | | |")
            continue
        first = r["to_spectral_first"] + r["to_spatial_first"]
        lines.append(
            f"| {ks} | {r['basis']} | {method} | {r['kernels']} | {_ms(r['to_spectral'])} | {_ms(r['to_spatial'])} "
            f"| {_ms(first)} | {r['peak_above'] / MIB:.0f} MiB | {r['round_trip_error']:.1e} |"
        )
    f = result["file"]
    lines += [
        "",
        f"## A {f['file_bytes'] / 1000:.0f} KB file holding one 1x1x128x128 float32 kernel",
        "",
        f"`spectral convert` in a process of its own, median of {f['repeats']}: the operation "
        f"{_ms(f['seconds'])}, the whole process {_ms(f['wall'])} (of which `import torch` alone takes "
        f"{_ms(f['import_torch_seconds'])}); peak memory {f['above_imports'] / MIB:.0f} MiB above its imports "
        f"({f['peak'] / MIB:.0f} MiB in all). Targets: under 1 s and under 100 MB above imports.",
    ]
    return "\n".join(lines) + "\n"


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=8.0, help="MiB of float32 kernels per row (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="warm calls per row (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    p.add_argument("--file-repeats", type=int, default=5, help="converts of the 67 KB file (default 5)")
    p.add_argument("--dense-all", action="store_true", help="also build dense matrices of over 4 GiB")
    p.add_argument("--quick", action="store_true", help="1 MiB per row, 2 repeats: checks that it runs")
    p.add_argument("--python", default=sys.executable, help="interpreter of the children")
    p.add_argument("--out", type=Path, help="write the Markdown table here (e.g. docs/kernels.md)")
    p.add_argument("--json", type=Path, help="keep the whole result document here")
    p.add_argument("--render-from", type=Path, help="print (and --out) the Markdown of a --json document, run nothing")
    p.add_argument("--child", nargs=6, metavar=("KS", "BASIS", "METHOD", "KERNELS", "REPEATS", "THREADS"),
                   help=argparse.SUPPRESS)  # fmt: skip
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        ks, basis, method, kernels, repeats, threads = args.child
        size = tuple(int(n) for n in ks.split("x"))
        print(json.dumps(child(size, basis, method, int(kernels), int(repeats), int(threads))))
        return None
    if args.render_from is not None:
        result = json.loads(args.render_from.read_text())
        print(render(result))
        if args.out is not None:
            args.out.write_text(render(result))
        return result
    if args.quick:
        args.mib, args.repeats, args.file_repeats = 1.0, 2, 2
    from spectral_cli.transform.kernels import DENSE_MAX_TAPS

    start = time.perf_counter()
    result: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks.kernels", *(argv if argv is not None else sys.argv[1:])]),
        "date": _dt.date.today().isoformat(),
        "machine": _machine(),
        "mib": args.mib,
        "repeats": args.repeats,
        "threads": args.threads,
        "dense_max_taps": DENSE_MAX_TAPS,
        "sizes": bench_sizes(args.python, args.mib, args.repeats, args.threads, args.dense_all, log=True),
        "file": bench_file(args.python, args.file_repeats, log=True),
    }
    result["seconds"] = time.perf_counter() - start
    publish(result, args.json, render)
    if args.out is not None:
        args.out.write_text(render(result))
    return result


if __name__ == "__main__":
    main()
