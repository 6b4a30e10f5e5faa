"""The README says what the code does: its exit-code table is the code's, its layer map names every module."""

from __future__ import annotations

import re
from pathlib import Path

from spectral_cli.errors import EXIT_CODES

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_the_exit_code_table_is_the_codes() -> None:
    section = README[README.index("## Exit codes") : README.index("## Security")]
    rows = dict(re.findall(r"^\| (\S+) \| (.+) \|$", section, re.M))
    rows.pop("code")
    assert rows == EXIT_CODES


def test_the_layer_map_names_every_module() -> None:
    layers = README[README.index("Code layers, lower never importing upper") :]
    package = REPO / "spectral_cli"
    modules = [p for p in package.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    modules = [p for p in modules if p.parent.name != "spectral"]  # the seed package's import path, kept as is
    missing = [str(p.relative_to(package)) for p in modules if f"`{p.stem}`" not in layers and p.name not in layers]
    assert not missing, missing
    for folder in ("transform", "statedict", "files"):
        assert f"spectral_cli/{folder}/" in layers


def test_the_public_api_table_is_the_exported_names() -> None:
    import spectral_cli

    section = README[README.index("### Public API") : README.index("## Which basis")]
    names = re.findall(r"^\| `(\w+)` \| .+ \|$", section, re.M)
    assert sorted(names) == sorted(spectral_cli.__all__)
    for name in names:  # each loads (the lazy table names real objects)
        assert getattr(spectral_cli, name) is not None, name
