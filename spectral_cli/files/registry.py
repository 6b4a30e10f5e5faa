"""The one table of formats: each format's name -> the module that owns its reader and its writer, imported
when first used (so that ``inspect`` of a safetensors file never imports torch). Imports no torch.

Example:
    >>> sorted(FORMATS)
    ['dcp', 'directory', 'safetensors', 'safetensors-sharded', 'torch', 'torch-legacy']
    >>> format_of("safetensors").__name__
    'spectral_cli.files.safetensors_io'
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import cast

from .checkpoint import Format, Reading, Source
from .formats import DCP, MODEL_DIR, SAFETENSORS, SHARDED, TORCH, TORCH_LEGACY, detect_format
from .syscalls import SYSCALLS, Syscalls

#: format -> the module (of this package) that reads and writes it
FORMATS = {
    SAFETENSORS: "safetensors_io",
    SHARDED: "shards",
    TORCH: "torch_file",
    TORCH_LEGACY: "torch_file",
    DCP: "dcp",
    MODEL_DIR: "model_dir",
}


def format_of(fmt: str) -> Format:
    """The module that reads and writes ``fmt``."""
    return cast(Format, importlib.import_module(f".{FORMATS[fmt]}", __package__))


def open_source(path: Path, *, trust_pickle: bool = False, syscalls: Syscalls = SYSCALLS) -> Source:
    """The source of the checkpoint at ``path``, whatever its format (close it when done). Opening reads and
    checks everything that describes the tensors (a torch file is loaded; a safetensors header parsed), so a
    damaged or lying input is refused before any output exists."""

    def open_unit(unit: Path) -> Source:
        return open_source(unit, trust_pickle=trust_pickle, syscalls=syscalls)

    fmt = detect_format(path)
    return format_of(fmt).source(path, fmt, Reading(trust_pickle, syscalls, open_unit))
