"""Smoke test of the resume benchmark on a tiny model (not a timed test): the switch keeps what it must keep."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage", reason="the benchmark's photographs ship with scikit-image (extra: bench)")
if importlib.util.find_spec("compressai") is None:  # found, not imported: its import takes seconds of collection
    pytest.skip("could not import 'compressai'", allow_module_level=True)

# benchmarks/ is a top-level folder of the repository (on pytest's pythonpath), not part of the package.
from benchmarks import resume
from benchmarks._model import Autoencoder
from benchmarks.convergence import CropSampler, load_images

TINY = ["--channels", "6", "--stages", "2", "--batch", "2", "--crop", "16", "--prefix", "8", "--after", "25"]


@pytest.mark.slow
def test_switch_keeps_the_function_and_the_kept_run_is_the_uninterrupted_one(tmp_path: Path) -> None:
    variants = ["spatial_kept", "spatial_dropped", "spatial_s2", "rfft_dropped", "rfft_split_s3", "rdft_diagonal",
                "rdft_correlated_s5_all"]  # fmt: skip
    argv = [*TINY, "--out", str(tmp_path), "--seeds", "0", "--lrs", "1e-3", "--no-plot", "--variants", *variants]
    result = resume.main(argv)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["command"].startswith("python -m benchmarks.resume")
    assert [r["variant"] for r in written["runs"]] == variants
    runs = {r["variant"]: r for r in result["runs"]}
    # before its first update every variant computes the same function on the same batch
    first = runs["spatial_kept"]["after"][0]
    for r in runs.values():
        assert len(r["after"]) == 25 and all(math.isfinite(p) for p in r["after"])
        assert r["after"][0] == pytest.approx(first, abs=0.01)
    # spatial_kept is the run that never stopped: same batches, same state, same numbers
    cfg = resume.Config(channels=6, stages=2, batch=2, crop=16, prefix=8, after=25)
    torch.manual_seed(0)
    model = Autoencoder(cfg.channels, cfg.kernel, cfg.stages)
    straight = resume.train(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        CropSampler(load_images(torch.device("cpu")), cfg.crop, cfg.batch, 0),
        cfg.prefix + cfg.after,
    )
    assert runs["spatial_kept"]["prefix"] + runs["spatial_kept"]["after"] == straight
    assert runs["spatial_dropped"]["after"][1:] != straight[cfg.prefix + 1 :]
    table = (tmp_path / "table.md").read_text()
    assert "| rfft_split_s3 |" in table and "| spatial_kept | +0.00 (+0.00) |" in table
    # a results.json is re-rendered without training
    again = resume.main(["--from-results", str(tmp_path / "results.json"), "--out", str(tmp_path / "re"), "--no-plot"])
    assert again["summary"] == result["summary"]


def test_variant_names() -> None:
    assert resume.parse_variant("rfft_split_s10") == resume.Variant("rfft", "converted", "split", 10)
    assert resume.parse_variant("rdft_diagonal_s1_all") == resume.Variant("rdft", "converted", "diagonal", 1, True)
    assert resume.parse_variant("spatial_s5") == resume.Variant(None, "kept", reage=5, reage_all=True)
    for bad in ("rfft", "rfft_exact", "rfft_split_10", "rfft_split_s0", "rfft_split_s1_some", "dct_dropped"):
        with pytest.raises(SystemExit):
            resume.parse_variant(bad)
    assert replace(resume.Config(), after=5).after == 5
