"""Optimizer state in checkpoint files, through convert and bake: a torch container's entries (``{"model": ...,
"optimizer": ...}``, Lightning's ``optimizer_states`` list) and a distributed checkpoint's optimizer entries.

The math and the alignment are :mod:`spectral_cli.statedict.optimizer`'s; here each optimizer state of a file
is matched to the state dict it belongs to (the container's first), converted or dropped as the user chose
(``--optimizer convert|drop``), and said in an :class:`OptimizerReport`. Nothing is printed or written here.

- A position-keyed state (``optimizer.state_dict()``) has its positions aligned with the state dict's
  parameter tensors by order and shape (:func:`~spectral_cli.statedict.optimizer.align_positions`); where that
  is ambiguous or does not fit, every parameter's state is dropped (the parameter groups kept: learning rates,
  a schedule's ``initial_lr``), with the reason.
- A name-keyed state (DCP's ``get_optimizer_state_dict``: ``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``,
  nested or flattened) is exact: each converted layer's entries are renamed (``conv.weight`` ->
  ``conv.parametrizations.weight.original``) and their values converted.

Example:
    >>> import torch
    >>> from spectral_cli.statedict.plan import plan_convert
    >>> from spectral_cli.statedict.surgery import specs_of
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> opt = torch.optim.Adam(net.parameters())
    >>> net(torch.randn(2, 3, 8, 8)).sum().backward(); opt.step()
    >>> plan = plan_convert(specs_of(net.state_dict()))
    >>> new, report = convert_positional(opt.state_dict(), net.state_dict(), plan.steps, "convert", "optimizer")
    >>> report.optimizer, report.converted, report.dropped, len(new["state"])
    ('Adam', ['0.weight'], [], 4)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import SpectralError
from ..statedict.optimizer import (
    OptimizerState,
    align_positions,
    classify_optimizer,
    convert_optimizer_state_dict,
    dropped_state,
    parameter_candidates,
)
from ..statedict.plan import Step
from ..transform.optimizer import DEFAULT_REAGE, DEFAULT_SECOND_MOMENT, convert_state

#: what ``--optimizer`` may say
OptimizerMode = Literal["convert", "drop"]
OPTIMIZER_MODES: tuple[str, ...] = ("convert", "drop")

#: why every parameter's state is dropped with ``--optimizer drop``
DROP_ASKED = "--optimizer drop"


@dataclass
class OptimizerReport:
    """What convert or bake did to one optimizer state of a file: ``where`` it is (``"optimizer_states/0"``,
    DCP's ``"optim"``); the optimizer class; its parameters; those whose state was converted, and of them those
    holding approximations (re-aged to ``reaged`` steps); ``(parameter, why)`` of those whose state was dropped
    (``"*"``: every parameter's); ``removed`` when the whole entry was left out of the output."""

    where: str
    optimizer: str
    parameters: int
    converted: list[str] = field(default_factory=list)
    approximated: list[str] = field(default_factory=list)
    reaged: int | None = None
    second_moment: str = DEFAULT_SECOND_MOMENT
    dropped: list[tuple[str, str]] = field(default_factory=list)
    removed: bool = False

    @classmethod
    def of(cls, where: str, state: OptimizerState, parameters: int) -> OptimizerReport:
        return cls(where, state.optimizer, parameters, list(state.converted), list(state.approximated),
                   state.reaged, dropped=list(state.dropped))  # fmt: skip

    def warnings(self) -> list[str]:
        """The lines to warn with: the states dropped, and why."""
        if self.removed:
            return [f"optimizer state {self.where} left out ({self.dropped[0][1]}): rebuild the optimizer after "
                    "loading"]  # fmt: skip
        everything = [why for name, why in self.dropped if name == "*"]
        if everything:
            return [f"optimizer state {self.where}: every parameter's state dropped ({everything[0]}); the "
                    "parameter groups (learning rates) are kept, the optimizer restarts its moments"]  # fmt: skip
        reasons: dict[str, list[str]] = {}
        for name, why in self.dropped:
            reasons.setdefault(why, []).append(name)
        return [f"optimizer state {self.where}: the state of {_listed(names)} dropped ({why}); they restart their "
                "moments" for why, names in reasons.items()]  # fmt: skip

    def line(self, verb: str = "converted") -> str:
        """One line for the command's output: what happened to this state (``verb``: ``"baked"`` for bake)."""
        if self.removed or any(name == "*" for name, _ in self.dropped):
            return f"optimizer state {self.where} ({self.optimizer}): dropped"
        said = f"optimizer state {self.where} ({self.optimizer}): {len(self.converted)} kernels {verb}"
        if self.approximated:
            some = "" if len(self.approximated) == len(self.converted) else f"{len(self.approximated)} "
            said += f" ({some}second moments approximated by the {self.second_moment} map"
            said += (f", re-aged to {self.reaged} steps" if self.reaged else "") + ")"
        if self.dropped:
            said += f", {len(self.dropped)} dropped"
        carried = self.parameters - len(self.converted) - len(self.dropped)
        return said + f", {carried} other parameters carried"


def _listed(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _count(state_dict: Mapping[str, Any]) -> int:
    return sum(len(g.get("params", [])) for g in _groups(state_dict))


def _groups(state_dict: Mapping[str, Any]) -> list[Any]:
    groups = state_dict.get("param_groups", [])
    return list(groups.values()) if isinstance(groups, Mapping) else list(groups)


def convert_positional(
    state_dict: Mapping[str, Any],
    model: Mapping[str, Any],
    steps: Iterable[Step],
    mode: OptimizerMode,
    where: str,
) -> tuple[dict[str, Any], OptimizerReport]:
    """A position-keyed optimizer ``state_dict`` converted (or baked, by the ``steps``) for ``model``, the state
    dict it belongs to (names to anything with a ``shape`` and ``dtype``): positions aligned by order and shape,
    or every state dropped with the reason where they do not align, or ``mode`` is ``"drop"``. A state dict not
    laid out as torch writes one is dropped whole, groups included (loading it into an optimizer then fails)."""
    try:
        return _convert_positional(state_dict, model, list(steps), mode, where)
    except (SpectralError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        why = f"it is not laid out as torch writes one ({type(e).__name__}: {str(e)[:80]})"
        return {"state": {}, "param_groups": []}, OptimizerReport(where, "unknown", 0, dropped=[("*", why)])


def _convert_positional(
    state_dict: Mapping[str, Any], model: Mapping[str, Any], steps: list[Step], mode: OptimizerMode, where: str
) -> tuple[dict[str, Any], OptimizerReport]:
    if mode == "drop":
        dropped = dropped_state(state_dict, DROP_ASKED)
    else:
        names, why = align_positions(state_dict, parameter_candidates(model))
        if names is None:
            dropped = dropped_state(state_dict, f"its positions cannot be matched to the parameters: {why}")
        else:
            try:
                return _done(convert_optimizer_state_dict(state_dict, names, steps), where, state_dict)
            except SpectralError as e:
                dropped = dropped_state(state_dict, str(e))
    return _done(dropped, where, state_dict)


def _done(state: OptimizerState, where: str, before: Mapping[str, Any]) -> tuple[dict[str, Any], OptimizerReport]:
    return state.state_dict, OptimizerReport.of(where, state, _count(before))


def is_optimizer_state(value: Any) -> bool:
    """An optimizer ``state_dict()``."""
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def convert_container(
    obj: Mapping[str, Any], model: Mapping[str, Any], steps: Iterable[Step], mode: OptimizerMode
) -> tuple[dict[str, Any], list[OptimizerReport]]:
    """The optimizer entries of a torch container (an optimizer state dict, or a list of them), each converted for
    ``model``, the container's state dict: ``(replaced entries, reports)``."""
    steps = list(steps)
    replaced: dict[str, Any] = {}
    reports: list[OptimizerReport] = []
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        if is_optimizer_state(value):
            replaced[key], report = convert_positional(value, model, steps, mode, key)
            reports.append(report)
        elif isinstance(value, list | tuple) and value and all(is_optimizer_state(v) for v in value):
            states = []
            for i, v in enumerate(value):
                new, report = convert_positional(v, model, steps, mode, f"{key}/{i}")
                states.append(new)
                reports.append(report)
            replaced[key] = type(value)(states)
    return replaced, reports


# ---- distributed checkpoints: entries by their path below the optimizer's top-level entry ----------------------

Path = tuple[Any, ...]


def parsed_path(tail: Path) -> tuple[str, Any, str] | None:
    """``(section, id, key)`` of an entry: ``("state", "conv.weight", "exp_avg")`` from the nested path or the
    flattened name (``state.conv.weight.exp_avg``); ``("param_groups", 0, "lr")``."""
    if len(tail) == 3 and tail[0] in ("state", "param_groups"):
        return str(tail[0]), tail[1], str(tail[2])
    if len(tail) == 1 and isinstance(tail[0], str):
        section, _, rest = tail[0].partition(".")
        ident, _, key = rest.rpartition(".")
        if section in ("state", "param_groups") and ident and key:
            return section, ident, key
    return None


def convert_dcp_entries(
    entries: Mapping[Path, Any],
    model: Mapping[str, Any],
    steps: Iterable[Step],
    where: str,
) -> tuple[dict[Path, Any], OptimizerReport]:
    """A DCP optimizer entry (its values by their path below it) converted for ``model``, the state dict of the
    same checkpoint it belongs to (names relative to that state dict, as the optimizer's are); one not laid out
    as torch writes one is reported ``removed`` (left out of the output)."""
    try:
        return _convert_dcp_entries(entries, model, list(steps), where)
    except (SpectralError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        why = f"it is not laid out as torch writes one ({type(e).__name__}: {str(e)[:80]})"
        return {}, OptimizerReport(where, "unknown", 0, dropped=[("*", why)], removed=True)


def _convert_dcp_entries(
    entries: Mapping[Path, Any], model: Mapping[str, Any], steps: list[Step], where: str
) -> tuple[dict[Path, Any], OptimizerReport]:
    parsed = {tail: parsed_path(tail) for tail in entries}
    unknown = [tail for tail, p in parsed.items() if p is None]
    groups: dict[Any, dict[str, Any]] = {}
    states: dict[Any, dict[str, Any]] = {}
    for tail, p in parsed.items():
        if p is not None:
            (states if p[0] == "state" else groups).setdefault(p[1], {})[p[2]] = entries[tail]
    params = [i for g in groups.values() for i in g.get("params", [])]
    if unknown:
        osd: dict[str, Any] = {"state": {}, "param_groups": list(groups.values())}
        return {}, removed_report(where, osd, f"it holds entries spectral_cli does not know: {unknown[0]}")
    if params and all(isinstance(i, int) for i in params):  # optimizer.state_dict() saved as it is: positions
        osd = {"state": {int(k): v for k, v in states.items()},
               "param_groups": [groups[k] for k in sorted(groups)]}  # fmt: skip
        new, report = convert_positional(osd, model, steps, "convert", where)
        positional: dict[Path, Any] = {
            ("state", str(i), key): value for i, st in new["state"].items() for key, value in st.items()
        }
        positional |= {
            ("param_groups", gi, key): value for gi, g in enumerate(new["param_groups"]) for key, value in g.items()
        }
        return positional, report
    return _by_name(entries, parsed, states, groups, steps, where)


def removed_report(where: str, osd: Mapping[str, Any], why: str) -> OptimizerReport:
    return OptimizerReport(where, classify_optimizer(osd), _count(osd), dropped=[("*", why)], removed=True)


def _by_name(
    entries: Mapping[Path, Any],
    parsed: Mapping[Path, tuple[str, Any, str] | None],
    states: Mapping[Any, dict[str, Any]],
    groups: Mapping[Any, dict[str, Any]],
    steps: list[Step],
    where: str,
) -> tuple[dict[Path, Any], OptimizerReport]:
    """A name-keyed DCP optimizer state: each converted layer's entries renamed and their values converted."""
    flat = any(len(tail) == 1 for tail in entries)
    options = next(iter(groups.values()), {})
    osd = {"state": {}, "param_groups": [options]}
    kind = classify_optimizer(osd)
    by_source = {s.source_key: s for s in steps}
    renamed = {s.source_key: s.target_key for s in steps}
    bake = any(s.action == "bake" for s in steps)
    betas = tuple(options.get("betas", (0.9, 0.999)))
    names = set(states) | ({i for g in groups.values() for i in g.get("params", [])} if not flat else set(groups))
    report = OptimizerReport(where, kind, len(names))
    converted: dict[Any, dict[str, Any] | None] = {}
    for name, state in states.items():
        step = by_source.get(name)
        if step is None:
            continue
        done = convert_state(state, kind, step.kernel_size, step.basis, "to_spatial" if bake else "to_spectral",
                             reage_to=None if bake else DEFAULT_REAGE,
                             betas=(float(betas[0]), float(betas[1])))  # fmt: skip
        converted[name] = done.state
        if done.state is None:
            report.dropped.append((name, done.reason or "not convertible"))
            continue
        report.converted.append(name)
        if done.approximated:
            report.approximated.append(name)
        if done.reaged is not None:
            report.reaged = done.reaged

    def new_name(name: Any) -> Any:
        return renamed.get(name, name) if isinstance(name, str) else name

    out: dict[Path, Any] = {}
    for tail, p in parsed.items():
        assert p is not None
        section, ident, key = p
        value = entries[tail]
        if section == "state" and ident in converted:
            new_state = converted[ident]
            if new_state is None:
                continue
            value = new_state[key]
        elif section == "param_groups" and key == "params" and isinstance(value, list):
            value = [new_name(i) for i in value]
        ident = new_name(ident) if (section == "state" or flat) else ident
        out[(f"{section}.{ident}.{key}",) if flat else (section, ident, key)] = value
    return out, report
