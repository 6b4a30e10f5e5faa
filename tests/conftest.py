"""Fixtures of the command-line tests: samples copied into a temporary directory, the repo's samples guarded."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_models"

#: not collected for doctests (it has none): importing it imports Lightning, seconds of every run's collection; the
#: one test that needs it imports it
collect_ignore = ["lightning_module.py"]


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


# ---- hypothesis: a fixed budget for CI, and a seed printed in every log ----------------------------------------

#: examples per property test under the ``ci`` profile (the default); ``HYPOTHESIS_PROFILE=thorough`` runs more
CI_EXAMPLES = 40


def _hypothesis_seed(config: pytest.Config) -> int:
    """``--hypothesis-seed``, else ``HYPOTHESIS_SEED``, else a fresh random seed; printed so a run can be replayed."""
    import os
    import random

    given = config.getoption("--hypothesis-seed", default=None) or os.environ.get("HYPOTHESIS_SEED")
    try:
        return int(given) if given else random.SystemRandom().randrange(2**32)
    except ValueError:
        raise pytest.UsageError(f"hypothesis seed {given!r}: give an integer") from None


def pytest_configure(config: pytest.Config) -> None:
    import os

    from hypothesis import HealthCheck, core, settings

    common: dict[str, object] = {
        "deadline": None,  # CI machines are slow and shared: no per-example time limit
        "database": None,  # nothing written into the repository; the printed seed replays a failure
        "derandomize": False,
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    settings.register_profile("ci", max_examples=CI_EXAMPLES, **common)  # type: ignore[arg-type]
    settings.register_profile("thorough", max_examples=20 * CI_EXAMPLES, **common)  # type: ignore[arg-type]
    # the fuzz suite's long run (HYPOTHESIS_PROFILE=long): 500 examples per test; tests/test_fuzz.py sets its own
    # counts under "ci" only
    settings.register_profile("long", max_examples=500, **common)  # type: ignore[arg-type]
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    seed = _hypothesis_seed(config)
    core.global_force_seed = seed  # what --hypothesis-seed does
    config.stash[_SEED] = seed


_SEED = pytest.StashKey[int]()


def _seed_line(config: pytest.Config) -> str:
    from hypothesis import settings

    seed = config.stash[_SEED]
    return (
        f"hypothesis: profile {settings.get_current_profile_name()!r} ({settings.default.max_examples} examples), "
        f"seed {seed}; replay with HYPOTHESIS_SEED={seed}"
    )


def pytest_report_header(config: pytest.Config) -> str:
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    # -q hides the header: the summary line is in every log
    terminalreporter.write_line(_seed_line(config))
