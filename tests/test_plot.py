"""spectral inspect --plot: a PNG of every layer's energy per frequency band, readable for 8 and for 200 layers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from models import copy_samples, listing, one_line, sha256, spectral

from spectral_cli import convert_state_dict

Image = pytest.importorskip("PIL.Image", reason="Pillow (with matplotlib) is not installed")
pytest.importorskip("matplotlib", reason="matplotlib is not installed")


def _many(path: Path, layers: int) -> Path:
    g = torch.Generator().manual_seed(0)
    state = {f"stage{i // 50}.block{i % 50}.conv.weight": torch.randn(4, 4, k, k, generator=g)
             for i, k in ((i, (3, 5, 7)[i % 3]) for i in range(layers))}  # fmt: skip
    torch.save(convert_state_dict(state).state_dict, path)
    return path


def test_a_plot_of_8_layers_and_of_200(tmp_path: Path) -> None:
    work = copy_samples(tmp_path, ["balle.spectral.pt"])
    result = spectral("inspect", work / "balle.spectral.pt", "--plot", work / "eight.png")
    assert result.exit_code == 0, result.stderr
    assert "plotted 8 layers to" in result.stdout.splitlines()[-1]
    small = Image.open(work / "eight.png")
    assert small.format == "PNG"
    many = _many(tmp_path / "many.pt", 200)
    assert spectral("inspect", many, "--plot", tmp_path / "many.png", "--json").exit_code == 0
    large = Image.open(tmp_path / "many.png")
    assert large.size[0] == small.size[0] and large.size[1] > 8 * small.size[1]  # a row per layer, not squeezed
    assert large.size[1] / 200 >= 15  # pixels per layer row: its label stays legible


def test_a_plot_is_never_written_over_the_input_and_needs_profiles(tmp_path: Path) -> None:
    work = copy_samples(tmp_path, ["balle.spectral.pt", "balle.pt"])
    digest = sha256(work / "balle.spectral.pt")
    result = spectral("inspect", work / "balle.spectral.pt", "--plot", work / "balle.spectral.pt")
    assert result.exit_code == 5 and "is the input" in one_line(result.stderr)
    assert sha256(work / "balle.spectral.pt") == digest
    result = spectral("inspect", work / "balle.pt", "--plot", work / "plain.png")  # no spectral layers listed
    assert result.exit_code == 6 and "--all" in one_line(result.stderr)
    assert spectral("inspect", work / "balle.pt", "--all", "--plot", work / "plain.png").exit_code == 0
    assert sorted(listing(work)) == ["balle.pt", "balle.spectral.pt", "plain.png"]


def test_without_matplotlib_the_fix_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = copy_samples(tmp_path, ["balle.spectral.pt"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = spectral("inspect", work / "balle.spectral.pt", "--plot", work / "e.png")
    assert result.exit_code == 2 and "pip install 'spectral-cli[plot]'" in one_line(result.stderr)
    assert listing(work) == ["balle.spectral.pt"]
