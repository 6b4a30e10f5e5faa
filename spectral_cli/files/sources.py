"""What every checkpoint source gives, whatever its format: the state dicts it holds, each as names, specs and
records with its tensors read on demand, and the paths the input resolves to. Imports no torch.

:func:`open_source` detects the format and opens the one source of that format: a torch file
(:mod:`.torch_file`), a safetensors file (:mod:`.safetensors_io`), a directory of shards (:mod:`.shards`), a
distributed checkpoint (:mod:`.dcp`) or a model directory of several such units (:mod:`.model_dir`).
Opening reads and checks everything that describes the tensors (a torch file is loaded; a safetensors header
parsed), so a damaged or lying input is refused before any output exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import CheckpointError
from ..statedict.keys import TensorSpec, key_prefix
from ..statedict.records import LayerRecord
from .formats import DCP, MODEL_DIR, SAFETENSORS, SHARDED, detect_format
from .syscalls import SYSCALLS, Syscalls

if TYPE_CHECKING:
    import torch

    from .atomic import OutFile


class SourceTensor(Protocol):
    """A tensor of a source: read in slabs or whole (:class:`~spectral_cli.statedict.surgery.Stored`), or copied
    unchanged into a safetensors output."""

    def read(self, offset: int, out: torch.Tensor) -> None: ...

    def whole(self) -> torch.Tensor: ...

    def copy_to(self, out: OutFile, offset: int) -> None: ...


@dataclass
class Part:
    """One state dict of a checkpoint."""

    #: container keys leading to it: ``()`` for a bare state dict (and every safetensors input)
    location: tuple[str, ...]
    #: its tensors, in order
    specs: dict[str, TensorSpec]
    records: dict[str, LayerRecord]
    #: a tensor by name, read when needed
    tensor: Callable[[str], SourceTensor]
    #: torch files only: the state dict as loaded (tensors, and ``_extra_state`` objects)
    values: Mapping[str, Any] | None = None
    #: a trusted pickled module only: the names of its real conv layers
    conv_modules: frozenset[str] | None = None

    @property
    def where(self) -> str:
        return "/".join(self.location)

    @property
    def prefix(self) -> str:
        return key_prefix(self.specs)


class Source(Protocol):
    path: Path
    format: str
    parts: list[Part]

    def inputs(self) -> list[Path]:
        """Every path the input consists of (followed through symlinks by the output checks)."""
        ...

    def metadata(self, name: str | None = None) -> dict[str, str]:
        """The safetensors ``__metadata__`` an output file (``name``: a shard's) starts from: the input's own."""
        ...

    def check_unchanged(self) -> None:
        """Raise :class:`CheckpointError` if the input changed since it was opened (what was read may be torn)."""
        ...

    def close(self) -> None: ...


class Fingerprint:
    """The identity, size and time of change of an input's files (open descriptors, or paths), to notice one
    rewritten while it was being read."""

    def __init__(self, files: list[int] | list[Path]) -> None:
        self.files = files
        self.before = self._take()

    def _take(self) -> list[tuple[int, ...]]:
        try:
            return [self.of(os.stat(f)) for f in self.files]
        except OSError:
            return []

    @staticmethod
    def of(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def check(self, where: Path) -> None:
        """Raise :class:`CheckpointError` if a file of the input changed since the source was opened."""
        if self._take() != self.before:
            raise CheckpointError(
                f"{where}: changed while it was being read; no output was written; run again once nothing is "
                "writing to it"
            )


def open_source(path: Path, *, trust_pickle: bool = False, syscalls: Syscalls = SYSCALLS) -> Source:
    """The source of the checkpoint at ``path`` (close it when done)."""
    fmt = detect_format(path)
    if fmt == SAFETENSORS:
        from .safetensors_io import SafetensorsSource

        return SafetensorsSource(path, syscalls)
    if fmt == SHARDED:
        from .shards import ShardSource

        return ShardSource(path, syscalls)
    if fmt == DCP:
        from .dcp import DcpSource

        return DcpSource(path, trust_pickle)
    if fmt == MODEL_DIR:
        from .model_dir import ModelDirSource

        return ModelDirSource(path, trust_pickle, syscalls)
    from .torch_file import TorchSource

    return TorchSource(path, fmt, trust_pickle)
