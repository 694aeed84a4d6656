"""The method registry: one entry per fusion method, the single source of truth for names, parameters and metadata.

The CLI (`hf-fusion methods`, `--param`), recipe validation, the Space form and the model card are all generated from
these entries. Parameters are pydantic models, so defaults, types and ranges are declared once, next to the math.
"""

from __future__ import annotations

import difflib
import importlib
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import annotated_types
import pydantic

from hf_fusion.errors import ParameterError, RecipeError, UnknownMethodError


class Family(str, Enum):
    """FusionBench's three kinds of deep model fusion."""

    ENSEMBLE = "ensemble"
    MERGE = "merge"
    MIX = "mix"


class DataNeed(str, Enum):
    """What data a method needs beyond the weights."""

    NONE = "none"
    UNLABELLED = "unlabelled"
    LABELLED = "labelled"


class BaseUse(str, Enum):
    """Whether a method needs the pretrained base model."""

    REQUIRED = "required"
    OPTIONAL = "optional"
    UNUSED = "unused"


class MethodKind(str, Enum):
    """How a method runs, declared with its registration: the implementation is the matching contract."""

    TENSOR_WISE = "tensor-wise"
    """One tensor (or slice) at a time through the streaming engine (``TensorMerge``)."""
    MODEL_WISE = "model-wise"
    """Whole models as modules, often with data (``ModelFusion``): ensembles, Fisher, RegMean, AdaMerging, ..."""


@dataclass(frozen=True)
class Paper:
    title: str
    url: str


@dataclass(frozen=True)
class ParamInfo:
    """A parameter as the CLI, the Space form and the card see it."""

    name: str
    type: str
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[Any, ...] | None = None
    ui_range: tuple[float, float] | None = None

    def range_text(self) -> str:
        if self.choices:
            return "|".join(str(c) for c in self.choices)
        if self.minimum is None and self.maximum is None:
            return ""
        lo = "" if self.minimum is None else f"{self.minimum:g}"
        hi = "" if self.maximum is None else f"{self.maximum:g}"
        left = "(" if self.exclusive_minimum or self.minimum is None else "["
        right = ")" if self.exclusive_maximum or self.maximum is None else "]"
        return f"{left}{lo}, {hi}{right}"


class NoParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class MethodSpec:
    """Everything known about a method before it runs."""

    name: str
    summary: str
    family: Family
    data: DataNeed
    base: BaseUse
    implementation: type
    params_model: type[pydantic.BaseModel] = NoParams
    aliases: tuple[str, ...] = ()
    paper: Paper | None = None
    min_models: int = 1
    max_models: int | None = None
    check_pool: Callable[[Any, int, bool], None] | None = field(default=None, compare=False)
    kind: MethodKind = MethodKind.TENSOR_WISE

    def parameters(self) -> list[ParamInfo]:
        return [_param_info(name, f) for name, f in self.params_model.model_fields.items()]

    def defaults(self) -> dict[str, Any]:
        return self.params_model().model_dump()

    def validate_params(self, raw: Mapping[str, Any]) -> pydantic.BaseModel:
        """Checks names (with a did-you-mean), types and ranges; raises :class:`ParameterError`."""
        known = list(self.params_model.model_fields)
        spellings = _fields_by_spelling(self.params_model)
        for key in raw:
            if key not in spellings:
                hint = _did_you_mean(key, known)
                listing = ", ".join(known) if known else "none"
                raise ParameterError(
                    f"unknown parameter {key!r} for method {self.name!r}.{hint} Its parameters: {listing}."
                )
        custom = _custom_before_validators(self.params_model)
        for key, value in raw.items():
            name = spellings[key]
            field_info = self.params_model.model_fields[name]
            accepted = {object} if name in custom else _leaf_types(field_info.annotation)
            _check_value(self.name, key, value, accepted)
        try:
            params = self.params_model(**raw)
        except pydantic.ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'parameters'}: {e['msg']} (got {e.get('input')!r})"
                for e in err.errors()
            )
            raise ParameterError(f"invalid parameters for method {self.name!r}: {problems}") from None
        for key, value in params.model_dump().items():
            _check_value(self.name, key, value, {object})
        return params

    def validate_pool(self, params: pydantic.BaseModel, num_models: int, has_base: bool) -> None:
        """Checks the number of models and the base against what the method needs; raises :class:`RecipeError`."""
        if self.base is BaseUse.REQUIRED and not has_base:
            raise RecipeError(
                f"method {self.name!r} needs a base (pretrained) model: pass --base (recipe field `base`)."
            )
        if num_models < self.min_models:
            raise RecipeError(f"method {self.name!r} needs at least {self.min_models} model(s), got {num_models}.")
        if self.max_models is not None and num_models > self.max_models:
            raise RecipeError(f"method {self.name!r} takes at most {self.max_models} model(s), got {num_models}.")
        if self.check_pool is not None:
            self.check_pool(params, num_models, has_base)


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def register(spec: MethodSpec) -> MethodSpec:
    """Adds a method; names and aliases must be unique across the registry."""
    for key in (spec.name, *spec.aliases):
        norm = _normalise(key)
        owner = _ALIASES.get(norm)
        if owner is not None and owner != spec.name:
            raise ValueError(f"method name {key!r} is already taken by {owner!r}")
        _ALIASES[norm] = spec.name
    _REGISTRY[spec.name] = spec
    return spec


BUILTIN_METHODS = "hf_fusion.methods"


def _load_builtin() -> None:
    """Imports the built-in methods, which register themselves. The registry depends on no method: methods depend on
    it, so the package is named here, as a plugin would be, rather than imported."""
    importlib.import_module(BUILTIN_METHODS)


def get_method(name: str) -> MethodSpec:
    """Looks a method up by name or alias (FusionBench's and mergekit's spellings included)."""
    _load_builtin()
    canonical = _ALIASES.get(_normalise(name))
    if canonical is None:
        hint = _did_you_mean(_normalise(name), list(_ALIASES))
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Run `hf-fusion methods` to list them.")
    return _REGISTRY[canonical]


def all_methods() -> list[MethodSpec]:
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda s: (s.family.value, s.name))


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    if not close:
        return ""
    names = " or ".join(repr(_ALIASES.get(c, c)) if c in _ALIASES else repr(c) for c in close)
    return f" Did you mean {names}?"


def _fields_by_spelling(model: type[pydantic.BaseModel]) -> dict[str, str]:
    """Every accepted spelling of a parameter, its name and its aliases (FusionBench's ``DOT_THRESHOLD``), mapped
    to the parameter's name."""
    names: dict[str, str] = {}
    for name, f in model.model_fields.items():
        names[name] = name
        alias = f.validation_alias
        choices = [alias] if isinstance(alias, str) else getattr(alias, "choices", [])
        names.update({c: name for c in choices if isinstance(c, str)})
    return names


def _custom_before_validators(model: type[pydantic.BaseModel]) -> set[str]:
    """Fields whose model has its own before-validator: those decide for themselves what they accept."""
    names: set[str] = set()
    for decorator in model.__pydantic_decorators__.field_validators.values():
        if decorator.info.mode in ("before", "plain", "wrap"):
            names.update(decorator.info.fields)
    return names


def _leaf_types(annotation: Any) -> set[type]:
    """The plain types an annotation admits, through unions, lists and literals (``list[float] | None``)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(annotation)
        if any(type(m).__name__.endswith("Validator") for m in metadata):
            return {object}  # a custom validator decides what it accepts (DARE's ``rescale: true``)
        return _leaf_types(inner)
    if origin is not None:
        return set().union(*(_leaf_types(a) for a in typing.get_args(annotation) if a is not Ellipsis))
    return {annotation} if isinstance(annotation, type) else {object}


def _check_value(method: str, key: str, value: Any, accepted: set[type]) -> None:
    """Refuses what pydantic would quietly coerce: a boolean where a number is expected (``true`` read as 1.0),
    and NaN or infinity, which no method turns into a meaningful model (NaN would only meet a range check)."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(method, f"{key}[{i}]", item, accepted)
        return
    if isinstance(value, dict):
        for name, item in value.items():
            _check_value(method, f"{key}.{name}", item, accepted)
        return
    if isinstance(value, bool):
        if bool not in accepted and object not in accepted:
            expected = "a number" if accepted & {float, int} else "one of its listed values"
            raise ParameterError(
                f"parameter {key!r} of method {method!r} must be {expected}, not a boolean (got {str(value).lower()})."
            )
        return
    number: float | None = None
    if isinstance(value, (int, float)):
        number = float(value) if isinstance(value, float) or abs(value) < 1 << 1023 else math.inf
    elif isinstance(value, str) and str not in accepted and (float in accepted or int in accepted):
        try:
            number = float(value.strip())
        except ValueError:
            return
    if number is not None and not math.isfinite(number):
        raise ParameterError(
            f"parameter {key!r} of method {method!r} must be a finite number (got {value!r}); "
            "NaN and infinity cannot be used as weights or coefficients."
        )


def _type_name(annotation: Any) -> tuple[str, tuple[Any, ...] | None]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "choice", tuple(args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        name, choices = _type_name(inner[0]) if len(inner) == 1 else ("|".join(_type_name(a)[0] for a in inner), None)
        return (f"{name} | null", choices)
    if origin in (list, tuple):
        return f"list[{_type_name(args[0])[0]}]" if args else "list", None
    return getattr(annotation, "__name__", str(annotation)), None


def _param_info(name: str, f: pydantic.fields.FieldInfo) -> ParamInfo:
    type_name, choices = _type_name(f.annotation)
    lo = hi = None
    lo_ex = hi_ex = False
    for m in f.metadata:
        if isinstance(m, annotated_types.Ge):
            lo = float(m.ge)
        elif isinstance(m, annotated_types.Gt):
            lo, lo_ex = float(m.gt), True
        elif isinstance(m, annotated_types.Le):
            hi = float(m.le)
        elif isinstance(m, annotated_types.Lt):
            hi, hi_ex = float(m.lt), True
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    ui = extra.get("ui_range")
    return ParamInfo(
        name=name,
        type=type_name,
        default=f.get_default(call_default_factory=True),
        description=f.description or "",
        minimum=lo,
        maximum=hi,
        exclusive_minimum=lo_ex,
        exclusive_maximum=hi_ex,
        choices=choices,
        ui_range=tuple(ui) if ui else None,
    )


SHARED_FLAGS = ("batch_size",)
"""Method flags that also set something else (``--batch-size`` is evaluation's batch too), so no method needs them."""


def flag_parameters(specs: list[MethodSpec], flags: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The common method flags (``--steps``, ``--lr``, ``--seed``, ``--calibration-samples``, ``--batch-size``) as
    each method's parameters, by one rule for ``merge`` and ``bench`` alike: a method takes the flags it declares,
    and a flag that none of the methods declares is refused rather than dropped."""
    per_method = [{k: v for k, v in flags.items() if k in spec.params_model.model_fields} for spec in specs]
    for key in flags:
        if key not in SHARED_FLAGS and not any(key in taken for taken in per_method):
            names = ", ".join(spec.name for spec in specs)
            raise ParameterError(
                f"--{key.replace('_', '-')} is not a parameter of {names}; "
                "`hf-fusion methods NAME` lists a method's parameters."
            )
    return per_method
