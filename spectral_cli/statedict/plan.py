"""Plans over tensor specs: what convert or bake will do, from each tensor's name, shape and dtype alone.
Imports no torch.

A plan says which keys become which, with which shapes. :mod:`.surgery` executes its steps on tensors; the
safetensors writer lays out an output header from it before any data is read; ``spectral inspect`` lists a
safetensors file from its header alone with :func:`describe`. Which kernels are converted is decided by one rule,
:func:`~spectral_cli.statedict.selection.why_not_convertible`, the registrar's too.

Example:
    >>> specs = {"conv.weight": TensorSpec((8, 3, 3, 3), "float32"), "conv.bias": TensorSpec((8,), "float32")}
    >>> plan = plan_convert(specs)
    >>> [(s.source_key, s.target_key, s.shape_after) for s in plan.steps]
    [('conv.weight', 'conv.parametrizations.weight.original', (2, 8, 3, 3, 2))]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..errors import AmbiguousKernelSizeError, RefusedError, SpectralError
from ..transform.kernels import (
    CONVERTIBLE_DTYPES,
    DEFAULT_BASIS,
    Basis,
    check_basis,
    spatial_shape,
    spectral_kernel_shape,
    spectral_shape,
)
from .keys import (
    COMPLEX_DTYPES,
    COMPRESSAI_SUFFIX,
    SPECTRAL_SUFFIX,
    TensorSpec,
    infer_kernel_size,
    is_conv_kernel_key,
    mask_key,
    module_name,
    module_of,
    spectral_key,
    weight_key,
)
from .records import LayerRecord, check_record
from .selection import glob_patterns, selected, why_not_convertible


@dataclass(frozen=True)
class Step:
    """One tensor to convert or bake (``action``). ``dtype`` is the stored tensor's (for CompressAI's complex
    ``weight_transformed``, marked ``complex_source``, that of its real and imaginary parts), ``out_dtype`` the
    result's."""

    action: Literal["convert", "bake"]
    name: str
    source_key: str
    target_key: str
    basis: Basis
    kernel_size: tuple[int, ...]
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    dtype: str
    out_dtype: str
    inferred: bool = False
    complex_source: bool = False


@dataclass(frozen=True)
class Skipped:
    """A tensor left as it was, and why (``"1x1 kernel"``, ``"excluded"``, ``"already spectral"`` ...); ``fix``
    says how to make it convertible where the user may want it converted (``""`` where nothing is to be done)."""

    key: str
    reason: str
    fix: str = ""


#: how to convert a kernel under a parametrization or a pruning hook: the checkpoint stores its parts, which only
#: the model combines into the weight
_REMOVE_PARAMETRIZATION = 'torch.nn.utils.parametrize.remove_parametrizations(module, "weight")'


def _on_the_model(how: str) -> str:
    return (f"{how} on the model for each, then save model.state_dict() and convert that, or call "
            "register_spectral_parametrization(model) after it")  # fmt: skip


#: reason (its start) -> fix, for the conv kernels that are not converted as they are but could be
FIXES = {
    "weight_norm parametrization": _on_the_model(f"remove it ({_REMOVE_PARAMETRIZATION})"),
    "spectral_norm parametrization": _on_the_model(f"remove it ({_REMOVE_PARAMETRIZATION})"),
    "another parametrization": _on_the_model(f"remove it ({_REMOVE_PARAMETRIZATION})"),
    "old-style weight_norm hook": _on_the_model("remove it (torch.nn.utils.remove_weight_norm(module))"),
    "old-style spectral_norm hook": _on_the_model("remove it (torch.nn.utils.remove_spectral_norm(module))"),
    "pruned": _on_the_model('make the pruning permanent (torch.nn.utils.prune.remove(module, "weight"))'),
    "float8": "cast the checkpoint's float8 tensors to bfloat16 (or float16, float32) and convert that",
}


def fix_of(reason: str) -> str:
    """The fix of a skip reason, ``""`` for those that need none (``"1x1 kernel"``, ``"excluded"`` ...).

    Example:
        >>> fix_of("float8 (float8_e5m2)")
        "cast the checkpoint's float8 tensors to bfloat16 (or float16, float32) and convert that"
        >>> fix_of("1x1 kernel")
        ''
    """
    return next((fix for kind, fix in FIXES.items() if reason.startswith(kind)), "")


def skip_fixes(skipped: Iterable[Skipped]) -> list[str]:
    """One line per fix, for the skipped kernels that have one, in the order they first appear.

    Example:
        >>> skip_fixes([Skipped("a.weight", "float8 (float8_e5m2)", "cast"), Skipped("b.weight", "1x1 kernel")])
        ['1 layer skipped (float8 (float8_e5m2)): to convert it, cast']
    """
    counts: dict[str, dict[str, int]] = {}
    for skip in skipped:
        if skip.fix:
            reasons = counts.setdefault(skip.fix, {})
            reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
    lines = []
    for fix, reasons in counts.items():
        n = sum(reasons.values())
        lines.append(f"{n} {'layer' if n == 1 else 'layers'} skipped ({', '.join(reasons)}): to convert "
                     f"{'it' if n == 1 else 'them'}, {fix}")  # fmt: skip
    return lines


#: peft's LoRA tensors (``<module>.lora_A.weight``, ``<module>.lora_A.<adapter>.weight``, DoRA's magnitude)
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
ADAPTER_FIX = (
    "peft loads an adapter onto a plain base model, which cannot take spectral tensors (PeftModel.from_pretrained "
    "would keep random weights in their place); convert the base model's checkpoint, or merge the adapter first "
    "(model = PeftModel.from_pretrained(base, ADAPTER).merge_and_unload(), then model.save_pretrained(DIR) or "
    "torch.save(model.state_dict(), FILE)) and convert the merged model"
)


def adapter_key(keys: Iterable[str]) -> str | None:
    """The first key that names a peft LoRA tensor (an adapter, or a model with one attached), else None.

    Example:
        >>> adapter_key(["base_model.model.conv.lora_A.weight"]), adapter_key(["conv.weight"])
        ('base_model.model.conv.lora_A.weight', None)
    """
    parts = set(_ADAPTER_PARTS)
    return next((key for key in keys if "lora_" in key and not parts.isdisjoint(key.split("."))), None)


def _parametrized(key: str, spec: TensorSpec, specs: Mapping[str, TensorSpec]) -> tuple[str, str] | None:
    """``(module, reason)`` when ``key`` holds the kernel of a conv whose weight the checkpoint stores as parts that
    only the model combines (a parametrization, an old-style hook, a pruning mask); ``None`` otherwise, and for
    the other parts (a weight_norm magnitude), so that each such layer is listed once, by its kernel."""
    if not 3 <= len(spec.shape) <= 5 or key.endswith(".weight") or key == "weight":  # a plain weight: the most
        return None
    original = "parametrizations.weight.original"
    stem, found, index = key.rpartition(original)
    if found and index.isdigit() and (stem == "" or (stem.endswith(".") and stem != ".")):  # ...original<N>
        originals = {i: specs[k] for i in range(max(10, int(index) + 1)) if (k := f"{stem}{original}{i}") in specs}
        kernels = [i for i, o in originals.items() if 3 <= len(o.shape) <= 5]
        if int(index) != max(kernels, key=lambda i: originals[i].numel):  # listed once, by its largest kernel
            return None
        if sorted(originals) == [0, 1] and index == "1" and originals[0].numel < spec.numel:
            return stem.removesuffix("."), "weight_norm parametrization"
        return stem.removesuffix("."), "another parametrization"
    if key.endswith(original) and (name := module_of(key, original)) is not None:
        if _sibling(name, "parametrizations.weight.0._u") in specs:
            return name, "spectral_norm parametrization"
        return name, "another parametrization"
    if (name := module_of(key, "weight_v")) is not None and _sibling(name, "weight_g") in specs:
        return name, "old-style weight_norm hook (weight_g, weight_v)"
    if (name := module_of(key, "weight_orig")) is not None:
        if _sibling(name, "weight_mask") in specs:
            return name, "pruned (weight_orig, weight_mask)"
        if _sibling(name, "weight_u") in specs:
            return name, "old-style spectral_norm hook (weight_orig)"
    return None


def _sibling(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


@dataclass
class Plan:
    """What convert or bake will do. ``records`` are those the output carries."""

    steps: list[Step] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    records: dict[str, LayerRecord] = field(default_factory=dict)

    def output_specs(self, specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """The output's tensors, in input order, each step's target where its source was."""
        by_source = {s.source_key: s for s in self.steps}
        out = {}
        for key, spec in specs.items():
            step = by_source.get(key)
            out[step.target_key if step else key] = TensorSpec(step.shape_after, step.out_dtype) if step else spec
        return out

    def check_unique(self, specs: Mapping[str, TensorSpec]) -> Plan:
        """This plan, after checking that no two tensors would be written under one name (one would be lost)."""
        if len(self.output_specs(specs)) != len(specs):
            names = [s.target_key if s else k for k in specs for s in [{t.source_key: t for t in self.steps}.get(k)]]
            twice = next(name for name in names if names.count(name) > 1)
            raise SpectralError(f"{twice}: two tensors would be written under this name, and one lost; rename one, or "
                                "leave one out with --exclude")  # fmt: skip
        return self


def plan_convert(
    specs: Mapping[str, TensorSpec],
    records: Mapping[str, LayerRecord] | None = None,
    *,
    basis: Basis = DEFAULT_BASIS,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> Plan:
    """Every conv kernel ``<mod>.weight`` (float, rank 3 to 5, more than one tap) to its spectral key.

    Kernels stored as something else than a plain weight (a parametrization's originals, an old-style hook's or a
    pruning's parts) are skipped with the reason and the fix. A peft adapter is refused
    (:class:`~spectral_cli.errors.RefusedError`): a spectral adapter cannot be loaded.
    """
    basis = check_basis(basis)
    inc, exc = glob_patterns(include, "include"), glob_patterns(exclude, "exclude")
    lora = adapter_key(specs)
    if lora is not None:
        raise RefusedError(f"{lora}: this is a peft LoRA adapter (or a model with one attached); {ADAPTER_FIX}")
    plan = Plan(records=dict(records or {}))
    for key, spec in specs.items():
        if key.endswith(SPECTRAL_SUFFIX) and key in plan.records:
            check_record(key, spec, plan.records[key])
            plan.skipped.append(Skipped(key, "already spectral"))
            continue
        if key.endswith((SPECTRAL_SUFFIX, COMPRESSAI_SUFFIX)) and _looks_spectral(key, spec):
            plan.skipped.append(Skipped(key, "already spectral"))
            continue
        parametrized = _parametrized(key, spec, specs)
        if parametrized is not None:
            owner, stored_as = parametrized
            chosen = selected(owner, inc, exc)
            why = why_not_convertible(tuple(spec.shape[2:]), spec.dtype, kind=spec.kind, selected=chosen) or stored_as
            plan.skipped.append(Skipped(key, why, fix_of(why)))
            continue
        if not is_conv_kernel_key(key, spec):
            continue
        name = module_of(key, "weight")
        if name is None:  # ".weight": no module name that the spectral key could be built from
            continue
        target = spectral_key(name)
        ks = tuple(spec.shape[2:])
        masked = specs.get(mask_key(name)) == TensorSpec(spec.shape, spec.dtype)
        reason = why_not_convertible(ks, spec.dtype, kind=spec.kind, masked=masked, selected=selected(name, inc, exc))
        if reason is not None:
            plan.skipped.append(Skipped(key, reason, fix_of(reason)))
            continue
        if target in specs:
            raise SpectralError(f"{key} and {target} are both present: the state dict is half converted")
        shape_after = spectral_shape(spec.shape, ks, basis)
        step = Step("convert", name, key, target, basis, ks, spec.shape, shape_after, spec.dtype, spec.dtype)
        plan.steps.append(step)
        plan.records[target] = LayerRecord(basis, ks, spec.dtype)
    return plan.check_unique(specs)


def _looks_spectral(key: str, spec: TensorSpec) -> bool:
    """A record-less tensor in a foreign spectral layout (pytorch-parametrizations, CompressAI)."""
    try:
        return spectral_step(key, spec, {}) is not None
    except AmbiguousKernelSizeError:
        return True  # the shape of an rfft tensor, only its kernel size is unknown


def spectral_step(
    key: str,
    spec: TensorSpec,
    records: Mapping[str, LayerRecord],
    kernel_size: tuple[int, ...] | None = None,
) -> Step | None:
    """The bake step for ``key`` if it holds a spectral tensor (recorded, or in a foreign rfft layout)."""
    record = records.get(key) if key.endswith(SPECTRAL_SUFFIX) else None
    if record is not None:
        check_record(key, spec, record)
        after = spatial_shape(spec.shape, record.kernel_size, record.basis)
        name = module_of(key, SPECTRAL_SUFFIX)
        if name is None:
            return None
        return Step("bake", name, key, weight_key(name), record.basis, record.kernel_size, spec.shape, after,
                    spec.dtype, record.dtype)  # fmt: skip
    if spec.kind != "dense":
        return None
    complex_source = key.endswith(COMPRESSAI_SUFFIX) and spec.dtype in COMPLEX_DTYPES
    if complex_source:
        shape = (2, *spec.shape)
        dtype = "float32" if spec.dtype == "complex64" else "float64"
        name = module_of(key, COMPRESSAI_SUFFIX)
    elif key.endswith(SPECTRAL_SUFFIX) and spec.dtype in CONVERTIBLE_DTYPES and spec.shape[:1] == (2,):
        shape, dtype, name = spec.shape, spec.dtype, module_of(key, SPECTRAL_SUFFIX)
    else:
        return None
    if name is None:
        return None
    if not 4 <= len(shape) <= 6 or 0 in shape[3:]:  # no kernel in it: carried over as it is
        return None
    ks = tuple(kernel_size) if kernel_size is not None else ()
    given = len(ks) == len(shape) - 3 and tuple(shape[-len(ks) :]) == spectral_kernel_shape(ks, "rfft")
    if not given:
        ks = infer_kernel_size(key, shape)
    if tuple(shape[-len(ks) :]) != spectral_kernel_shape(ks, "rfft"):
        return None
    after = spatial_shape(shape, ks, "rfft")
    return Step("bake", name, key, weight_key(name), "rfft", ks, spec.shape, after, dtype, dtype, not given,
                complex_source)  # fmt: skip


def plan_bake(
    specs: Mapping[str, TensorSpec],
    records: Mapping[str, LayerRecord] | None = None,
    *,
    kernel_size: tuple[int, ...] | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> Plan:
    """Every spectral tensor back to ``<mod>.weight`` in its original dtype."""
    inc, exc = glob_patterns(include, "include"), glob_patterns(exclude, "exclude")
    plan = Plan(records=dict(records or {}))
    for key, spec in specs.items():
        step = spectral_step(key, spec, plan.records, kernel_size)
        if step is None:
            continue
        if not selected(step.name, inc, exc):
            plan.skipped.append(Skipped(key, "excluded"))
            continue
        if step.target_key in specs:
            raise SpectralError(f"{key} and {step.target_key} are both present: the state dict is half baked")
        plan.steps.append(step)
        plan.records.pop(key, None)
    return plan.check_unique(specs)


@dataclass(frozen=True)
class LayerInfo:
    """One layer as ``describe`` sees it.

    ``domain`` is ``"spectral"``, ``"spatial"`` (a convertible conv kernel), ``"weight_norm"`` (the
    parametrization, or the old-style hook's ``weight_g``/``weight_v``), ``"spectral_norm"`` (the parametrization,
    or the old-style hook's ``weight_orig``), ``"pruned"`` (``torch.nn.utils.prune``'s ``weight_orig``, listed by
    it: the mask is a buffer) or ``"parametrized"`` (another or unknown parametrization). A conv
    under weight_norm is listed by its direction (``original1``, ``weight_v``: the kernel's shape), not its
    magnitude. ``inferred`` marks a spectral layer whose kernel size was read from its shape (no record): a square
    kernel, the only consistent guess.
    """

    name: str
    key: str
    domain: str
    basis: str | None
    kernel_size: tuple[int, ...] | None
    shape: tuple[int, ...]
    dtype: str
    inferred: bool = False

    @property
    def params(self) -> int:
        return math.prod(self.shape)


def describe(
    specs: Mapping[str, TensorSpec], records: Mapping[str, LayerRecord] | None = None, *, include_spatial: bool = True
) -> list[LayerInfo]:
    """The parametrized layers and, with ``include_spatial``, the convertible conv kernels."""
    records = records or {}
    layers = []
    for key, spec in specs.items():
        try:
            step = spectral_step(key, spec, records)
        except AmbiguousKernelSizeError:
            step = None
        if step is not None:
            layers.append(LayerInfo(step.name, key, "spectral", step.basis, step.kernel_size, spec.shape, spec.dtype,
                                    step.inferred))  # fmt: skip
        elif (found := _parametrized(key, spec, specs)) is not None:
            name, reason = found
            domain = next((d for d in ("weight_norm", "spectral_norm", "pruned") if d in reason), "parametrized")
            layers.append(LayerInfo(name, key, domain, None, tuple(spec.shape[2:]), spec.shape, spec.dtype))
        elif ".parametrizations." in f".{key}" and not 3 <= len(spec.shape) <= 5:  # not a kernel's: a linear's...
            leaf = key.rsplit(".", 1)[-1]
            weight_norm = leaf in ("original0", "original1") and all(f"{key[:-1]}{i}" in specs for i in "01")
            if leaf in (("original1",) if weight_norm else ("original", "original0")):  # once, by its direction
                name = key[: key.rfind("parametrizations.")].removesuffix(".")
                domain = "weight_norm" if weight_norm else "parametrized"
                layers.append(LayerInfo(name, key, domain, None, None, spec.shape, spec.dtype))
        elif include_spatial and is_conv_kernel_key(key, spec):
            name, ks = module_name(key, "weight"), tuple(spec.shape[2:])
            masked = specs.get(mask_key(name)) == TensorSpec(spec.shape, spec.dtype)
            if why_not_convertible(ks, spec.dtype, kind=spec.kind, masked=masked) is None:
                layers.append(LayerInfo(name, key, "spatial", None, ks, spec.shape, spec.dtype))
    return layers
