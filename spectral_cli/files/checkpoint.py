"""What every checkpoint format gives and takes: the types the formats' modules share, and nothing that names a
format. Imports no torch.

A format's module (:mod:`.torch_file`, :mod:`.safetensors_io`, :mod:`.shards`, :mod:`.dcp`, :mod:`.model_dir`)
owns its reader and its writer: a :class:`Source` opened from a path gives the state dicts it holds, each a
:class:`StoredStateDict` whose tensors are :class:`~spectral_cli.statedict.surgery.ReadableTensor` read on demand; a
:class:`Sink` built from a source and its plans writes the output. :mod:`.registry` finds a format's module
through one table; :mod:`.convert` runs the pipeline between them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import CheckpointError
from ..statedict.keys import TensorSpec, key_prefix
from ..statedict.plan import Plan, Step
from ..statedict.records import LayerRecord
from .syscalls import SYSCALLS, Syscalls

if TYPE_CHECKING:
    from ..statedict.surgery import Changes, ReadableTensor
    from .atomic import Output
    from .optimizer_state import OptimizerReport

#: bytes of a transformed tensor written between two background syncs (:mod:`.safetensors_io`)
WRITEBACK_BYTES = 64 << 20
#: bytes of kernels transformed at once (:class:`~spectral_cli.transform.slabs.Scratch`)
SLAB_BYTES = 1 << 20


@dataclass(frozen=True)
class Io:
    """How files are read and written: the system calls (the seam where tests inject faults) and the sizes of
    the pieces: slabs of kernels transformed at once, bytes written between two background syncs."""

    syscalls: Syscalls = SYSCALLS
    slab_bytes: int = SLAB_BYTES
    writeback_bytes: int = WRITEBACK_BYTES


@dataclass
class StoredStateDict:
    """One state dict of a checkpoint."""

    #: container keys leading to it: ``()`` for a bare state dict (and every safetensors input)
    container_keys: tuple[str, ...]
    #: its tensors, in order
    specs: dict[str, TensorSpec]
    records: dict[str, LayerRecord]
    #: a tensor by name, read when needed
    tensor: Callable[[str], ReadableTensor]
    #: torch files only: the state dict as loaded (tensors, and ``_extra_state`` objects)
    values: Mapping[str, Any] | None = None
    #: a trusted pickled module only: the names of its real conv layers
    conv_modules: frozenset[str] | None = None

    @property
    def label(self) -> str:
        """The container keys joined by ``/``: the ``location`` of its layers in reports (``""`` when bare)."""
        return "/".join(self.container_keys)

    @property
    def prefix(self) -> str:
        return key_prefix(self.specs)


class Source(Protocol):
    path: Path
    format: str
    parts: list[StoredStateDict]

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


def read_back_differs(target: Path, what: str = "") -> CheckpointError:
    """The error of an output whose temporary did not read back as written (``what``: which part)."""
    said = f" ({what})" if what else ""
    return CheckpointError(f"{target}: read back differently from what was written{said}; not written")


# ---- writing ----------------------------------------------------------------------------------------------------

#: a step run on its part's tensor: the result in pieces, and the change made
Run = Callable[[StoredStateDict, Step], "Changes"]
#: ``tick(nbytes, tensor_done)``: a piece of the output written
Tick = Callable[[int, bool], None]
#: the state dicts of a source, each with its plan
Planned = list[tuple[StoredStateDict, Plan]]


@dataclass(frozen=True)
class Writing:
    """What a format's writer is asked for beyond the plans: shards of at most ``max_shard_size`` bytes, what
    becomes of optimizer state, the piece sizes of :class:`Io`, and (for a model directory's units) the writer of
    each format."""

    max_shard_size: int | None = None
    #: what becomes of optimizer state: ``"convert"`` or ``"drop"`` (:mod:`.optimizer_state`)
    optimizer: str = "convert"
    io: Io = field(default_factory=Io)
    sink_for: Callable[[str], Format] | None = None


@dataclass
class Sink:
    """Where the output goes, and how it is written: ``write(output, run, tick)`` writes it and returns the check
    of the finished temporary (run before the rename)."""

    target: Path
    format: str
    directory: bool
    write: Callable[[Output, Run, Tick], Callable[[Path], None]]
    total_bytes: int = 0
    total_tensors: int = 0
    dropped: list[str] = field(default_factory=list)
    #: the steps in the order ``write`` runs them, where it is known (small tensors are then run in batches)
    order: list[tuple[StoredStateDict, Step]] | None = None
    #: each optimizer state, and the container entries replaced by the converted states (as verify expects them)
    optimizers: list[OptimizerReport] = field(default_factory=list)
    replaced: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reading:
    """How a source is opened: whether a pickle may run code, the system calls, and (for a model directory's
    units) the opener of any format."""

    trust_pickle: bool = False
    syscalls: Syscalls = SYSCALLS
    open_unit: Callable[[Path], Source] | None = None


class Format(Protocol):
    """A format's module as the pipeline sees it: its reader (``source``) and its writer (``sink``)."""

    def source(self, path: Path, fmt: str, reading: Reading) -> Source:
        """The source of ``path`` (detected as ``fmt``); close it when done."""
        ...

    def sink(self, src: Source, plans: Planned, target: Path, writing: Writing) -> Sink:
        """The writer of ``src``'s output at ``target`` in this format."""
        ...


def produce(part: StoredStateDict, plan: Plan, run: Run) -> Callable[[str], Any]:
    """The output's tensor of each name: a step's pieces, or the input's tensor carried over."""
    by_target = {s.target_key: s for s in plan.steps}

    def produce(key: str) -> Any:
        step = by_target.get(key)
        return run(part, step) if step is not None else part.tensor(key)

    return produce


def ordered(part: StoredStateDict, plan: Plan, keys: Iterable[str]) -> list[tuple[StoredStateDict, Step]]:
    """The steps of ``plan`` in the order of their target ``keys``, as a writer of those keys runs them."""
    by_target = {s.target_key: s for s in plan.steps}
    return [(part, by_target[key]) for key in keys if key in by_target]


def by_name(specs: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """A safetensors file's tensors in the order of their names, as safetensors lists them: the file then does not
    depend on the order of its input (a torch state dict's, a header's, an index's)."""
    return dict(sorted(specs.items()))


def total_bytes(specs: Mapping[str, TensorSpec]) -> int:
    return sum(spec.nbytes for spec in specs.values())
