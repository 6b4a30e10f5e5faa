"""Smoke test of the convergence benchmark: a handful of steps on every variant (not a timed test)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("skimage", reason="the benchmark's photographs ship with scikit-image (extra: bench)")
if importlib.util.find_spec("compressai") is None:  # found, not imported: its import takes seconds of collection
    pytest.skip("could not import 'compressai'", allow_module_level=True)
pytest.importorskip("pytorch_parametrizations")

# benchmarks/ is a top-level folder of the repository (on pytest's pythonpath), not part of the package.
from benchmarks import convergence


@pytest.mark.slow
def test_convergence_smoke(tmp_path: Path) -> None:
    variants = list(convergence.ALL_VARIANTS)
    argv = [
        "--config",
        "cpu",
        "--out",
        str(tmp_path),
        "--steps",
        "6",
        "--window",
        "3",
        "--seeds",
        "0",
        "1",
        "--lrs",
        "1e-4",
        "1e-3",
        "--channels",
        "8",
        "--stages",
        "2",
        "--batch",
        "2",
        "--crop",
        "16",
        "--no-plot",
        "--quiet",
        "--variants",
        *variants,
    ]
    result = convergence.main(argv)

    written = json.loads((tmp_path / "results.json").read_text())
    assert written["command"].startswith("python -m benchmarks.convergence --config cpu")
    assert {"config", "environment", "runs", "summary", "total_wall_s"} <= written.keys()
    assert written["environment"]["versions"]["torch"]
    assert len(written["runs"]) == len(variants) * 2 * 2
    for run in written["runs"]:
        assert run["variant"] in variants
        assert run["steps_run"] == 6
        assert len(run["psnr"]) == 6
        assert all(math.isfinite(p) for p in run["psnr"])
        assert math.isfinite(run["final_psnr"])
        assert isinstance(run["diverged"], bool) and isinstance(run["unstable"], bool)
    summary = written["summary"]
    assert summary["spatial_best_lr"] in (1e-4, 1e-3)
    assert set(summary["cells"]) == set(variants)
    assert set(summary["at_best_lr"]) == set(variants)
    assert result["summary"] == summary

    # Same initial network and crops for every variant: the first step's loss agrees to float rounding.
    first = {(r["variant"], r["lr"], r["seed"]): r["psnr"][0] for r in written["runs"]}
    for (_, lr, seed), p in first.items():
        assert p == pytest.approx(first[("spatial", lr, seed)], abs=1e-3)
    # rfft (matrix) and the peer (irfftn) are the same map: identical trajectories up to rounding.
    for run in written["runs"]:
        if run["variant"] == "peer":
            ours = next(
                r
                for r in written["runs"]
                if r["variant"] == "rfft" and r["lr"] == run["lr"] and r["seed"] == run["seed"]
            )
            assert run["psnr"] == pytest.approx(ours["psnr"], abs=1e-2)

    table = (tmp_path / "table.md").read_text()
    assert "Final PSNR" in table and "Steps to reach" in table
    assert not (tmp_path / "convergence.png").exists()

    # Re-rendering from the stored runs (how a sweep split over several calls is merged) gives the same summary.
    merged = convergence.main(
        ["--from-results", str(tmp_path / "results.json"), "--out", str(tmp_path / "merged"), "--no-plot", "--quiet"]
    )
    assert merged["summary"] == summary
    assert (tmp_path / "merged" / "table.md").read_text().split("\n", 3)[3] == table.split("\n", 3)[3]
