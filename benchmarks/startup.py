"""Start-up benchmark: ``spectral --help`` and ``spectral inspect`` of a 10 GiB safetensors file, against
``python -c "import torch"``.

One command::

    python -m benchmarks.startup [--runs 10] [--size-gib 10] [--python /path/to/other/python ...]

The 10 GiB file is a valid safetensors header describing float32 conv tensors (the layout of
:mod:`benchmarks.io`) followed by a sparse hole up to the size the header declares (``os.truncate``): it
takes no disk space and is deleted afterwards. ``inspect`` lists it from the header alone, so the tensor bytes
are never read. Every command is run ``--runs`` times after one unmeasured run (which warms the page cache of
the interpreter and the packages), alternating between the commands; the figures are medians of the wall time
of the whole process, as a user waits for it. Whether the command imported torch is checked in one more run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import publish
from .io import GIB, conv_layout, float32_header

REPO = Path(__file__).resolve().parents[1]


def write_sparse_checkpoint(path: Path, size_bytes: int) -> dict[str, Any]:
    """A safetensors file whose header describes at least ``size_bytes`` of conv tensors; the data is a hole."""
    shapes = conv_layout(size_bytes)
    head, data_bytes = float32_header(shapes)
    with path.open("wb") as f:
        f.write(head)
    os.truncate(path, len(head) + data_bytes)
    st = path.stat()
    return {"bytes": st.st_size, "tensors": len(shapes), "header_bytes": len(head) - 8, "on_disk": st.st_blocks * 512}


def _spectral_argv(python: str) -> list[str]:
    """The ``spectral`` console script beside ``python`` (what a user runs), else ``python -m spectral_cli``."""
    script = Path(python).parent / "spectral"
    return [str(script)] if script.exists() else [python, "-m", "spectral_cli"]


def _wall(argv: Sequence[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return wall


def imports_torch(python: str, args: Sequence[str]) -> bool:
    """Whether ``spectral ARGS`` imports torch (run in-process by runpy, ``sys.modules`` read at exit)."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['spectral', *{list(args)!r}]\n"
        "try:\n    runpy.run_module('spectral_cli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "sys.stderr.write(f\"\\nTORCH={'torch' in sys.modules}\\n\")\n"
    )
    proc = subprocess.run([python, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    return "TORCH=True" in proc.stderr


def bench_python(python: str, file: Path, runs: int, log: bool) -> dict[str, Any]:
    spectral = _spectral_argv(python)
    commands = {
        "python -c pass": [python, "-c", "pass"],
        'python -c "import torch"': [python, "-c", "import torch"],
        "spectral --help": [*spectral, "--help"],
        "spectral inspect FILE": [*spectral, "inspect", str(file)],
        "spectral inspect FILE --json": [*spectral, "inspect", str(file), "--json"],
    }
    for argv in commands.values():
        _wall(argv)  # unmeasured: page cache
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            times[name].append(_wall(argv))
    torch_ms = statistics.median(times['python -c "import torch"'])
    rows = {}
    for name, ts in times.items():
        rows[name] = {"seconds": statistics.median(ts), "all": [round(t, 4) for t in ts],
                      "vs_import_torch": statistics.median(ts) / torch_ms}  # fmt: skip
    rows["spectral --help"]["imports_torch"] = imports_torch(python, ["--help"])
    rows["spectral inspect FILE"]["imports_torch"] = imports_torch(python, ["inspect", str(file)])
    version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, check=False).stdout.strip()  # fmt: skip
    if log:
        for name, row in rows.items():
            print(f"startup: {python}: {name}: {row['seconds']:.3f} s", file=sys.stderr)
    return {"python": python, "spectral": " ".join(spectral), "torch": version, "rows": rows}


def run(runs: int = 10, size_gib: float = 10.0, pythons: Sequence[str] = (), log: bool = True) -> dict[str, Any]:
    pythons = [os.path.abspath(p) for p in pythons] or [sys.executable]
    work = Path(tempfile.mkdtemp(prefix="spectral-bench-startup-"))
    try:
        file = work / "big.safetensors"
        info = write_sparse_checkpoint(file, int(size_gib * GIB))
        results = [bench_python(p, file, runs, log) for p in pythons]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"file": info, "runs": runs, "interpreters": results}


def render(result: dict[str, Any]) -> str:
    info = result["file"]
    lines = [
        f"FILE: a {info['bytes'] / GIB:.2f} GiB safetensors file, {info['tensors']} float32 conv tensors, header "
        f"{info['header_bytes'] / 1024:.0f} KiB (the data is a sparse hole: {info['on_disk'] / 2**20:.1f} MiB on "
        f"disk). Wall time of the whole process, median of {result['runs']} runs after one unmeasured run.",
        "",
    ]
    for interp in result["interpreters"]:
        lines += [
            f"Interpreter `{interp['python']}` (torch {interp['torch']}), `spectral` = `{interp['spectral']}`",
            "",
            '| command | wall (s) | / `python -c "import torch"` | imports torch |',
            "|---|---|---|---|",
        ]
        for name, row in interp["rows"].items():
            torch_cell = {True: "yes", False: "no"}.get(row.get("imports_torch"), "")  # type: ignore[call-overload]
            lines.append(f"| `{name}` | {row['seconds']:.3f} | {row['vs_import_torch']:.2f} | {torch_cell} |")
        lines.append("")
        raw = "; ".join(f"{name}: {row['all']}" for name, row in interp["rows"].items())
        lines += [f"Raw wall times (s): {raw}", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--size-gib", type=float, default=10.0)
    p.add_argument("--python", action="append", default=[], help="interpreter(s) to measure (default: this one)")
    p.add_argument("--json", type=Path, help="also write the result document here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args.runs, args.size_gib, args.python)
    return publish(result, args.json, render)


if __name__ == "__main__":
    main()
