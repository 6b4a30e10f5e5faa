"""A whole optimizer ``state_dict()`` through convert or bake: which position is which parameter, each converted
kernel's state mapped by :func:`~spectral_cli.transform.optimizer.convert_state`, and the positions renumbered
for the parameter order of the model after registering (or, for bake, of the plain model).

A torch optimizer state dict keys parameters by position: ``param_groups[g]["params"]`` lists the ids, in the
order the optimizer was given its parameters, and ``state[id]`` holds each one's state. Registering moves a
conv's weight under ``parametrizations.weight.original``, after every other parameter of its module and its
submodules (torch adds the ``parametrizations`` submodule last), so an optimizer built after registering numbers
the parameters differently. :func:`parameter_order` gives that order from names alone;
:func:`convert_optimizer_state_dict` takes the names of the positions (from a model, exact) and
:func:`align_positions` finds them from a state dict's tensors when no model is at hand (the CLI): by order and
shape, refusing where more than one alignment fits.

Example:
    >>> import torch
    >>> from spectral_cli.statedict.plan import plan_convert
    >>> from spectral_cli.statedict.surgery import specs_of
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> net(torch.randn(2, 3, 8, 8)).sum().backward(); opt.step()
    >>> plan = plan_convert(specs_of(net.state_dict()), basis="rdft")
    >>> names, why = align_positions(opt.state_dict(), parameter_candidates(net.state_dict()))  # no model: the CLI
    >>> names == [n for n, _ in net.named_parameters()]  # with a model, its names make it exact
    True
    >>> out = convert_optimizer_state_dict(opt.state_dict(), names, plan.steps)
    >>> out.names, out.converted, out.dropped
    (['0.bias', '0.parametrizations.weight.original', '1.weight', '1.bias'], ['0.weight'], [])
    >>> tuple(out.state_dict["state"][1]["momentum_buffer"].shape)
    (8, 3, 3, 3)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SpectralError
from ..transform.kernels import spatial_shape
from ..transform.optimizer import DEFAULT_REAGE, DEFAULT_SECOND_MOMENT, convert_state
from .plan import Step

__all__ = [
    "BUFFER_SUFFIXES",
    "OptimizerState",
    "align_positions",
    "check_fits",
    "classify_optimizer",
    "convert_optimizer_state",
    "convert_optimizer_state_dict",
    "dropped_state",
    "parameter_candidates",
    "parameter_order",
]

#: state-dict entries that are buffers, never parameters (they have no optimizer slot)
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

#: per-parameter state entries that are counters, not a tensor of the parameter's shape
_SCALARS = frozenset({"step", "eta", "mu", "mu_product"})


@dataclass
class OptimizerState:
    """An optimizer state dict in new coordinates. ``names`` are the parameters of its positions, in order;
    ``optimizer`` the class that wrote it (:func:`classify_optimizer`); ``converted`` the parameters (by their
    old names) whose state was mapped to the new coordinates; ``approximated`` those of them whose state holds
    approximations (Adam's second moment); ``reaged`` the step count their states were re-aged to, if they were;
    ``dropped`` is ``(parameter, why)`` for each parameter whose state was dropped (``"*"``: every parameter's),
    which the optimizer starts afresh. Every other parameter's state is carried as it was."""

    state_dict: dict[str, Any]
    names: list[str]
    optimizer: str
    converted: list[str] = field(default_factory=list)
    approximated: list[str] = field(default_factory=list)
    reaged: int | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


#: options of every group: torch's own, those lr schedulers add (StepLR's initial_lr, OneCycleLR's max_lr ...), names
_ANY_OPTIMIZER = frozenset({"lr", "maximize", "params", "initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum",
                            "base_momentum", "param_names", "name"})  # fmt: skip

#: the parameter-group options of each torch optimizer (torch 2.14; older versions write subsets of them), and
#: the options that tell it from the others
_OPTIONS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    name: (frozenset(options.split()) | _ANY_OPTIMIZER, frozenset(marks.split()))
    for name, options, marks in (
        ("Muon", "adjust_lr_fn eps momentum nesterov ns_coefficients ns_steps weight_decay", "ns_steps"),
        ("SGD", "dampening differentiable foreach fused momentum nesterov weight_decay", "nesterov"),
        ("Adam", "amsgrad betas capturable decoupled_weight_decay differentiable eps foreach fused weight_decay",
         "amsgrad betas"),
        ("NAdam", "betas capturable decoupled_weight_decay differentiable eps foreach momentum_decay weight_decay",
         "momentum_decay"),
        ("RAdam", "betas capturable decoupled_weight_decay differentiable eps foreach weight_decay",
         "betas decoupled_weight_decay"),
        ("Adamax", "betas capturable differentiable eps foreach weight_decay", "betas weight_decay"),
        ("SparseAdam", "betas eps", "betas"),
        ("Adagrad", "differentiable eps foreach fused initial_accumulator_value lr_decay weight_decay", "lr_decay"),
        ("RMSprop", "alpha capturable centered differentiable eps foreach momentum weight_decay", "centered"),
        ("Adadelta", "capturable differentiable eps foreach rho weight_decay", "rho"),
        ("ASGD", "alpha capturable differentiable foreach lambd t0 weight_decay", "lambd"),
        ("Rprop", "capturable differentiable etas foreach step_sizes", "etas"),
        ("Adafactor", "beta2_decay d eps foreach weight_decay", "beta2_decay"),
        ("LBFGS", "history_size line_search_fn max_eval max_iter tolerance_change tolerance_grad", "history_size"),
    )
}  # fmt: skip


def classify_optimizer(state_dict: Mapping[str, Any]) -> str:
    """The torch optimizer class that wrote ``state_dict``, from its parameter groups' options (an optimizer
    state dict does not name its class): the first of torch's whose distinctive options it has and that has
    every option it holds; ``"unknown"`` when none (an optimizer of another package: timm's, bitsandbytes').
    Adam and AdamW write the same options: ``"AdamW"`` where ``decoupled_weight_decay`` is set.

    Example:
        >>> import torch
        >>> p = [torch.nn.Parameter(torch.zeros(2, 2))]
        >>> [classify_optimizer(o(p).state_dict()) for o in (torch.optim.AdamW, torch.optim.NAdam, torch.optim.Muon)]
        ['AdamW', 'NAdam', 'Muon']
        >>> classify_optimizer({"state": {}, "param_groups": [{"lr": 1, "betas": (0.9, 0.99), "wd_ratio": 0.1}]})
        'unknown'
    """
    groups = state_dict.get("param_groups") or [{}]
    g = groups[0] if isinstance(groups[0], Mapping) else {}
    keys = {k for k in g if isinstance(k, str)}
    for name, (options, marks) in _OPTIONS.items():
        if marks <= keys and keys <= options:
            return "AdamW" if name == "Adam" and g.get("decoupled_weight_decay") else name
    return "unknown"


def _module_tree(names: Iterable[str]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for name in names:
        node = root
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpectralError(f"parameter names clash: {name!r} is below another parameter")
        node[leaf] = name
    return root


def parameter_order(names: Iterable[str], first: Iterable[str] = ()) -> list[str]:
    """``names`` in the order ``named_parameters()`` lists them: each module's own parameters, then its
    submodules in the order they appear, ``parametrizations`` last (torch adds it when a weight is registered);
    names in ``first`` lead their module's own parameters (a baked weight: a plain conv registers its weight
    before its bias). A plain model's own order is unchanged.

    Example:
        >>> parameter_order(["c.parametrizations.weight.original", "c.bias", "n.weight"])
        ['c.bias', 'c.parametrizations.weight.original', 'n.weight']
        >>> parameter_order(["c.bias", "c.weight"], first=["c.weight"])
        ['c.weight', 'c.bias']
    """
    leading = set(first)

    def walk(node: dict[str, Any]) -> list[str]:
        own = [v for v in node.values() if isinstance(v, str)]
        own = [v for v in own if v in leading] + [v for v in own if v not in leading]
        subs = [(k, v) for k, v in node.items() if isinstance(v, dict)]
        subs = [s for s in subs if s[0] != "parametrizations"] + [s for s in subs if s[0] == "parametrizations"]
        return own + [n for _, sub in subs for n in walk(sub)]

    return walk(_module_tree(names))


def _positions(state_dict: Mapping[str, Any]) -> list[Any]:
    return [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]


def _state_shape(state: Any) -> tuple[int, ...] | bool | None:
    """The parameter shape a state's tensors tell (None: no state; False: tensors of different shapes)."""
    shapes = {
        tuple(v.shape)
        for k, v in (state or {}).items()
        if isinstance(v, torch.Tensor) and not (k in _SCALARS and v.dim() == 0)
    }
    if not shapes:
        return None
    return shapes.pop() if len(shapes) == 1 else False


def parameter_candidates(specs: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a state dict that may be parameters, as ``(name, shape)`` in the order
    ``named_parameters()`` lists them (:func:`parameter_order`): floating-point tensors but the known buffers
    (:data:`BUFFER_SUFFIXES`). ``specs`` maps names to anything with ``shape`` and ``dtype`` (tensors, or
    :class:`~spectral_cli.statedict.keys.TensorSpec`).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> [name for name, _ in parameter_candidates(net.state_dict())]
        ['0.weight', '0.bias', '1.weight', '1.bias']
    """

    def floating(spec: Any) -> bool:
        dtype = str(spec.dtype).removeprefix("torch.")
        return dtype.startswith(("float", "bfloat")) or dtype.startswith("complex")

    skip = (*BUFFER_SUFFIXES, "_extra_state")
    shapes = {name: tuple(spec.shape) for name, spec in specs.items() if not name.endswith(skip) and floating(spec)}
    return [(name, shapes[name]) for name in parameter_order(shapes)]


def align_positions(
    state_dict: Mapping[str, Any], candidates: Sequence[tuple[str, tuple[int, ...]]]
) -> tuple[list[str] | None, str]:
    """The parameter name of each position of an optimizer ``state_dict``, found without a model: positions
    are matched, in order, to ``candidates`` (the state dict's tensors that may be parameters, as ``(name,
    shape)`` in the model's parameter order: :func:`parameter_candidates`), a position's state tensors must
    have its parameter's shape, and exactly one alignment must fit. Returns ``(names, "")``, or ``(None, why)``
    where none fits, several do (shapes alike around a tensor that may or may not be a parameter: an unknown
    buffer, a frozen parameter, a tied one; a position without state), or the order is not the model's (several
    parameter groups).

    This assumes the optimizer was built over the parameters in the model's order (``model.parameters()``, or a
    part of them in order); what a state dict holds cannot tell otherwise where shapes agree.

    Example:
        >>> import torch
        >>> sd = {"state": {0: {"momentum_buffer": torch.zeros(4, 3)}, 1: {"momentum_buffer": torch.zeros(4)}},
        ...       "param_groups": [{"params": [0, 1]}]}
        >>> align_positions(sd, [("a.weight", (4, 3)), ("a.bias", (4,))])
        (['a.weight', 'a.bias'], '')
        >>> align_positions(sd, [("a.weight", (4, 3)), ("a.bias", (4,)), ("a.scale", (4,))])[1]
        'several alignments fit: its position 1 may be a.bias or a.scale'
    """
    groups = state_dict.get("param_groups", [])
    if len(groups) > 1:
        return None, (f"it has {len(groups)} parameter groups, whose positions need not follow the model's "
                      "parameter order")  # fmt: skip
    ids = _positions(state_dict)
    states = state_dict.get("state", {})
    n, m = len(ids), len(candidates)
    if n > m:
        return None, f"it has {n} parameters and the state dict only {m} tensors that may be parameters"
    shapes = [_state_shape(states.get(i)) for i in ids]
    for pos, shape in enumerate(shapes):
        if shape is False:
            return None, f"the state of its position {pos} holds tensors of different shapes"

    def fits(i: int, j: int) -> bool:
        return shapes[i] is None or shapes[i] == tuple(candidates[j][1])

    # can[i][j]: positions i.. align within candidates j..; reach[i][j]: positions ..i-1 within candidates ..j-1
    can = [[False] * (m + 1) for _ in range(n + 1)]
    reach = [[False] * (m + 1) for _ in range(n + 1)]
    can[n] = [True] * (m + 1)
    reach[0] = [True] * (m + 1)
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            can[i][j] = can[i][j + 1] or (fits(i, j) and can[i + 1][j + 1])
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            reach[i][j] = reach[i][j - 1] or (fits(i - 1, j - 1) and reach[i - 1][j - 1])
    if not can[0][0]:
        bad = next((i for i in range(min(n, m)) if not fits(i, i)), None)
        detail = ("" if bad is None else f": its position {bad}'s state has shape {shapes[bad]}, the state dict's "
                  f"{candidates[bad][0]} {tuple(candidates[bad][1])}")  # fmt: skip
        return None, f"its {n} parameters do not align with the state dict's {m} tensors that may be{detail}"
    # the earliest and the latest alignments: every alignment lies between them, position by position
    left, j = [], 0
    for i in range(n):
        while not (fits(i, j) and can[i + 1][j + 1]):
            j += 1
        left.append(j)
        j += 1
    right, j = [0] * n, m - 1
    for i in range(n - 1, -1, -1):
        while not (fits(i, j) and reach[i][j]):
            j -= 1
        right[i] = j
        j -= 1
    if left != right:
        pos = next(i for i in range(n) if left[i] != right[i])
        return None, (f"several alignments fit: its position {pos} may be {candidates[left[pos]][0]} or "
                      f"{candidates[right[pos]][0]}")  # fmt: skip
    return [candidates[j][0] for j in left], ""


def dropped_state(state_dict: Mapping[str, Any], why: str) -> OptimizerState:
    """``state_dict`` with every parameter's state dropped and its parameter groups kept (learning rates, a
    schedule's ``initial_lr``, the positions): loaded into the new optimizer, it starts every parameter afresh.

    Example:
        >>> out = dropped_state({"state": {0: {"step": 3}}, "param_groups": [{"lr": 0.1, "params": [0]}]}, "asked")
        >>> out.state_dict, out.dropped
        ({'state': {}, 'param_groups': [{'lr': 0.1, 'params': [0]}]}, [('*', 'asked')])
    """
    groups = copy.deepcopy(list(state_dict.get("param_groups", [])))
    return OptimizerState({"state": {}, "param_groups": groups}, [], classify_optimizer(state_dict),
                          dropped=[("*", why)])  # fmt: skip


def convert_optimizer_state_dict(
    state_dict: Mapping[str, Any],
    names: Sequence[str],
    steps: Iterable[Step],
    *,
    order: Sequence[str] | None = None,
    optimizer: str | None = None,
    second_moment: str = DEFAULT_SECOND_MOMENT,
    reage_to: int | None = DEFAULT_REAGE,
) -> OptimizerState:
    """An optimizer ``state_dict()`` after the plan's ``steps`` (all converts or all bakes): ``names`` are the
    parameters of its positions (``[n for n, _ in model.named_parameters()]`` for an optimizer built over
    ``model.parameters()``); each step's kernel has its state mapped (convert: ``to_spectral``, Adam's re-aged to
    ``reage_to`` steps, default :data:`~spectral_cli.transform.optimizer.DEFAULT_REAGE`; bake: ``to_spatial``,
    never re-aged) and is renamed to the step's target key. The positions are renumbered, group by group, in the
    parameter order of the new model: ``order`` (its parameter names, in order; a superset is fine), by default
    :func:`parameter_order` of the new names (bake: the baked weights first among their module's parameters).
    Step counts and parameter-group options are carried.

    ``optimizer`` is the class name (default: :func:`classify_optimizer`). A state that does not convert (an
    optimizer of :data:`~spectral_cli.transform.optimizer.DROPPED`, an unknown one) is dropped for the changed
    kernels only, and said in ``dropped``. The input is not modified. Raises :class:`SpectralError` where
    ``names`` does not have one name per position, or ``order`` lacks one.
    """
    ids = _positions(state_dict)
    if len(names) != len(ids) or len(set(names)) != len(names):
        raise SpectralError(f"the optimizer state has {len(ids)} parameters, and {len(names)} names were given "
                            f"({len(set(names))} distinct); give one name per parameter, in the optimizer's "
                            "order")  # fmt: skip
    by_source = {s.source_key: s for s in steps}
    actions = {s.action for s in by_source.values()}
    if len(actions) > 1:
        raise SpectralError("the steps of one optimizer state must all be converts or all bakes")
    bake = actions == {"bake"}
    kind = optimizer or classify_optimizer(state_dict)
    new_name = {n: by_source[n].target_key if n in by_source else n for n in names}
    renamed = list(new_name.values())
    if order is None:
        ranked = parameter_order(renamed, first=[new_name[s] for s in by_source if s in new_name] if bake else ())
    else:
        wanted = set(renamed)
        ranked = [n for n in order if n in wanted]
        if len(ranked) != len(wanted):
            missing = sorted(wanted - set(ranked))
            raise SpectralError(f"the model has no parameter {missing[0]!r}, which the optimizer state holds; build "
                                "the optimizer over this model's parameters")  # fmt: skip
    rank = {n: r for r, n in enumerate(ranked)}
    name_of = dict(zip(ids, names, strict=True))
    states = state_dict.get("state", {})
    out = OptimizerState({"state": {}, "param_groups": []}, [], kind)
    next_id = 0
    for group in state_dict.get("param_groups", []):
        members = sorted(group.get("params", []), key=lambda i: rank[new_name[name_of[i]]])
        new_group = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        new_group["params"] = list(range(next_id, next_id + len(members)))
        betas = tuple(group.get("betas", (0.9, 0.999)))
        for i in members:
            name = name_of[i]
            state = states.get(i)
            step = by_source.get(name)
            if state and step is not None:
                done = convert_state(state, kind, step.kernel_size, step.basis,
                                     "to_spatial" if bake else "to_spectral", second_moment=second_moment,
                                     reage_to=None if bake else reage_to,
                                     betas=(float(betas[0]), float(betas[1])))  # fmt: skip
                if done.state is None:
                    out.dropped.append((name, _unknown(group, state) if kind == "unknown" else done.reason or "?"))
                else:
                    out.state_dict["state"][next_id] = done.state
                    out.converted.append(name)
                    if done.approximated:
                        out.approximated.append(name)
                    if done.reaged is not None:
                        out.reaged = done.reaged
                    out.notes.extend(n for n in done.notes if n not in out.notes)
            elif state is not None:
                out.state_dict["state"][next_id] = copy.copy(dict(state))
            out.names.append(new_name[name])
            next_id += 1
        out.state_dict["param_groups"].append(new_group)
    return out


def _unknown(group: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """Why an unknown optimizer's state is dropped, naming what it holds."""
    options = ", ".join(sorted(str(k) for k in group if k != "params"))
    return (f"an optimizer spectral_cli does not know (options {options}; state {', '.join(sorted(map(str, state)))}); "
            "its state cannot be mapped")  # fmt: skip


_SPECTRAL = "parametrizations.weight.original"


def _plain_name(name: str) -> str:
    return name.removesuffix(_SPECTRAL) + "weight" if name.endswith(_SPECTRAL) else name


def convert_optimizer_state(
    model: torch.nn.Module,
    state_dict: Mapping[str, Any],
    names: Sequence[str] | None = None,
    *,
    second_moment: str = DEFAULT_SECOND_MOMENT,
    reage_to: int | None = DEFAULT_REAGE,
) -> OptimizerState:
    """A live model's optimizer state, for an optimizer built after registering: ``model`` is the model after
    :func:`~spectral_cli.register_spectral_parametrization`, ``state_dict`` the ``state_dict()`` of the optimizer
    built before, and ``names`` the parameter names of its positions, taken before registering (default: the
    model's parameters in the order ``model.parameters()`` listed them then, for an optimizer built over all of
    them). Each weight now under the spectral parametrization has its state converted (exact first moments; see
    :func:`convert_optimizer_state_dict`), and the positions follow ``model.named_parameters()``. Load the
    result's ``state_dict`` into the new optimizer.

    Example:
        >>> import torch
        >>> from spectral_cli import convert_optimizer_state, register_spectral_parametrization
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        >>> net(torch.randn(2, 3, 9, 9)).square().mean().backward(); opt.step()
        >>> _ = register_spectral_parametrization(net, basis="rdft")
        >>> new = torch.optim.Adam(net.parameters(), lr=1e-3)
        >>> converted = convert_optimizer_state(net, opt.state_dict())
        >>> converted.names[:2], converted.converted, converted.reaged
        (['0.bias', '0.parametrizations.weight.original'], ['0.weight', '2.weight'], None)
        >>> new.load_state_dict(converted.state_dict)
        >>> new.step()  # the converted state fits the registered parameters
    """
    from ..parametrization import spectral_parametrization_of

    if not isinstance(model, torch.nn.Module):
        raise SpectralError(f"convert_optimizer_state takes the registered nn.Module first, got {type(model).__name__}")
    after = [n for n, _ in model.named_parameters()]
    if names is None:
        plain = [_plain_name(n) for n in after]
        names = parameter_order(plain, first=[p for p, n in zip(plain, after, strict=True) if p != n])
    steps = []
    for module_name, module in model.named_modules():
        p = spectral_parametrization_of(module)
        if p is None:
            continue
        source = f"{module_name}.weight" if module_name else "weight"
        original = module.parametrizations.weight.original
        target, dtype = f"{module_name}.{_SPECTRAL}" if module_name else _SPECTRAL, str(original.dtype)[6:]
        before = spatial_shape(tuple(original.shape), p.kernel_size, p.basis)
        steps.append(Step("convert", module_name, source, target, p.basis, p.kernel_size, before,
                          tuple(original.shape), dtype, dtype))  # fmt: skip
    return convert_optimizer_state_dict(state_dict, names, steps, order=after, second_moment=second_moment,
                                        reage_to=reage_to)  # fmt: skip


def check_fits(state_dict: Mapping[str, Any], optimizer: torch.optim.Optimizer, where: str) -> None:
    """Raise :class:`SpectralError` unless ``state_dict`` loads into ``optimizer`` position by position: as many
    parameter groups of the same sizes, and every state tensor of its parameter's shape (torch's
    ``load_state_dict`` checks only the sizes).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
        >>> state = {"state": {0: {"momentum_buffer": torch.zeros(2)}}, "param_groups": [{"params": [0]}]}
        >>> try:
        ...     check_fits(state, opt, "f")
        ... except SpectralError as e:
        ...     print(str(e)[:80])
        f: its optimizer state does not fit the optimizer: position 0 holds state of sha
    """
    fix = "build the optimizer after registering, over model.parameters()"
    groups, own = list(state_dict.get("param_groups", [])), optimizer.param_groups
    sizes, own_sizes = [len(g.get("params", [])) for g in groups], [len(g["params"]) for g in own]
    if sizes != own_sizes:
        raise SpectralError(f"{where}: its optimizer state has parameter groups of {sizes} parameters, the optimizer "
                            f"{own_sizes}; {fix}")  # fmt: skip
    states = state_dict.get("state", {})
    params = [p for g in own for p in g["params"]]
    for pos, (i, p) in enumerate(zip(_positions(state_dict), params, strict=True)):
        shape = _state_shape(states.get(i))
        if shape is not None and shape != tuple(p.shape):
            raise SpectralError(f"{where}: its optimizer state does not fit the optimizer: position {pos} holds state "
                                f"of shape {shape} for a parameter of shape {tuple(p.shape)}; {fix}")  # fmt: skip
