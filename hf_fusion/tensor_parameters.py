"""Per-tensor parameters: a method's parameter may take another value in each tensor.

A value in a recipe's ``parameters`` may be
- a plain value, the same for every tensor;
- a *gradient*, a list of numbers interpolated over the layer's position (0 for the first layer, 1 for the last,
  see :mod:`hf_fusion.engine.layers`): ``t: [0, 0.5, 1]`` runs from 0 to 1 through the layers;
- a list of *conditions* ``{filter: TEXT, value: V}``: the first whose filter is a substring of the tensor's name
  gives the value (a plain value or a gradient), and one without a filter (or ``*``) matches every tensor.
  A tensor that no condition matches takes the method's default.

These are mergekit's rules (its ``evaluate_setting``), so its recipes resolve to the same numbers here. A
parameter that holds one value per model (``weights``) takes the same forms per model: ``weights: [1, [0, 1]]``,
or conditions whose values are whole lists. The schedule resolves every tensor once, before any weight is read,
so a value out of range is refused with the tensor named.
"""

from __future__ import annotations

import logging
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydantic

from hf_fusion.errors import ParameterError
from hf_fusion.registry import MethodKind, MethodSpec

log = logging.getLogger(__name__)

Position = float
"""Where a tensor's layer sits in the stack, from 0 to 1 (see :mod:`hf_fusion.engine.layers`)."""


@dataclass(frozen=True)
class Gradient:
    """Knots evenly spaced over the layer positions, interpolated linearly between them (mergekit's rule)."""

    knots: tuple[float, ...]

    def at(self, position: Position) -> float:
        scaled = position * (len(self.knots) - 1)
        low = int(scaled)
        high = min(len(self.knots) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * self.knots[low] + frac * self.knots[high]


@dataclass(frozen=True)
class Condition:
    """``value`` for tensors whose name contains ``filter`` (every tensor when ``filter`` is None or ``*``)."""

    filter: str | None
    value: Any

    def matches(self, name: str) -> bool:
        return self.filter is None or self.filter == "*" or self.filter in name


@dataclass(frozen=True)
class Conditions:
    """The first condition matching a tensor's name gives its value; none matching leaves the default."""

    items: tuple[Condition, ...]


@dataclass(frozen=True)
class PerModel:
    """One setting per model, in recipe order."""

    items: tuple[Any, ...]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_NOT_SET = object()


def evaluate(setting: Any, name: str, position: Position) -> Any:
    """A parsed setting's value for tensor ``name`` at ``position``; ``_NOT_SET`` when no condition matches."""
    if isinstance(setting, Conditions):
        for condition in setting.items:
            if condition.matches(name):
                return evaluate(condition.value, name, position)
        return _NOT_SET
    if isinstance(setting, Gradient):
        return setting.at(position)
    if isinstance(setting, PerModel):
        values = [evaluate(item, name, position) for item in setting.items]
        return _NOT_SET if any(v is _NOT_SET for v in values) else values
    return setting


def first_value(setting: Any) -> Any:
    """The value at the first knot of the first condition: a representative for checks and the method's layout."""
    if isinstance(setting, Conditions):
        return first_value(setting.items[0].value)
    if isinstance(setting, Gradient):
        return setting.knots[0]
    if isinstance(setting, PerModel):
        return [first_value(item) for item in setting.items]
    return setting


def knot_values(setting: Any) -> list[Any]:
    """Every whole value to check before tensors are known: each knot of each condition (for one value per model,
    each model's knots with the other models at their first value). Ranges are convex, so knots suffice."""
    if isinstance(setting, Conditions):
        return [v for c in setting.items for v in knot_values(c.value)]
    if isinstance(setting, Gradient):
        return list(setting.knots)
    if isinstance(setting, PerModel):
        firsts = [first_value(item) for item in setting.items]
        return [
            [*firsts[:i], knot, *firsts[i + 1 :]] for i, item in enumerate(setting.items) for knot in knot_values(item)
        ]
    return [setting]


def conditions_in(setting: Any) -> list[Condition]:
    if isinstance(setting, Conditions):
        return [x for c in setting.items for x in [c, *conditions_in(c.value)]]
    if isinstance(setting, PerModel):
        return [x for item in setting.items for x in conditions_in(item)]
    return []


def gradients_in(setting: Any) -> list[Gradient]:
    if isinstance(setting, Gradient):
        return [setting]
    if isinstance(setting, Conditions):
        return [g for c in setting.items for g in gradients_in(c.value)]
    if isinstance(setting, PerModel):
        return [g for item in setting.items for g in gradients_in(item)]
    return []


def _varies(setting: Any) -> bool:
    if isinstance(setting, PerModel):
        return any(_varies(item) for item in setting.items)
    return isinstance(setting, (Conditions, Gradient))


@dataclass(frozen=True)
class _FieldShape:
    """What a parameter holds: one number, one value per model, or something else (a choice, a flag)."""

    numeric: bool
    per_model: bool
    integer: bool


def _field_shape(annotation: Any) -> _FieldShape:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        scalars = [a for a in args if typing.get_origin(a) not in (list, tuple)]
        lists = [a for a in args if typing.get_origin(a) in (list, tuple)]
        if lists and not scalars:
            return _FieldShape(_field_shape(lists[0]).numeric, True, False)
        if scalars:
            return _field_shape(scalars[0])
    if origin in (list, tuple):
        inner = typing.get_args(annotation)
        return _FieldShape(bool(inner) and inner[0] in (float, int), True, bool(inner) and inner[0] is int)
    if origin is typing.Annotated:
        return _field_shape(typing.get_args(annotation)[0])
    return _FieldShape(annotation in (float, int), False, annotation is int)


@dataclass
class ParameterSchedule:
    """A method's parameters, some of which vary by tensor; :meth:`resolve` gives one tensor's parameters."""

    spec: MethodSpec
    constant: dict[str, Any]
    varying: dict[str, Any]
    """Parsed settings: conditions as :class:`Condition` lists, per-model lists with a setting per model."""
    raw_varying: dict[str, Any]
    base: pydantic.BaseModel
    """The parameters with every varying value at its first knot: the method's defaults, checks and layout."""
    _cache: dict[tuple[tuple[str, Any], ...], pydantic.BaseModel] = field(default_factory=dict)
    _matched: set[str] = field(default_factory=set)

    @property
    def varies(self) -> bool:
        return bool(self.varying)

    def recipe_parameters(self) -> dict[str, Any]:
        """The parameters as the recipe records them: every default spelled out, varying values as given."""
        return {**self.base.model_dump(), **self.raw_varying}

    def resolve(self, name: str, position: Position) -> pydantic.BaseModel:
        """The parameters of tensor ``name``, validated (ranges and the method's checks), cached per value set."""
        if not self.varying:
            return self.base
        values: dict[str, Any] = {}
        for key, setting in self.varying.items():
            value = self._value(key, setting, name, position)
            if value is not _NOT_SET:
                values[key] = value
        frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))
        cached = self._cache.get(frozen)
        if cached is None:
            try:
                cached = self.spec.validate_params({**self.constant, **values})
            except ParameterError as err:
                raise ParameterError(f"tensor {name!r}: {err}") from None
            self._cache[frozen] = cached
        return cached

    def _value(self, key: str, setting: Any, name: str, position: Position) -> Any:
        self._matched.update(
            f"{key}:{c.filter}" for c in conditions_in(setting) if c.filter not in (None, "*") and c.matches(name)
        )
        return evaluate(setting, name, position)

    def gradient_lengths(self) -> dict[str, int]:
        """The most knots any gradient of each varying parameter has."""
        return {key: max((len(g.knots) for g in gradients_in(s)), default=0) for key, s in self.varying.items()}

    def resolve_all(self, positions: Mapping[str, Position]) -> dict[str, pydantic.BaseModel]:
        """Every tensor's parameters; warns about filters that matched no tensor, naming some tensors."""
        resolved = {name: self.resolve(name, at) for name, at in positions.items()}
        self.warn_unmatched(positions)
        return resolved

    def unmatched_filters(self) -> list[str]:
        """``parameter: filter`` of every condition that matched no tensor resolved so far."""
        out = []
        for key, setting in self.varying.items():
            for condition in conditions_in(setting):
                if condition.filter not in (None, "*") and f"{key}:{condition.filter}" not in self._matched:
                    out.append(f"{key}: {condition.filter!r}")
        return list(dict.fromkeys(out))

    def warn_unmatched(self, names: Iterable[str]) -> None:
        unmatched = self.unmatched_filters()
        if unmatched:
            sample = ", ".join(list(names)[:4])
            log.warning(
                "per-tensor filter(s) %s match no tensor name (names look like: %s); those values are not used",
                "; ".join(unmatched),
                sample,
            )


def _parse_setting(method: str, key: str, value: Any, shape: _FieldShape, *, per_model: bool) -> Any:
    """Parses one setting into plain values, :class:`Gradient`, :class:`Conditions` and :class:`PerModel`;
    refuses malformed ones with the parameter named."""
    where = f"parameter {key!r} of method {method!r}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        conditions = []
        for i, item in enumerate(value):
            extra = set(item) - {"filter", "value"}
            if "value" not in item or extra:
                detail = f"unknown key(s) {sorted(extra)}" if extra else "it has no `value`"
                raise ParameterError(f"{where}: condition {i} must be {{filter: TEXT, value: V}} ({detail}).")
            flt = item.get("filter")
            if flt is not None and (not isinstance(flt, str) or not flt):
                raise ParameterError(f"{where}: condition {i}'s filter must be text (got {flt!r}).")
            conditions.append(Condition(flt, _parse_setting(method, key, item["value"], shape, per_model=per_model)))
        return Conditions(tuple(conditions))
    if per_model and isinstance(value, (list, tuple)):
        return PerModel(
            tuple(_parse_setting(method, f"{key}[{i}]", v, shape, per_model=False) for i, v in enumerate(value))
        )
    if isinstance(value, (list, tuple)):
        if not value:
            raise ParameterError(f"{where}: an empty list is neither a value nor a gradient.")
        if not all(_is_number(v) for v in value):
            raise ParameterError(
                f"{where}: a gradient is a list of numbers (got {list(value)!r}); conditions are a list of "
                "{filter, value} mappings."
            )
        if not shape.numeric:
            raise ParameterError(f"{where} is not a number: it cannot take a gradient.")
        if shape.integer:
            raise ParameterError(f"{where} takes whole numbers: use conditions, not a gradient.")
        return Gradient(tuple(float(v) for v in value))
    return value


def _refuse_varying_whole_model(spec: MethodSpec, name: str, value: Any, shape: _FieldShape) -> None:
    listed = isinstance(value, (list, tuple))
    conditions = listed and any(isinstance(v, Mapping) for v in value)
    gradient = listed and shape.numeric and not shape.per_model
    per_model_gradient = (
        listed and shape.numeric and shape.per_model and any(isinstance(v, (list, tuple)) for v in value)
    )
    if conditions or gradient or per_model_gradient:
        raise ParameterError(
            f"method {spec.name!r} fuses whole models: its parameter {name!r} takes one value, not a gradient or "
            "conditions (those vary by tensor, for tensor-wise methods)."
        )


def build_schedule(
    spec: MethodSpec,
    raw: Mapping[str, Any],
    fixed: Callable[[pydantic.BaseModel], Iterable[str]] = lambda params: (),
) -> ParameterSchedule:
    """Splits ``raw`` into constant and varying parameters and checks every knot value against the method.

    ``fixed`` gives, from the representative parameters, those that must be the same for every tensor (they feed a
    model-wide statistic or the method's layout); giving them a gradient or conditions is refused.
    """
    fields = spec.params_model.model_fields
    aliases = {name: name for name in fields}
    for name, info in fields.items():
        choices = getattr(info.validation_alias, "choices", [])
        aliases.update({c: name for c in choices if isinstance(c, str)})
    constant: dict[str, Any] = {}
    varying: dict[str, Any] = {}
    raw_varying: dict[str, Any] = {}
    for key, value in raw.items():
        name = aliases.get(key)
        if name is None:
            constant[key] = value  # validate_params names the unknown parameter
            continue
        shape = _field_shape(fields[name].annotation)
        if spec.kind is not MethodKind.TENSOR_WISE:
            _refuse_varying_whole_model(spec, name, value, shape)
            constant[key] = value
            continue
        parsed = _parse_setting(spec.name, name, value, shape, per_model=shape.per_model)
        if not _varies(parsed):
            constant[key] = value
            continue
        varying[name] = parsed
        raw_varying[name] = value
    first = {k: first_value(v) for k, v in varying.items()}
    base = spec.validate_params({**constant, **first})
    for key, setting in varying.items():
        for knot in knot_values(setting):
            try:
                spec.validate_params({**constant, **first, key: knot})
            except ParameterError as err:
                raise ParameterError(f"{err} (a value of its gradient or conditions)") from None
    fixed_here = sorted(set(varying) & set(fixed(base)))
    if fixed_here:
        raise ParameterError(
            f"parameter {fixed_here[0]!r} of method {spec.name!r} is the same for every tensor "
            "(it sets a model-wide statistic or how the method runs): give it one value, not a gradient or conditions."
        )
    return ParameterSchedule(spec, constant, varying, raw_varying, base)
