"""What convert and bake report about a file (shared by the torch and the streamed safetensors paths)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .surgery import LayerChange, Skipped

#: ``progress(bytes_done, bytes_total, tensors_done, tensors_total)``, called as pieces and tensors are written
Progress = Callable[[int, int, int, int], None]


@dataclass
class FileReport:
    """What convert or bake did to a file. ``location`` names the state dict inside a container."""

    source: Path
    target: Path | None
    input_format: str
    output_format: str | None
    changed: list[tuple[str, LayerChange]] = field(default_factory=list)
    skipped: list[tuple[str, Skipped]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    written: bool = False
    message: str = ""
    files: list[Path] = field(default_factory=list)
