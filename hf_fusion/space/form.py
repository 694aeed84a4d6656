"""The merge form, generated from the method registry, and the recipe YAML it edits.

Each parameter of each method gets one widget chosen from its registry entry: a dropdown for choices, a checkbox
for booleans, a slider where the registry gives a range (its UI range when it declares one), a number box
otherwise, and a YAML text box for lists. A tensor-wise method also gets a "per layer" YAML box, where a parameter
takes a gradient over the layers or ``{filter, value}`` conditions on tensor names (see
:mod:`hf_fusion.tensor_parameters`); what it names replaces the widget's value. The form never merges anything itself: it writes the recipe YAML, and the
Merge button runs whatever that YAML says, so editing the YAML by hand and filling the form are the same path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from hf_fusion.errors import RecipeError
from hf_fusion.registry import MethodKind, MethodSpec, ParamInfo

POOL_SOURCE, REPO_SOURCE = "Catalog pool", "Repo ids"

MAX_RECIPE_CHARS = 64 * 1024


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a recipe never needs them, and nested aliases let a few hundred bytes
    expand into billions of values when the recipe is validated (the "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted in a recipe", event.start_mark
            )
        return super().compose_node(parent, index)


def load_visitor_yaml(text: str, what: str) -> Any:
    """YAML a visitor typed: at most :data:`MAX_RECIPE_CHARS`, safe, without aliases; every failure a RecipeError
    that names ``what`` was being read."""
    if len(text) > MAX_RECIPE_CHARS:
        raise RecipeError(f"{what}: {len(text):,} characters long; at most {MAX_RECIPE_CHARS:,} are accepted.")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader without aliases
    except yaml.YAMLError as err:
        raise RecipeError(f"{what} is not valid YAML: {err}") from None
    except RecursionError:
        raise RecipeError(f"{what} nests too deeply.") from None


@dataclass(frozen=True)
class ParamSlot:
    """Where one method parameter sits in the flat list of form widgets."""

    method: str
    info: ParamInfo


def widget_kind(info: ParamInfo) -> str:
    if info.choices:
        return "dropdown"
    if info.type == "bool":
        return "checkbox"
    if info.type in ("float", "int") and slider_range(info) is not None:
        return "slider"
    if info.type in ("float", "int"):
        return "number"
    return "yaml"


def slider_range(info: ParamInfo) -> tuple[float, float] | None:
    if info.ui_range is not None:
        return info.ui_range
    if info.minimum is not None and info.maximum is not None:
        return info.minimum, info.maximum
    return None


def slider_step(info: ParamInfo) -> float:
    if info.type == "int":
        return 1
    lo, hi = slider_range(info)  # type: ignore[misc]
    return 10.0 ** math.floor(math.log10((hi - lo) / 100)) if hi > lo else 0.01


def make_widget(slot: ParamSlot, key_prefix: str = "") -> Any:
    """The gradio component for one parameter, labelled and described from the registry (``key_prefix`` keeps
    the keys of a second form apart)."""
    import gradio as gr

    info = slot.info
    kind = widget_kind(info)
    common = {"label": info.name, "info": info.description or None, "key": f"{key_prefix}{slot.method}.{info.name}"}
    if kind == "dropdown":
        return gr.Dropdown(choices=list(info.choices or ()), value=info.default, **common)
    if kind == "checkbox":
        return gr.Checkbox(value=bool(info.default), **common)
    if kind == "slider":
        lo, hi = slider_range(info)  # type: ignore[misc]
        return gr.Slider(minimum=lo, maximum=hi, value=info.default, step=slider_step(info), **common)
    if kind == "number":
        return gr.Number(value=info.default, precision=0 if info.type == "int" else None, **common)
    placeholder = "YAML, e.g. [0.5, 0.3, 0.2]; empty for the default"
    return gr.Textbox(
        value="" if info.default is None else yaml.safe_dump(info.default).strip(), placeholder=placeholder, **common
    )


def param_slots(specs: Sequence[MethodSpec]) -> list[ParamSlot]:
    return [ParamSlot(spec.name, info) for spec in specs for info in spec.parameters()]


def _gradable(info: ParamInfo) -> bool:
    return info.type.startswith("float") and not info.choices


def per_layer_methods(specs: Sequence[MethodSpec]) -> list[MethodSpec]:
    """Methods with a per-layer box: tensor-wise methods with a real-valued parameter to grade over the layers.
    (Flags and choices may take conditions too; the recipe box takes those.)"""
    return [s for s in specs if s.kind is MethodKind.TENSOR_WISE and any(_gradable(p) for p in s.parameters())]


def gradable_parameter(spec: MethodSpec) -> str | None:
    """The method's first real-valued parameter: the one a per-layer example or a block preset grades."""
    return next((p.name for p in spec.parameters() if _gradable(p)), None)


def per_layer_example(spec: MethodSpec) -> str:
    """A placeholder that shows both forms on one of the method's own real-valued parameters."""
    name = gradable_parameter(spec)
    return f"{name}: [0.2, 0.5, 0.3]\n# or\n{name}:\n  - {{filter: self_attn, value: [0, 0.5, 1]}}\n  - {{value: 0.5}}"


def make_per_layer_widget(spec: MethodSpec, key_prefix: str = "") -> Any:
    import gradio as gr

    return gr.Textbox(
        value="",
        lines=3,
        label="Per layer or per tensor (YAML)",
        info="a gradient over the layers, or {filter, value} conditions on tensor names; replaces the values above",
        placeholder=per_layer_example(spec),
        key=f"{key_prefix}{spec.name}.__per_layer__",
    )


def per_layer_values(spec: MethodSpec, text: str | None) -> dict[str, Any]:
    """The per-layer box as parameter settings; the names must be the method's parameters."""
    text = (text or "").strip()
    if not text:
        return {}
    data = load_visitor_yaml(text, "the per-layer values")
    if not isinstance(data, dict):
        raise RecipeError("the per-layer values must be a YAML mapping, e.g. `t: [0, 0.5, 1]`.")
    known = [p.name for p in spec.parameters()]
    unknown = [str(k) for k in data if k not in known]
    if unknown:
        raise RecipeError(
            f"{spec.name} has no parameter {unknown[0]!r} (the per-layer values name its parameters: "
            f"{', '.join(known)})."
        )
    return data


def widget_value(slot: ParamSlot, value: Any) -> Any:
    """A widget's value as the recipe stores it (ints stay ints, YAML boxes are parsed)."""
    kind = widget_kind(slot.info)
    if kind == "yaml":
        text = (value or "").strip()
        if not text:
            return slot.info.default
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"parameter {slot.info.name!r} is not valid YAML: {err}") from None
    if value is None:
        return slot.info.default
    if slot.info.type == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def split_models(text: str) -> list[str]:
    """Repo ids or folders, one per line (commas and spaces also separate them)."""
    return [m for m in text.replace(",", " ").split() if m]


def recipe_fields(
    *,
    source: str,
    pool: Any | None,
    models_text: str,
    base: str,
    method: str,
    dtype: str,
    slots: Sequence[ParamSlot],
    values: Sequence[Any],
    per_layer: dict[str, str] | None = None,
    components: Sequence[str] = (),
) -> dict[str, Any]:
    """The recipe the form describes, as the mapping the YAML box shows (pools are expanded so they can be edited).

    ``per_layer`` holds each method's per-layer box (method name to its text); the chosen method's entries replace
    the widget values they name. ``components`` (diffusers pipelines) names the components to fuse; none means
    every weight component."""
    from hf_fusion.registry import get_method

    parameters = {s.info.name: widget_value(s, v) for s, v in zip(slots, values) if s.method == method}
    parameters.update(per_layer_values(get_method(method), (per_layer or {}).get(method)))
    fields: dict[str, Any] = {"method": method}
    if source == POOL_SOURCE and pool is not None:
        fields.update(pool=pool.name, base=pool.base, models=[pool.experts[t.name] for t in pool.tasks])
        if pool.heads:
            fields["heads"] = list(pool.heads)
    else:
        fields["models"] = split_models(models_text)
        if base.strip():
            fields["base"] = base.strip()
    if components:
        fields["components"] = list(components)
    fields["parameters"] = parameters
    fields["dtype"] = dtype
    return fields


def to_yaml(fields: dict[str, Any]) -> str:
    return yaml.safe_dump(fields, sort_keys=False, default_flow_style=False)


def parse_recipe_yaml(text: str) -> dict[str, Any]:
    """The YAML box as a recipe mapping; the Space chooses the output folder, so ``output`` is dropped."""
    data = load_visitor_yaml(text or "", "the recipe")
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a YAML mapping with at least `method` and `models` (or `pool`).")
    data.pop("output", None)
    return data
