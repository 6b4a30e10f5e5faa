"""Fixtures of the command-line tests: samples copied into a temporary directory, the repo's samples guarded."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_models"


def _digests() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(SAMPLES_DIR.iterdir()) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def _sample_models_untouched() -> Iterator[None]:
    """No test may write into sample_models/: every file there is byte-identical at the end of the session."""
    before = _digests()
    yield
    assert _digests() == before, "a test modified sample_models/"


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """A private copy of every sample checkpoint."""
    from models import copy_samples

    return copy_samples(tmp_path / "samples")
