"""What the benchmarks share without torch: how a result is published."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def publish(result: dict[str, Any], json_path: Path | None, render: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Write ``result`` as JSON to ``json_path`` (if given), print its rendering, and return it."""
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
    print(render(result))
    return result
