"""Directories of Hugging Face safetensors shards: the source (an index and its shards, every header checked)
and the writer of sharded output (shards and their index, into one staging directory). Imports no torch.

An input's shards are converted shard by shard into the same layout, with the index rewritten; with a size
limit (``--max-shard-size``) new shards of at most that size are cut (a single larger tensor gets one alone).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..statedict.keys import TensorSpec
from ..statedict.records import LayerRecord
from .atomic import Output
from .checkpoint import (
    Fingerprint,
    Planned,
    Reading,
    Run,
    Sink,
    Source,
    StoredStateDict,
    Tick,
    Writing,
    by_name,
    ordered,
    produce,
    total_bytes,
)
from .formats import INDEX_SUFFIX, SHARDED, find_index, open_regular
from .safetensors_io import FileTensor, Header, file_metadata, read_header, verify_header, write_safetensors
from .syscalls import SYSCALLS, Syscalls

#: the most shards held open at once (each is opened when read, and the least recently read closed)
OPEN_SHARDS = 16
#: the largest index file read (a weight map of a million tensors is about 100 MB)
MAX_INDEX_BYTES = 256 << 20


def _read_index(index_path: Path) -> dict[str, Any]:
    def damaged() -> CheckpointError:
        return CheckpointError(f"{index_path}: not a safetensors index (a JSON object with a weight_map)")

    fd = open_regular(index_path)
    try:
        if os.fstat(fd).st_size > MAX_INDEX_BYTES:
            raise damaged()
        with os.fdopen(os.dup(fd), "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise damaged() from None
    finally:
        os.close(fd)
    if not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict)):
        raise damaged()
    if not all(isinstance(v, str) for v in index["weight_map"].values()):
        raise damaged()
    return index


class ShardSource:
    """A sharded checkpoint (a directory, or its ``*.safetensors.index.json``) as one state dict."""

    format = SHARDED

    def __init__(self, path: Path, syscalls: Syscalls = SYSCALLS) -> None:
        self.path, self.syscalls = path, syscalls
        self.index_path = path if not path.is_dir() else find_index(path)
        self.index = _read_index(self.index_path)
        weight_map: dict[str, str] = self.index["weight_map"]
        self.headers: dict[str, Header] = {}
        self._identity: dict[str, tuple[int, ...]] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        try:
            for shard in dict.fromkeys(weight_map.values()):
                shard_path = self.index_path.parent / shard
                if Path(shard).name != shard or shard in ("", ".", "..") or not shard_path.is_file():
                    raise CheckpointError(f"{self.index_path}: names shard {shard!r}, which is not a file beside it")
                fd = open_regular(shard_path)
                try:
                    self.headers[shard] = read_header(shard_path, fd)
                    self._identity[shard] = Fingerprint.of(os.fstat(fd))
                finally:
                    os.close(fd)
            self.owner: dict[str, str] = {}
            for shard, header in self.headers.items():
                for key in header.entries:
                    if key in self.owner:
                        raise CheckpointError(f"{header.path}: tensor {key!r} is also in {self.owner[key]}")
                    if weight_map.get(key) != shard:
                        raise CheckpointError(f"{self.index_path}: does not map {key!r} to {shard}, which holds it")
                    self.owner[key] = shard
            missing = [k for k in weight_map if k not in self.owner]
            if missing:
                raise CheckpointError(f"{self.index_path}: maps {missing[0]!r} to a shard that does not hold it")
            records: dict[str, LayerRecord] = {}
            for header in self.headers.values():
                records.update(header.records)
        except BaseException:
            self.close()
            raise
        specs = {k: self.headers[shard].entries[k].spec for k, shard in self.owner.items()}
        self.parts = [StoredStateDict((), specs, records, self.tensor)]
        self.fingerprint = Fingerprint([self.index_path, *(h.path for h in self.headers.values())])

    def _fd(self, shard: str) -> int:
        """The open descriptor of ``shard``: opened when first read (a directory of thousands of shards is never held
        open at once: at most :data:`OPEN_SHARDS`), and checked to be the file whose header was read."""
        with self._lock:
            fd = self._fds.get(shard)
            if fd is not None:
                self._fds.move_to_end(shard)
                return fd
            path = self.headers[shard].path
            fd = open_regular(path)
            if Fingerprint.of(os.fstat(fd)) != self._identity[shard]:
                os.close(fd)
                self.fingerprint.check(self.index_path.parent)
                raise CheckpointError(f"{path}: changed while it was being read; no output was written; run again "
                                      "once nothing is writing to it")  # fmt: skip
            self._fds[shard] = fd
            while len(self._fds) > OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def tensor(self, key: str) -> FileTensor:
        shard = self.owner[key]
        header = self.headers[shard]
        return FileTensor(lambda: self._fd(shard), header.path, header.entries[key], self.syscalls)

    def metadata(self, name: str | None = None) -> dict[str, str]:
        header = self.headers.get(name or "") or next(iter(self.headers.values()), None)
        return header.metadata if header is not None else {}

    def inputs(self) -> list[Path]:
        return [self.index_path.parent, self.index_path, *(h.path for h in self.headers.values())]

    def check_unchanged(self) -> None:
        self.fingerprint.check(self.index_path.parent)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def shard_layout(
    specs: Mapping[str, TensorSpec],
    max_shard_size: int | None,
    source_shard: Callable[[str], str | None],
    stem: str = "model",
) -> dict[str, list[str]]:
    """Output file name -> its keys: the input's shards (``source_shard(key)`` names the shard of each output key),
    or new shards of at most ``max_shard_size`` bytes, named as Hugging Face names them:
    ``<stem>-00001-of-00003.safetensors``."""
    if max_shard_size is None:
        layout: dict[str, list[str]] = {}
        for key in specs:
            layout.setdefault(source_shard(key) or "", []).append(key)
        return layout
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += spec.nbytes
    n = len(shards)
    return {f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors": keys for i, keys in enumerate(shards)}


def write_shards(
    out: Output,
    layout: Mapping[str, list[str]],
    specs: Mapping[str, TensorSpec],
    metadata: Callable[[str], Mapping[str, str]],
    records: Mapping[str, LayerRecord],
    index: Mapping[str, Any],
    index_name: str,
    produce: Callable[[str], Any],
    progress: Callable[[int, bool], None] | None,
    writeback_bytes: int,
) -> Callable[[Path], None]:
    """Write every shard of ``layout`` and the index into the output directory; returns the check of what was
    written (each header read back), for :meth:`~spectral_cli.files.atomic.Output.commit`."""
    expected = {}
    for name, keys in layout.items():
        meta = file_metadata(metadata(name), records, keys)
        shard_specs = {k: specs[k] for k in keys}
        shard = out.file(name)
        header = write_safetensors(shard, shard_specs, meta, produce, progress, writeback_bytes)
        out.done(shard)
        expected[name] = (shard_specs, meta, header)
    index_meta = dict(index.get("metadata") or {}) if isinstance(index.get("metadata"), dict) else {}
    index_meta["total_size"] = sum(spec.nbytes for spec in specs.values())
    weight_map = {k: name for name, keys in layout.items() for k in keys}
    text = json.dumps({"metadata": index_meta, "weight_map": weight_map}, indent=2).encode()
    index_file = out.file(index_name)
    index_file.write(text, 0)
    out.done(index_file)

    def verify(staging: Path) -> None:
        for name, (shard_specs, meta, header) in expected.items():
            verify_header(staging / name, shard_specs, meta, out.target, header)

    return verify


def stem_of(source: Any) -> str:
    """The name sharded output is written under: the input index's (``diffusion_pytorch_model`` for
    ``diffusion_pytorch_model.safetensors.index.json``), a single file's stem, or ``model``."""
    index_path = getattr(source, "index_path", None)
    if index_path is not None:
        return str(index_path.name).removesuffix(INDEX_SUFFIX)
    path = Path(getattr(source, "path", "model"))
    return path.stem if path.suffix == ".safetensors" else "model"


# ---- the format: its reader and its writer --------------------------------------------------------------------


def source(path: Path, fmt: str, reading: Reading) -> ShardSource:
    """A sharded checkpoint (its directory or its index) as a source."""
    return ShardSource(path, reading.syscalls)


def sink(src: Source, plans: Planned, target: Path, writing: Writing) -> Sink:
    """A directory of safetensors shards and their index: the input's shards (each tensor where it was), or new
    ones of at most ``writing.max_shard_size`` bytes."""
    part, plan = plans[0]
    specs = by_name(plan.output_specs(part.specs))
    source_of = {s.target_key: s.source_key for s in plan.steps}
    owner = src.owner if isinstance(src, ShardSource) else {}
    index = src.index if isinstance(src, ShardSource) else {}
    stem = stem_of(src)
    layout = shard_layout(specs, writing.max_shard_size, lambda key: owner.get(source_of.get(key, key)), stem)

    def write(output: Output, run: Run, tick: Tick) -> Callable[[Path], None]:
        return write_shards(output, layout, specs, src.metadata, plan.records, index, stem + INDEX_SUFFIX,
                            produce(part, plan, run), tick, writing.io.writeback_bytes)  # fmt: skip

    order = ordered(part, plan, (key for keys in layout.values() for key in keys))
    return Sink(target, SHARDED, True, write, total_bytes(specs), len(specs), order=order)
