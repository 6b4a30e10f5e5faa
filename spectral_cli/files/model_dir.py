"""Model directories as Hugging Face libraries save them: the weight files of a ``save_pretrained`` directory (and
of each component folder of a diffusers pipeline) converted under their own names, everything else kept.

A directory is read as *units*, each one checkpoint of its own: a ``*.safetensors.index.json`` with its shards, a
single ``*.safetensors`` file, or a torch weight file (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``).
Every other file (``config.json``, scheduler and tokenizer files, a README) is copied as it is, so that
``from_pretrained`` of the converted or baked directory finds what it found before. The output directory is
written as one staging directory and renamed into place at once. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import CheckpointError
from ..statedict.plan import Plan, Step
from ..statedict.surgery import Changes
from .atomic import TEMP_NAME, OutFile, Output
from .checkpoint import Planned, Reading, Run, Sink, Source, StoredStateDict, Tick, Writing
from .formats import INDEX_SUFFIX, MODEL_DIR, SAFETENSORS, SHARDED, kind_of, writer_format

#: torch weight files a model directory may hold (other ``.bin`` files, such as ``training_args.bin``, are kept)
TORCH_WEIGHTS = (".pt", ".pth", ".ckpt")
TORCH_WEIGHT_BINS = ("pytorch_model", "diffusion_pytorch_model")
#: the deepest folder searched for weight files (a pipeline's components are one level down); files deeper down
#: are carried over as they are
MAX_DEPTH = 3


def _files(root: Path) -> Iterator[Path]:
    """Every file below ``root`` (relative), at any depth, hidden ones included (this tool's temporaries left
    out), through symlinked folders (a symlink loop is refused: the walk would never end)."""
    for directory, folders, names in os.walk(root, followlinks=True):
        relative = Path(directory).relative_to(root)
        real = os.path.realpath(directory)
        if any(os.path.realpath(root / above) == real for above in relative.parents):
            raise CheckpointError(f"{directory}: a symlink leads back to a folder above it; remove the loop")
        folders[:] = sorted(f for f in folders if not TEMP_NAME.fullmatch(f))
        for name in sorted(names):
            if TEMP_NAME.fullmatch(name):
                continue
            path = Path(directory) / name
            if not path.is_file():  # a FIFO or a device: reading it could block or never end
                kind = kind_of(os.stat(path).st_mode) if os.path.exists(path) else "a dangling symlink"
                raise CheckpointError(f"{path}: is {kind}, not a file of a model directory; remove it")
            yield relative / name


def _searched(path: Path) -> bool:
    """Whether ``path`` (relative) may be a weight unit: not hidden, at most :data:`MAX_DEPTH` folders down."""
    return len(path.parts) <= MAX_DEPTH + 1 and not any(part.startswith(".") for part in path.parts)


def is_torch_weights(name: str) -> bool:
    return name.endswith(TORCH_WEIGHTS) or (name.endswith(".bin") and name.startswith(TORCH_WEIGHT_BINS))


def units_of(root: Path) -> tuple[list[Path], list[Path]]:
    """The weight units of a directory (index files, single safetensors files, torch weight files), and the other
    files, each relative to ``root``."""
    files = list(_files(root))
    units: list[Path] = []
    claimed: set[Path] = set()
    for path in filter(_searched, files):
        if path.name.endswith(INDEX_SUFFIX):
            try:
                weight_map = json.loads((root / path).read_text()).get("weight_map", {})
            except (OSError, ValueError, AttributeError, RecursionError):
                raise CheckpointError(
                    f"{root / path}: not a safetensors index (a JSON object with a weight_map)"
                ) from None
            shards = {path.parent / str(name) for name in dict(weight_map).values()}
            if shards & claimed:
                raise CheckpointError(f"{root / path}: names shards another index of {root} names too; keep one index")
            claimed |= shards
            units.append(path)
        elif path.name.endswith(".bin.index.json"):
            raise CheckpointError(f"{root / path}: torch weights sharded in .bin files are not read; save them with "
                                  "safe_serialization=True (safetensors shards) and convert that")  # fmt: skip
    for path in filter(_searched, files):
        if path in claimed or path in units:
            continue
        if path.suffix == ".safetensors" or is_torch_weights(path.name):
            units.append(path)
    others = [p for p in files if p not in claimed and p not in units]
    return units, others


class SubOutput:
    """The part of an :class:`Output` directory where one unit is written: the unit's file, or (shards) files
    beside its index."""

    def __init__(self, output: Output, unit: Path, directory: bool) -> None:
        self.output, self.unit, self.directory = output, unit, directory
        self.target = output.target / unit
        self.path = output.path / (unit.parent if directory else unit)

    def file(self, name: str | None = None) -> OutFile:
        return self.output.file(str(self.unit if name is None else self.unit.parent / name))

    def done(self, out: OutFile) -> None:
        self.output.done(out)


class ModelDirSource:
    """A model directory as a source: the parts of every unit, their locations prefixed with the unit's path."""

    format = MODEL_DIR

    def __init__(self, path: Path, open_unit: Callable[[Path], Source]) -> None:
        self.path = path
        units, self.others = units_of(path)
        if not units:
            raise CheckpointError(f"{path}: a directory without weight files (.safetensors, an index of shards, "
                                  "pytorch_model.bin, .pt); pass a checkpoint")  # fmt: skip
        self.units: list[tuple[Path, Source]] = []
        try:
            for unit in units:
                self.units.append((unit, open_unit(path / unit)))
        except BaseException:
            self.close()
            raise
        self.parts = [self.prefixed(unit, part) for unit, source in self.units for part in source.parts]

    @staticmethod
    def prefixed(unit: Path, part: StoredStateDict) -> StoredStateDict:
        """``part`` of ``unit`` as this directory's part: its location starts with the unit's path."""
        import dataclasses

        return dataclasses.replace(part, container_keys=(str(unit), *part.container_keys))

    def inputs(self) -> list[Path]:
        return [self.path, *(p for _, source in self.units for p in source.inputs())]

    def metadata(self, name: str | None = None) -> dict[str, str]:
        return {}

    def check_unchanged(self) -> None:
        for _, source in self.units:
            source.check_unchanged()

    def close(self) -> None:
        for _, source in self.units:
            source.close()

    def copy(self, files: list[Path], output: Output) -> None:
        """Copy ``files`` (relative to this directory) into the output directory as they are, synced."""
        for relative in files:
            destination = output.path / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(self.path / relative, destination)
                fd = os.open(destination, os.O_RDONLY)
                try:
                    output.syscalls.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                from .atomic import output_error

                raise output_error(output.target, e) from None


# ---- the format: its reader and its writer --------------------------------------------------------------------


def source(path: Path, fmt: str, reading: Reading) -> ModelDirSource:
    """A model directory as a source: each weight unit opened by the reader of its format."""
    assert reading.open_unit is not None  # given by registry.open_source
    return ModelDirSource(path, reading.open_unit)


def sink(src: Source, plans: Planned, target: Path, writing: Writing) -> Sink:
    """A model directory: each weight unit written by the writer of its format under its own name (the rule of
    :func:`~spectral_cli.files.formats.writer_format`), every other file copied, all in one staging directory."""
    assert isinstance(src, ModelDirSource) and writing.sink_for is not None
    planned = iter(plans)
    units: list[tuple[Path, Sink | None, Source]] = []
    plan_of: dict[int, Plan] = {}
    for unit, unit_src in src.units:
        local = [(part, next(planned)[1]) for part in unit_src.parts]
        plan_of.update((id(part), plan) for part, plan in local)
        if not any(plan.steps for _, plan in local):
            units.append((unit, None, unit_src))
            continue
        # --max-shard-size reshards a directory's safetensors units; its torch files are written as they were
        sharded = writing.max_shard_size is not None and unit_src.format in (SAFETENSORS, SHARDED)
        fmt = writer_format(unit_src.path, unit_src.format, target / unit, sharded=sharded)
        unit_target = target / unit.parent if fmt == SHARDED else target / unit
        units.append((unit, writing.sink_for(fmt).sink(unit_src, local, unit_target, writing), unit_src))

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        checks: list[tuple[Path, Callable[[Path], None]]] = []
        kept = list(src.others)
        for unit, unit_sink, unit_src in units:
            if unit_sink is None:  # nothing to change: its files as they are
                kept += [unit.parent / p.name for p in unit_src.inputs() if p.is_file()]
                continue
            view = SubOutput(output, unit, unit_sink.directory)

            def unit_run(part: StoredStateDict, step: Step, unit: Path = unit) -> Changes:
                return run(ModelDirSource.prefixed(unit, part), step)

            check = unit_sink.write(view, unit_run, tick)  # type: ignore[arg-type]
            checks.append((view.path.relative_to(output.path), check))
        src.copy(kept, output)

        def verify(written: Path) -> None:
            for relative, check in checks:
                check(written / relative)

        return verify

    written = [(unit_sink, unit_src) for _, unit_sink, unit_src in units if unit_sink is not None]
    dropped = [f"{unit}/{name}" for unit, unit_sink, _ in units if unit_sink is not None for name in unit_sink.dropped]
    order = []  # a torch unit's order is its parts' and their plans'
    for unit_sink, unit_src in written:
        order += unit_sink.order or [(p, s) for p in unit_src.parts for s in plan_of[id(p)].steps]
    total = sum(unit_sink.total_bytes for unit_sink, _ in written)
    tensors = sum(unit_sink.total_tensors for unit_sink, _ in written)
    optimizers = [dataclasses.replace(o, where=f"{unit}/{o.where}") for unit, unit_sink, _ in units
                  if unit_sink is not None for o in unit_sink.optimizers]  # fmt: skip
    return Sink(target, MODEL_DIR, True, write, total, tensors, dropped, order, optimizers)
