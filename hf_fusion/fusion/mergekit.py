"""mergekit's configuration format, read into an hf-fusion recipe so a mergekit user can switch with the recipe
they already have (``hf-fusion merge --config mergekit.yml``).

The mapping keeps mergekit's semantics where the two tools name things differently:
- ``weight`` and ``density`` are per-model parameters there; here they become one value per model (``weights``,
  ``thresholds`` in percent for TIES, ``sparsity_ratios = 1 - density`` for DARE). Gradients and filters pass
  through unchanged: both tools resolve them by the same rules.
- mergekit's TIES ranks magnitudes within each tensor and keeps exactly ``floor(density * size)`` values; its
  ``normalize`` divides by the agreeing models' weights; ``lambda`` scales after that. They map onto
  ``threshold_scope: tensor``, ``keep_count: exact``, ``zero_sign: positive``, ``merge_func: mean|sum`` and ``scaling_factor``.
- mergekit's ``rescale`` keeps each task vector's L1 norm (``rescale: l1`` here); DARE's drop masks come from
  another random generator, so DARE outputs agree in distribution, not bit for bit.
- ``dtype`` is mergekit's working dtype and ``out_dtype`` its output dtype; hf-fusion always computes in float32 (or
  float64) and writes ``out_dtype``, else ``dtype``.

Everything else is refused by name before any download: an unknown key, a method with no counterpart, an option
this reader does not carry over.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hf_fusion.errors import RecipeError

TOP_LEVEL = {
    "models",
    "slices",
    "modules",
    "merge_method",
    "base_model",
    "dtype",
    "out_dtype",
    "parameters",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}
UNSUPPORTED_METHODS = {
    "nuslerp": "its row- and column-wise spherical interpolation of two task vectors has no counterpart yet",
    "multislerp": "no counterpart yet; karcher (karcher_mean) is the closest",
    "sce": "no counterpart yet",
    "ram": "no counterpart yet",
    "ramplus_tl": "no counterpart yet",
    "nearswap": "no counterpart yet",
    "arcee_fusion": "no counterpart yet",
    "breadcrumbs_ties": "no counterpart yet; breadcrumbs (without the sign election) is supported",
    "della_linear": "no counterpart yet; della (with the sign election) is supported",
}
BUILTIN_TEMPLATES = {"alpaca", "chatml", "exaone", "llama3", "mistral"}


def is_mergekit_config(data: Mapping[str, Any]) -> bool:
    """mergekit configurations name their method ``merge_method``; hf-fusion recipes name it ``method``."""
    return "merge_method" in data and "method" not in data


def _ref(value: Any, where: str) -> str:
    if isinstance(value, Mapping):
        value = value.get("model", value.get("path"))
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"mergekit config: {where} must name a model (a Hub repo id or a folder), got {value!r}.")
    if "+" in value and not value.startswith((".", "/", "~")):
        raise RecipeError(
            f"mergekit config: {where} {value!r} uses mergekit's `model+lora` syntax, which is not supported: give "
            "the LoRA adapter itself as a model (hf-fusion reads adapters as the dense model they make with their "
            "base)."
        )
    return value.strip()


def map_setting(setting: Any, fn: Callable[[float], float]) -> Any:
    """A parameter setting with ``fn`` applied to every number in it (plain values, gradients, conditions)."""
    if isinstance(setting, bool):
        return setting
    if isinstance(setting, (int, float)):
        return fn(float(setting))
    if isinstance(setting, list):
        return [map_setting(s, fn) for s in setting]
    if isinstance(setting, Mapping):
        return {**setting, "value": map_setting(setting.get("value"), fn)}
    return setting


def _uniform(values: list[Any]) -> bool:
    return all(v == values[0] for v in values)


class _Inputs:
    """The models of a mergekit config with their per-model parameters, and the global parameters."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.base = _ref(data["base_model"], "base_model") if data.get("base_model") else None
        self.globals: dict[str, Any] = dict(data.get("parameters") or {})
        self.order: list[str] = []
        self.per_model: dict[str, dict[str, Any]] = {}
        if data.get("models"):
            for i, item in enumerate(data["models"]):
                self._add(_ref(item, f"models[{i}]"), item.get("parameters") if isinstance(item, Mapping) else None)
        for i, piece in enumerate(data.get("slices") or []):
            if not isinstance(piece, Mapping) or not piece.get("sources"):
                raise RecipeError(f"mergekit config: slices[{i}] needs `sources`.")
            extra = set(piece) - {"sources", "parameters", "base_model", "residual_weight"}
            if extra or piece.get("parameters") or piece.get("base_model"):
                named = sorted(extra) or [k for k in ("parameters", "base_model") if piece.get(k)]
                raise RecipeError(
                    f"mergekit config: slices[{i}] sets {', '.join(named)}, which is not supported per slice: put "
                    "parameters at the top level (filters and gradients work there) or on the models."
                )
            for j, source in enumerate(piece["sources"]):
                self._add(_ref(source, f"slices[{i}].sources[{j}]"), source.get("parameters"))

    def _add(self, ref: str, parameters: Mapping[str, Any] | None) -> None:
        if ref not in self.per_model:
            self.order.append(ref)
            self.per_model[ref] = {}
        for key, value in (parameters or {}).items():
            known = self.per_model[ref].get(key)
            if known is not None and known != value:
                raise RecipeError(
                    f"mergekit config: {ref} gets two values of {key!r} in different slices; give it one value."
                )
            self.per_model[ref][key] = value

    @property
    def others(self) -> list[str]:
        return [m for m in self.order if m != self.base]

    def value(self, model: str, key: str, default: Any = None) -> Any:
        """A per-model parameter: the model's own value, else the global one, else ``default``."""
        return self.per_model.get(model, {}).get(key, self.globals.get(key, default))

    def per_model_values(self, models: list[str], key: str, default: Any, *, required: bool = False) -> list[Any]:
        values = [self.value(m, key, default) for m in models]
        missing = [m for m, v in zip(models, values) if v is None]
        if required and missing:
            raise RecipeError(f"mergekit config: {self.method} needs `{key}` for every model; {missing[0]} has none.")
        return values

    method = ""

    def check_known(self, allowed_global: set[str], allowed_model: set[str]) -> None:
        for key in self.globals:
            if key not in allowed_global | allowed_model:
                raise RecipeError(
                    f"mergekit config: parameter {key!r} is not supported for {self.method} "
                    f"(supported: {', '.join(sorted(allowed_global | allowed_model)) or 'none'})."
                )
        for model, params in self.per_model.items():
            for key in params:
                if key not in allowed_model:
                    raise RecipeError(
                        f"mergekit config: per-model parameter {key!r} of {model} is not supported for "
                        f"{self.method} (supported: {', '.join(sorted(allowed_model)) or 'none'})."
                    )


def _weights(inputs: _Inputs, models: list[str], *, required: bool) -> list[Any] | None:
    weights = inputs.per_model_values(models, "weight", None if required else 1.0, required=required)
    return None if all(w == 1.0 for w in weights) else weights


def _gta(inputs: _Inputs, method: str) -> tuple[str, dict[str, Any]]:
    """The task-arithmetic family: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, della."""
    models = inputs.others
    per_model = {"weight", "density"}
    per_model |= {"gamma"} if method == "breadcrumbs" else set()
    per_model |= {"epsilon"} if method == "della" else set()
    inputs.check_known({"normalize", "lambda", "rescale", "int8_mask"}, per_model)
    default_normalize = method in ("ties", "della")
    normalize = inputs.globals.get("normalize", default_normalize)
    scale = inputs.globals.get("lambda", 1.0)
    weights = _weights(inputs, models, required=True)
    densities = inputs.per_model_values(models, "density", 1.0)
    default_rescale = method in ("dare_ties", "dare_linear", "della")
    rescale = inputs.globals.get("rescale", default_rescale)
    if method == "task_arithmetic":
        return "task_arithmetic", {"scaling_factor": scale, "weights": weights, "normalize": normalize}
    if method == "ties":
        if rescale:
            raise RecipeError("mergekit config: ties with `rescale: true` is not supported.")
        thresholds = [map_setting(d, lambda x: x * 100.0) for d in densities]
        params: dict[str, Any] = {
            "scaling_factor": scale,
            "weights": weights,
            "threshold_scope": "tensor",
            "keep_count": "exact",
            "zero_sign": "positive",
            "merge_func": "mean" if normalize else "sum",
        }
        if _uniform(thresholds) and not isinstance(thresholds[0], list):
            params["threshold"] = thresholds[0]
        else:
            params["thresholds"] = thresholds
        return "ties_merging", params
    if method in ("dare_ties", "dare_linear"):
        ratios = [map_setting(d, lambda x: 1.0 - x) for d in densities]
        params = {"scaling_factor": scale, "weights": weights, "rescale": "l1" if rescale else "none"}
        params["sparsity_ratios"] = ratios
        if method == "dare_ties":
            params.update(
                threshold=100.0,
                threshold_scope="tensor",
                zero_sign="positive",
                merge_func="mean" if normalize else "sum",
            )
            return "dare_ties_merging", params
        params["normalize"] = normalize
        return "dare_task_arithmetic", params
    uniform = [weights is None or _uniform(weights), _uniform(densities)]
    if method == "breadcrumbs":
        gammas = inputs.per_model_values(models, "gamma", 0.01)
        if not (all(uniform) and _uniform(gammas)) or normalize:
            raise RecipeError(
                "mergekit config: breadcrumbs is supported with one weight, density and gamma for every model and "
                "normalize: false."
            )
        weight = 1.0 if weights is None else weights[0]
        return "breadcrumbs", {"scaling_factor": scale * weight, "density": densities[0], "gamma": gammas[0]}
    epsilons = inputs.per_model_values(models, "epsilon", 0.15)
    if not (all(uniform) and _uniform(epsilons) and (weights is None)) or not normalize:
        raise RecipeError(
            "mergekit config: della is supported with weight 1, one density and epsilon for every model, and "
            "normalize: true."
        )
    return "della", {"scaling_factor": scale, "density": densities[0], "epsilon": epsilons[0]}


def _method(inputs: _Inputs, method: str) -> tuple[str, list[str], str | None, dict[str, Any]]:
    """(hf-fusion method, models, base, parameters) for a mergekit method."""
    base = inputs.base
    if method in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della"):
        if base is None:
            raise RecipeError(f"mergekit config: {method} needs base_model.")
        name, params = _gta(inputs, method)
        return name, inputs.others, base, params
    if method == "linear":
        models = inputs.order if base is None or base in inputs.order else [*inputs.order, base]
        inputs.check_known({"normalize"}, {"weight"})
        weights = inputs.per_model_values(models, "weight", None, required=True)
        return (
            "weighted_average",
            models,
            None,
            {"weights": weights, "normalize": inputs.globals.get("normalize", True)},
        )
    if method == "slerp":
        inputs.check_known({"t"}, set())
        if base is None or len(inputs.others) != 1:
            raise RecipeError("mergekit config: slerp needs base_model and exactly one other model.")
        if "t" not in inputs.globals:
            raise RecipeError("mergekit config: slerp needs the parameter `t`.")
        return "slerp", inputs.others, base, {"t": inputs.globals["t"]}
    if method == "karcher":
        inputs.check_known({"max_iter", "tol"}, set())
        models = inputs.order if base is None or base in inputs.order else [*inputs.order, base]
        params = {k: inputs.globals[k] for k in ("max_iter", "tol") if k in inputs.globals}
        return "karcher_mean", models, None, params
    if method == "model_stock":
        inputs.check_known({"filter_wise"}, set())
        if inputs.globals.get("filter_wise"):
            raise RecipeError("mergekit config: model_stock with filter_wise: true is not supported.")
        if base is None:
            raise RecipeError("mergekit config: model_stock needs base_model.")
        return "model_stock", inputs.others, base, {}
    if method == "passthrough":
        inputs.check_known(set(), set())
        return "passthrough", inputs.order, None, {}
    if method in UNSUPPORTED_METHODS:
        raise RecipeError(f"mergekit config: merge_method {method!r} is not supported: {UNSUPPORTED_METHODS[method]}.")
    raise RecipeError(
        f"mergekit config: unknown merge_method {method!r}. Supported: linear, task_arithmetic, ties, dare_ties, "
        "dare_linear, breadcrumbs, della, slerp, karcher, model_stock, passthrough."
    )


def _tokenizer(data: Mapping[str, Any]) -> str | None:
    if data.get("tokenizer") is not None:
        config = data["tokenizer"]
        extra = set(config) - {"source"} if isinstance(config, Mapping) else set()
        if not isinstance(config, Mapping) or extra:
            raise RecipeError(
                f"mergekit config: tokenizer options {sorted(extra) or config!r} are not supported; "
                "`tokenizer: {source: union|base|MODEL}` (or `tokenizer_source`) is."
            )
        return _ref(config.get("source", "union"), "tokenizer.source") if config.get("source") != "union" else "union"
    source = data.get("tokenizer_source")
    return None if source is None else _ref(source, "tokenizer_source")


def _chat_template(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecipeError(f"mergekit config: chat_template must be text, got {value!r}.")
    if value in BUILTIN_TEMPLATES:
        raise RecipeError(
            f"mergekit config: chat_template {value!r} names one of mergekit's bundled templates, which hf-fusion "
            "does not ship: give the template's Jinja text, `auto`, or a model whose template to take."
        )
    return value


def _slices(data: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    if not data.get("slices"):
        return None
    out = []
    for piece in data["slices"]:
        sources = []
        for source in piece["sources"]:
            if "layer_range" not in source:
                raise RecipeError("mergekit config: every slice source needs `layer_range: [start, end]`.")
            sources.append({"model": _ref(source, "a slice source"), "layers": list(source["layer_range"])})
        out.append({"sources": sources})
    return out


def recipe_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """hf-fusion recipe fields for a mergekit configuration; raises :class:`RecipeError` on anything unsupported."""
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise RecipeError(
            f"mergekit config: unknown key(s) {', '.join(map(repr, unknown))}. mergekit's keys: "
            f"{', '.join(sorted(TOP_LEVEL))}."
        )
    if data.get("modules"):
        raise RecipeError(
            "mergekit config: `modules` (several modules per model) is not supported; use `models` or `slices`."
        )
    if bool(data.get("models")) == bool(data.get("slices")):
        raise RecipeError("mergekit config: give exactly one of `models` and `slices`.")
    method = str(data["merge_method"]).strip().lower()
    inputs = _Inputs(data)
    inputs.method = method
    name, models, base, params = _method(inputs, method)
    fields: dict[str, Any] = {"method": name, "models": models, "parameters": params}
    if base is not None:
        fields["base"] = base
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        fields["dtype"] = str(dtype).removeprefix("torch.")
    slices = _slices(data)
    if slices is not None:
        fields["slices"] = slices
    tokenizer = _tokenizer(data)
    if tokenizer is not None:
        fields["tokenizer"] = tokenizer
    template = _chat_template(data.get("chat_template"))
    if template is not None:
        fields["chat_template"] = template
    return {k: v for k, v in fields.items() if v is not None}
