"""Checkpoint formats, detected from the bytes; output names; and the checks that keep an output off its input.
Imports no torch.

Formats, detected from the bytes, never from the extension:

* ``safetensors`` -- 8-byte little-endian header length, then a JSON header;
* ``safetensors-sharded`` -- a directory (or its ``*.safetensors.index.json``) of Hugging Face shards;
* ``torch`` -- ``torch.save``'s zip archive (``.pt``, ``.pth``, ``.bin``, ``.ckpt``);
* ``torch-legacy`` -- the pre-1.6 pickle stream; read, and written back as a zip archive;
* ``dcp`` -- a ``torch.distributed.checkpoint`` directory (a ``.metadata`` file and the ranks' chunks);
* ``directory`` -- any other directory: a model directory as Hugging Face libraries save them (weight files,
  ``config.json`` and the rest, component folders), read unit by unit.

Only regular files and directories are read: a FIFO or a device is refused before it is opened for reading,
so that nothing blocks or reads forever.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointError, OutputError, RefusedError

SAFETENSORS = "safetensors"
SHARDED = "safetensors-sharded"
TORCH = "torch"
TORCH_LEGACY = "torch-legacy"
DCP = "dcp"
MODEL_DIR = "directory"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"

MAX_SAFETENSORS_HEADER = 100_000_000

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}  # fmt: skip


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is: 'a FIFO', 'a character device'..."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _no_such_file(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: no such file; check the path")


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (checked on the open file, so that a
    FIFO swapped in after a check never blocks the read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _no_such_file(path) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path}: is {kind_of(mode)}, not a checkpoint file; pass a checkpoint file")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return fd


def find_index(directory: Path) -> Path:
    """The one ``*.safetensors.index.json`` of a sharded checkpoint directory."""
    found = sorted(directory.glob(f"*{INDEX_SUFFIX}"))
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise CheckpointError(f"{directory}: is a directory with {what} *{INDEX_SUFFIX} (and no DCP .metadata); pass "
                              "a checkpoint file")  # fmt: skip
    return found[0]


def _only_shards(directory: Path) -> bool:
    """A directory of one index and its ``*.safetensors`` shards, and nothing else."""
    entries = [e for e in directory.iterdir() if not e.name.startswith(".")]
    indexes = [e for e in entries if e.name.endswith(INDEX_SUFFIX)]
    return len(indexes) == 1 and all(e.is_file() and (e in indexes or e.suffix == ".safetensors") for e in entries)


def detect_format(path: Path) -> str:
    """The checkpoint format of ``path``, read from its first bytes."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise _no_such_file(path) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check the path") from None
    if stat.S_ISDIR(mode):
        if (path / ".metadata").is_file():
            return DCP
        return SHARDED if _only_shards(path) else MODEL_DIR
    if path.name.endswith(INDEX_SUFFIX) and stat.S_ISREG(mode):
        return SHARDED
    fd = open_regular(path)
    try:
        head = os.pread(fd, 9, 0)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
    if not head:
        raise CheckpointError(f"{path}: is empty; pass a checkpoint written by torch.save or safetensors")
    if head.startswith(b"PK\x03\x04"):
        return TORCH
    # safetensors before the legacy pickle: a header of 640, 896, 1152 or 1408 bytes (+ k * 65536) starts with
    # the bytes of a pickle protocol mark (0x80, 2..5). A pickle never passes this test: its bytes 2 to 7 are
    # opcodes (torch's legacy files: its magic number), which make the "length" far larger than any header.
    if len(head) == 9 and head[8:9] == b"{":
        (size,) = struct.unpack("<Q", head[:8])
        if 0 < size <= MAX_SAFETENSORS_HEADER:
            return SAFETENSORS
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return TORCH_LEGACY
    raise CheckpointError(f"{path}: not a checkpoint spectral_cli can read (expected a torch.save file or safetensors)")


def output_format(path: Path, input_format: str) -> str:
    """The format to write: from the output's extension when it names one, else the input's."""
    if path.suffix == ".safetensors":
        return SAFETENSORS
    if path.suffix in TORCH_SUFFIXES:
        return TORCH
    return TORCH if input_format == TORCH_LEGACY else input_format


#: the refusals of an output that cannot hold its input, said once
SHARDS_ARE_SAFETENSORS = "safetensors shards are written as safetensors; give -o a directory or a .safetensors file"
DCP_IS_WRITTEN_AS_ONE = ("a distributed checkpoint is written as one (give -o a directory) or, one state dict of it, "
                         "as .safetensors")  # fmt: skip


def writer_format(source: Path, input_format: str, output: Path | None, *, sharded: bool = False) -> str:
    """The format an input of ``input_format`` is written in: a model directory as one, shards when ``sharded``
    (``--max-shard-size``) or for shards in unless ``output`` is a ``.safetensors`` file, a distributed checkpoint
    as one unless ``output`` names a file format, else the format of the output's extension (or the input's).
    Raises :class:`RefusedError` for an output that cannot hold the input.

    Example:
        >>> writer_format(Path("m.pt"), TORCH, None), writer_format(Path("m.pt"), TORCH, Path("o.safetensors"))
        ('torch', 'safetensors')
        >>> writer_format(Path("m.safetensors"), SAFETENSORS, None, sharded=True)
        'safetensors-sharded'
    """
    if input_format == MODEL_DIR:
        if output is not None and output.suffix in (".safetensors", *TORCH_SUFFIXES):
            raise RefusedError(f"{output}: a model directory is written as one; give -o a directory name")
        return MODEL_DIR
    if sharded or (input_format == SHARDED and (output is None or output.suffix != ".safetensors")):
        if input_format not in (SAFETENSORS, SHARDED):
            raise RefusedError(f"{source}: --max-shard-size writes safetensors shards; it needs a safetensors input")
        if output is not None and output_format(output, SAFETENSORS) != SAFETENSORS:
            raise RefusedError(f"{output}: {SHARDS_ARE_SAFETENSORS}")
        return SHARDED
    if input_format == DCP and (output is None or output_format(output, DCP) == DCP):
        return DCP
    if output_format(output or source, input_format) == SAFETENSORS:
        return SAFETENSORS
    if input_format in (SHARDED, DCP):
        said = SHARDS_ARE_SAFETENSORS if input_format == SHARDED else DCP_IS_WRITTEN_AS_ONE
        raise RefusedError(f"{output}: {said}")
    return TORCH


def hub_cache_name(source: Path) -> str | None:
    """The name of an output for an input inside a Hugging Face hub cache
    (``.../models--org--name/snapshots/<revision>/[path]``): ``name`` and the path in the snapshot, joined by dots;
    None for an input outside one. Beside the input, an output would sit in the cache, where ``huggingface_hub``
    takes it for a revision (a damaged one, if a file).

    Example:
        >>> hub_cache_name(Path("/c/hub/models--org--tiny-net/snapshots/0a1b/unet/model.safetensors"))
        'tiny-net.unet.model.safetensors'
        >>> hub_cache_name(Path("/c/hub/models--org--tiny-net/snapshots/0a1b")), hub_cache_name(Path("m.pt"))
        ('tiny-net', None)
    """
    for path in dict.fromkeys((Path(os.path.abspath(source)), Path(os.path.realpath(source)))):
        parts = path.parts
        for i in range(len(parts) - 2):
            repo, snapshots = parts[i], parts[i + 1]
            if snapshots == "snapshots" and repo.startswith(("models--", "datasets--", "spaces--")):
                name = repo.split("--")[-1] or repo
                return ".".join((name, *parts[i + 3 :]))
    return None


def default_output(source: Path, tag: str, fmt: str) -> Path:
    """``model.pt`` -> ``model.<tag>.pt``, ``shards/`` -> ``shards.<tag>/`` (an earlier tag is replaced); ``.``,
    ``./`` or an index file given by its bare name are named from the directory they stand for. An input inside a
    Hugging Face hub cache is named after its repository (:func:`hub_cache_name`), in the current directory (an
    absolute path, so that the report says where it went)."""
    if fmt in (SHARDED, DCP, MODEL_DIR):
        base = source if source.is_dir() else source.parent
        cached = hub_cache_name(base)
        if cached is not None:
            return Path(os.path.abspath(f"{cached}.{tag}"))
        if base.name in ("", ".", ".."):
            base = Path(os.path.abspath(base))
        name = base.name.removesuffix(".spectral").removesuffix(".baked")
        return base.with_name(f"{name}.{tag}")
    cached = hub_cache_name(source)
    if cached is not None:
        source = Path(os.path.abspath(cached))
    stem = source.stem
    for old in (".spectral", ".baked"):
        stem = stem.removesuffix(old)
    suffix = ".safetensors" if fmt == SAFETENSORS else (source.suffix or ".pt")
    if fmt != SAFETENSORS and suffix == ".safetensors":
        suffix = ".pt"
    return source.with_name(f"{stem}.{tag}{suffix}")


#: what peft's ``save_pretrained`` writes beside an adapter's weights (``adapter_model.safetensors``)
ADAPTER_CONFIG = "adapter_config.json"


def refuse_adapter(path: Path) -> None:
    """Refuse a peft adapter, known by the ``adapter_config.json`` that peft writes beside its weights (a directory
    holding one, or its ``adapter_model.*`` file); whatever its method (LoRA, IA3, ...): a spectral adapter cannot be
    loaded. Adapters renamed or moved away from their config are still refused by their LoRA keys when planned."""
    from ..statedict.plan import ADAPTER_FIX

    config = path / ADAPTER_CONFIG if path.is_dir() else path.parent / ADAPTER_CONFIG
    if (path.is_dir() or path.name.startswith("adapter_model")) and config.is_file():
        raise RefusedError(f"{path}: is a peft adapter ({config.name} beside its weights); {ADAPTER_FIX}; nothing "
                           "was written")  # fmt: skip


def name_max(directory: Path) -> int:
    """The longest file name ``directory`` takes, in bytes (255 where the system does not say)."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_output(inputs: Iterable[Path], target: Path, *, force: bool, directory: bool = False) -> None:
    """Refuse an output that would replace or remove an input, or anything unasked for.

    ``inputs`` are the input's paths (its file; for shards the directory, the index and every shard, followed
    through symlinks). The output may not be any of them, a directory holding one of them, or inside the input
    directory; it may not replace an existing path (a dangling symlink included) without ``force``, nor a FIFO
    or device even with it.
    """
    if len(os.fsencode(target.name)) > name_max(target.parent if target.parent.is_dir() else Path(".")):
        raise OutputError(f"{target}: cannot be written (its name is longer than the file system allows); no output "
                          "was written; choose a shorter name with -o")  # fmt: skip
    real_target = os.path.realpath(target)
    exists = os.path.lexists(target)
    for path in inputs:
        real = os.path.realpath(path)
        if real_target == real or (exists and os.path.exists(target) and os.path.samefile(target, path)):
            raise RefusedError(f"{target}: is the input; choose another output with -o")
        if _within(real, real_target):
            raise RefusedError(f"{target}: holds the input ({path}); choose another output with -o")
        if os.path.isdir(real) and _within(real_target, real):
            raise RefusedError(f"{target}: is inside the input directory; choose another output with -o")
    if exists:
        mode = target.lstat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            raise RefusedError(f"{target}: is {kind_of(mode)}; give a file path with -o")
        if stat.S_ISLNK(mode) and os.path.exists(target):  # an output replaces the link, never what it points to
            pointed = os.stat(target).st_mode
            if not (stat.S_ISREG(pointed) or stat.S_ISDIR(pointed)):
                raise RefusedError(f"{target}: is a symlink to {kind_of(pointed)}; an output is never written to or "
                                   "over a FIFO or a device; give another path with -o")  # fmt: skip
    if target.is_dir() and not directory:
        raise RefusedError(f"{target}: is a directory; give a file name with -o")
    if exists and directory and not target.is_dir():
        raise RefusedError(f"{target}: is a file; sharded output needs a directory name with -o")
    if not target.parent.is_dir():
        raise RefusedError(f"{target}: its directory does not exist; create it or choose another -o")
    if exists and not force:
        what = "is a dangling symlink" if not os.path.exists(target) else "already exists"
        raise RefusedError(f"{target}: {what}; pass --force to replace it")
