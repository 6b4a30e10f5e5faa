"""One call from a converted checkpoint to a model that trains in the spectral parametrization.

:func:`load_spectral` reads a converted file (torch, safetensors, a shard directory; a trainer's container) or a
state dict, registers the spectral parametrization on exactly the layers it records, with the recorded basis
and kernel size, and loads it with ``strict=True``. Everything is checked before the model is touched: a layer
the model lacks, a kernel size or basis that differs, keys that would not load, each is one
:class:`~spectral_cli.SpectralError` naming both sides.

With ``optimizer=``, an optimizer built over the registered model's parameters is given the file's optimizer state
(``spectral convert`` converted it for the registered parameters, in their order), so training resumes where the
checkpoint left it: register first (:func:`~spectral_cli.register_spectral_parametrization`, or a first
``load_spectral``), build the optimizer, then load.

Example:
    >>> import torch
    >>> from spectral_cli import convert_state_dict, load_spectral
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    >>> converted = convert_state_dict(net.state_dict(), basis="rdft", exclude="2").state_dict
    >>> fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    >>> load_spectral(fresh, converted)
    Loaded(registered=(('0', 'rdft', (3, 3)),), already=(), source='state dict', location='', prefix='', optimizer='')
    >>> type(fresh[0]).__name__, type(fresh[2]).__name__
    ('ParametrizedConv2d', 'Conv2d')
"""

from __future__ import annotations

import contextlib
import glob
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SpectralError
from ..parametrization import (
    CONV_TYPES,
    plan_spectral_parametrization,
    register_spectral_parametrization,
    spectral_parametrization_of,
)
from ..statedict.keys import SPECTRAL_SUFFIX, key_prefix, module_name, spectral_key
from ..statedict.plan import spectral_step
from ..statedict.surgery import records_of, specs_of
from ..transform.kernels import Basis
from .registry import open_source


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_spectral` did: ``(layer, basis, kernel size)`` registered, layers that already were (with
    the same basis), the source, the state dict's location in its container, the key prefix it dropped, and the
    container entry the optimizer state was loaded from (``""``: none was asked for)."""

    registered: tuple[tuple[str, Basis, tuple[int, ...]], ...]
    already: tuple[str, ...]
    source: str
    location: str
    prefix: str
    optimizer: str = ""


def _read(
    source: Path, location: str | None, trust_pickle: bool, optimizer: bool = False
) -> tuple[Mapping[str, Any], dict[str, Any], str, tuple[str, Mapping[str, Any]] | None]:
    """The state dict of a checkpoint file (its tensors read whole), its records, its location, and (when asked
    for) its optimizer state with where it is."""
    with contextlib.closing(open_source(source, trust_pickle=trust_pickle)) as src:
        parts = src.parts
        if location is not None:
            parts = [p for p in parts if p.label == location]
            if not parts:
                found = ", ".join(repr(p.label) for p in src.parts)
                raise SpectralError(
                    f"{source}: holds no state dict at {location!r} (it holds {found}); pass one of them"
                )
        part = parts[0]
        values = part.values if part.values is not None else {k: part.tensor(k).whole() for k in part.specs}
        return values, dict(part.records), part.label, _optimizer_state(source, src) if optimizer else None


def _optimizer_state(source: Path, src: Any) -> tuple[str, Mapping[str, Any]]:
    """The one optimizer state of a torch file's container (``optimizer``, or Lightning's ``optimizer_states``)."""
    from .optimizer_state import is_optimizer_state

    obj = getattr(src, "obj", None)
    if obj is None:
        raise SpectralError(
            f"{source}: optimizer= restores optimizer state from a torch file's container; load a "
            f"{src.format} checkpoint's with its own tools (DCP: set_optimizer_state_dict)"
        )
    found: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in obj.items() if isinstance(obj, Mapping) else ():
        if is_optimizer_state(value):
            found.append((str(key), value))
        elif isinstance(value, list | tuple) and value and all(is_optimizer_state(v) for v in value):
            found += [(f"{key}/{i}", v) for i, v in enumerate(value)]
    if len(found) != 1:
        what = (
            "no optimizer state" if not found else f"{len(found)} optimizer states ({', '.join(w for w, _ in found)})"
        )
        raise SpectralError(f"{source}: holds {what}; optimizer= restores exactly one (convert the checkpoint with "
                            "--optimizer convert, or load several yourself)")  # fmt: skip
    return found[0]


def load_spectral(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    *,
    location: str | None = None,
    trust_pickle: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> Loaded:
    """Register the spectral parametrization on the layers ``source`` stores as spectral, then load it strictly.

    ``source`` is a converted checkpoint file or directory (any format ``spectral convert`` writes; in a container
    the first state dict, or the one at ``location``, such as ``"state_dict"``), or a state dict. A wrapper prefix
    of its keys that the model's own keys do not have (``module.``, Lightning's ``model.``) is dropped. Layers the
    model already has registered must have the recorded basis. Spectral tensors without a record (written by
    pytorch-parametrizations) are ``rfft`` with the model's kernel size.

    ``optimizer``: an optimizer built over the model's parameters after registering, given the file's optimizer
    state (a torch container's one ``optimizer`` or ``optimizer_states`` entry, converted by ``spectral
    convert``), once its groups and every state's shape are checked against the optimizer's parameters.

    Example:
        >>> import pathlib, tempfile
        >>> from spectral_cli import convert_file, register_spectral_parametrization
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> opt = torch.optim.Adam(net.parameters())
        >>> net(torch.randn(2, 3, 9, 9)).square().mean().backward(); opt.step()
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ckpt.pt"
        >>> torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, path)
        >>> _ = convert_file(path)  # as spectral convert ckpt.pt: the optimizer state converted too
        >>> fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> _ = register_spectral_parametrization(fresh)
        >>> resumed = torch.optim.Adam(fresh.parameters())
        >>> load_spectral(fresh, path.with_name("ckpt.spectral.pt"), optimizer=resumed).optimizer
        'optimizer'
        >>> resumed.step()
    """
    if not isinstance(model, nn.Module):
        raise SpectralError(f"load_spectral takes an nn.Module, got {type(model).__name__}")
    state = None
    if isinstance(source, Mapping):
        if optimizer is not None:
            raise SpectralError(
                "optimizer= restores the optimizer state of a checkpoint file; for a state dict "
                "in memory, load convert_optimizer_state(model, old_state).state_dict into it"
            )
        where, records, found_at = "state dict", records_of(source), ""
        values: Mapping[str, Any] = source
    else:
        where = str(source)
        values, records, found_at, state = _read(Path(source), location, trust_pickle, optimizer is not None)
    own = key_prefix(model.state_dict())
    prefix = key_prefix(values)
    dropped = prefix[len(own) :] if prefix.startswith(own) else ""
    plan = _plan(model, values, records, dropped, where)
    todo = {name for name, (_, _, now) in plan.items() if now}
    if optimizer is not None and state is not None:  # before the model is touched
        from ..statedict.optimizer import check_fits

        _check_optimizer(model, optimizer, todo)
        check_fits(state[1], optimizer, f"{where} ({state[0]})")
    registration = plan_spectral_parametrization(model, include=[glob.escape(n) for n in todo]) if todo else None
    refused = [(n, reason) for n, reason in registration.skipped if n in todo] if registration else []
    if refused:
        raise SpectralError(f"{where} stores {refused[0][0]!r} as spectral, but it cannot be registered on the model "
                            f"({refused[0][1]})")  # fmt: skip
    expected = _expected_keys(model, plan)
    given = {k[len(dropped) :] for k in values}
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise SpectralError(
            f"{where} does not fit the model: it lacks {missing[:3]} and has {unexpected[:3]} that the model does not"
            f" ({len(missing)} and {len(unexpected)} keys); check that it was converted from this architecture"
        )
    registered, already = [], []
    for name, (basis, ks, registered_now) in plan.items():
        if not registered_now:
            already.append(name)
            continue
        register_spectral_parametrization(model, basis=basis, include=[glob.escape(name)])
        registered.append((name, basis, ks))
    model.load_state_dict(_without_prefix(values, dropped), strict=True)
    if optimizer is not None and state is not None:
        optimizer.load_state_dict(dict(state[1]))
    return Loaded(tuple(registered), tuple(already), where, found_at, dropped, state[0] if state else "")


def _check_optimizer(model: nn.Module, optimizer: Any, todo: set[str]) -> None:
    """The optimizer must hold the model's parameters as they will be once ``todo`` is registered."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SpectralError(f"optimizer= takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    modules = dict(model.named_modules())
    gone = {id(modules[name].weight) for name in todo}
    own = {id(p) for p in model.parameters()} - gone
    if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
        raise SpectralError(
            "the optimizer holds parameters the model does not have once registered (built before "
            "registering: the weights it holds go); register first (register_spectral_parametrization"
            "(model), or load_spectral(model, path)), then build it over model.parameters()"
        )


def _without_prefix(values: Mapping[str, Any], prefix: str) -> OrderedDict[str, Any]:
    """``values`` with ``prefix`` dropped from every key, torch's ``_metadata`` (module versions, which modules
    such as quantized ones read when loading) included."""
    state: OrderedDict[str, Any] = OrderedDict((k[len(prefix) :], v) for k, v in values.items())
    metadata = getattr(values, "_metadata", None)
    if isinstance(metadata, Mapping):
        module = prefix.removesuffix(".")
        state._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == module else k[len(prefix) :], v)
            for k, v in metadata.items()
            if not prefix or k == module or k.startswith(prefix)
        )
    return state


def _plan(
    model: nn.Module, values: Mapping[str, Any], records: Mapping[str, Any], dropped: str, where: str
) -> dict[str, tuple[Basis, tuple[int, ...], bool]]:
    """Layer -> (basis, kernel size, whether to register it): every spectral tensor of ``values`` checked against
    the model's layer of that name."""
    modules = dict(model.named_modules())
    plan = {}
    specs = specs_of({k: v for k, v in values.items() if isinstance(v, torch.Tensor)})
    for key, spec in specs.items():
        if not key.endswith(SPECTRAL_SUFFIX):
            continue
        name = module_name(key[len(dropped) :], SPECTRAL_SUFFIX)
        layer = modules.get(name)
        if not isinstance(layer, CONV_TYPES):
            what = "has no layer" if layer is None else f"has a {type(layer).__name__}, not a conv, at"
            raise SpectralError(f"the model {what} {name!r}, which {where} stores as spectral ({key})")
        kernel_size = tuple(layer.kernel_size)  # type: ignore[arg-type]
        step = spectral_step(key, spec, records, kernel_size)
        if step is None:
            raise SpectralError(f"{where}: {key} of shape {spec.shape} is not a spectral kernel of {name!r} "
                                f"(kernel size {kernel_size})")  # fmt: skip
        if step.kernel_size != kernel_size:
            raise SpectralError(f"{where} stores {name!r} with kernel size {step.kernel_size}, the model's layer has "
                                f"{kernel_size}; check that it was converted from this architecture")  # fmt: skip
        current = spectral_parametrization_of(layer)
        if current is not None and current.basis != step.basis:
            raise SpectralError(f"{where} stores {name!r} in the {step.basis} basis, the model has it registered in "
                                f"{current.basis}; undo that registration or convert with --basis "
                                f"{current.basis}")  # fmt: skip
        plan[name] = (step.basis, step.kernel_size, current is None)
    return plan


def _expected_keys(model: nn.Module, plan: Mapping[str, tuple[Basis, tuple[int, ...], bool]]) -> set[str]:
    """The model's state-dict keys once the planned layers are registered."""
    keys = set()
    for key in model.state_dict():
        name, _, leaf = key.rpartition(".")
        if leaf == "weight" and name in plan and plan[name][2]:
            key = spectral_key(name)
        keys.add(key)
    return keys
