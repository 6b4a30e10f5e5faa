"""What convert or bake did to a file: the report the operations return, and the sentences it says."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..statedict.plan import Skipped
from ..statedict.surgery import LayerChange
from .optimizer_state import OptimizerReport
from .verify import Verified


@dataclass
class FileReport:
    """What convert or bake did to a file. Each change and skip comes with its location: the container keys of
    the state dict it belongs to (``"state_dict"``; ``""`` for a bare state dict)."""

    source: Path
    target: Path | None
    input_format: str
    output_format: str | None
    changed: list[tuple[str, LayerChange]] = field(default_factory=list)
    skipped: list[tuple[str, Skipped]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    #: what became of each optimizer state the input holds
    optimizer: list[OptimizerReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    written: bool = False
    #: tensors of the output read back and compared with the input before it was renamed into place
    verified: int = 0
    message: str = ""


def measured_on_disk(report: FileReport, verified: Verified) -> None:
    """The report's errors are those measured on the written output (and it says how many tensors were read back)."""
    report.verified = verified.tensors
    report.changed = [
        (where, LayerChange.of(change, verified.errors[where, change.source_key])) for where, change in report.changed
    ]


def skip_summary(report: FileReport) -> str:
    """``"; skipped: 1x1 kernel (3), excluded (1)"``: why the tensors that looked like kernels were left, then how
    to convert those that can be (``"; to convert the pruned (weight_orig, weight_mask) ones, make ..."``)."""
    reasons = Counter((s.reason, s.fix) for _, s in report.skipped)
    if not reasons:
        return ""
    by_fix: dict[str, list[str]] = {}
    for reason, fix in reasons:
        if fix:
            by_fix.setdefault(fix, []).append(reason)
    said = ", ".join(f"{reason} ({n})" for (reason, _), n in reasons.most_common())
    fixes = "".join(f"; to convert the {' and '.join(kinds)} ones, {fix}" for fix, kinds in by_fix.items())
    return f"; skipped: {said}{fixes}"


def warn_nonfinite(report: FileReport) -> None:
    """A warning for each kernel that holds NaN or Inf values (its measured error is not finite)."""
    for _, change in report.changed:
        if not math.isfinite(change.max_error):
            report.warnings.append(
                f"{change.source_key}: holds NaN or Inf values; written anyway, and the transform spreads "
                "them over every tap of the kernels that hold them"
            )
