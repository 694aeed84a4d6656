"""The recipe: what to fuse and how, one object whether it comes from CLI flags, YAML, Python or the Space form.

A recipe serialises back to YAML (a copy is written next to the fused weights and into the model card), so any
fused model can be reproduced with ``hf-fusion merge --config``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from hf_fusion.errors import RecipeError

RECIPE_FILENAME = "fusion_recipe.yaml"


OUTPUT_DTYPES: dict[str, str | None] = {
    "auto": None,
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
}
"""Names accepted by ``--dtype``; ``auto`` keeps each tensor's dtype from the reference model."""


class ModelRef(pydantic.BaseModel):
    """A model by local path or Hub repo id, with an optional revision (``repo@rev``).

    ``commit`` is the commit the revision resolved to when the model was fetched; a recipe that records it
    reproduces a fusion exactly even after the branch moves.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    path: str
    revision: str | None = None
    commit: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``org/name@rev`` splits at the last ``@`` unless the whole text is an existing local path."""
        text = text.strip()
        if not text:
            raise RecipeError("empty model reference.")
        if "@" in text and not path_exists(text):
            path, _, revision = text.rpartition("@")
            if not path or not revision:
                raise RecipeError(f"model reference {text!r} should look like `org/name@revision`.")
            return cls(path=path, revision=revision)
        return cls(path=text)

    @property
    def is_local(self) -> bool:
        """Local when the path exists, is spelled like a path (``./x``, ``/x``, ``~/x``) rather than a repo id, or
        names a model that ships with hf-fusion (``builtin:``)."""
        return self.path.startswith((".", "/", "~", "builtin:")) or path_exists(self.path)

    @property
    def pinned(self) -> str | None:
        """The revision to fetch: the recorded commit if any, else the requested revision."""
        return self.commit or self.revision

    def to_yaml_value(self) -> str | dict[str, str]:
        if self.commit:
            return {k: v for k, v in (("path", self.path), ("revision", self.revision), ("commit", self.commit)) if v}
        return str(self)

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A recipe file's mapping, with a plain error for an unreadable file or invalid YAML."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}.") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping with at least `method` and `models`.")
    return data


def path_exists(text: str | Path) -> bool:
    """Whether a local path exists; a name the file system cannot even look up (too long, invalid) does not."""
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):
        return False


def _model_ref(value: Any) -> Any:
    if isinstance(value, str):
        return ModelRef.parse(value)
    if isinstance(value, Path):
        return ModelRef(path=str(value))
    return value


class SliceSource(pydantic.BaseModel):
    """Layers ``[start, stop)`` of one input (a model of the recipe, or its base) feeding an output slice
    (``layer_range``, mergekit's name, is read too)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    model: ModelRef
    layers: tuple[int, int] = pydantic.Field(validation_alias=pydantic.AliasChoices("layers", "layer_range"))

    @pydantic.field_validator("model", mode="before")
    @classmethod
    def _parse_model(cls, value: Any) -> Any:
        return _model_ref(value)

    @pydantic.field_validator("layers")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, stop = value
        if start < 0 or stop <= start:
            raise ValueError(f"a layer range is [start, stop) with 0 <= start < stop (got [{start}, {stop}])")
        return value

    def to_yaml_value(self) -> dict[str, Any]:
        return {"model": self.model.to_yaml_value(), "layers": list(self.layers)}


class OutputSlice(pydantic.BaseModel):
    """A run of output layers: one source is copied as it is (passthrough stacking); several sources, one per
    model of the recipe (and the base when the method uses one), all as long, are fused by the method."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    sources: list[SliceSource] = pydantic.Field(min_length=1)

    @pydantic.model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layers[1] - s.layers[0] for s in self.sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layers)}" for s in self.sources)
            raise ValueError(f"the sources of a slice must hold as many layers each (got {ranges})")
        return self

    @property
    def num_layers(self) -> int:
        start, stop = self.sources[0].layers
        return stop - start

    def to_yaml_value(self) -> dict[str, Any]:
        return {"sources": [s.to_yaml_value() for s in self.sources]}


TOKENIZER_CHOICES = ("base", "union")
"""``tokenizer`` values besides a model's reference: the base's vocabulary, or the union of every input's."""


class Recipe(pydantic.BaseModel):
    """Everything needed to reproduce a fused model."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    method: str
    models: list[ModelRef] = pydantic.Field(min_length=1)
    pool: str | None = None
    base: ModelRef | None = None
    parameters: dict[str, Any] = pydantic.Field(default_factory=dict)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    exclude: list[str] = pydantic.Field(default_factory=list)
    heads: list[str] = pydantic.Field(default_factory=list)
    device: str = "cpu"
    output: str | None = None
    slices: list[OutputSlice] | None = None
    """The output's layers as runs of input layers (frankenmerges, merges over aligned ranges); None fuses every
    layer of every model in place."""
    tokenizer: str | None = None
    """Whose vocabulary the output takes: ``base``, ``union`` (the base's tokens at their ids, then each model's
    other tokens, models in recipe order) or a model's reference; tokens are matched by string and embeddings
    re-indexed. None keeps the reference model's tokenizer and needs inputs whose embeddings have as many rows."""
    chat_template: str | None = None
    """The output's chat template: ``auto`` (the inputs' most common), a model's reference, or a literal Jinja
    template; None keeps the reference model's."""
    components: list[str] | None = None
    """For diffusers pipelines: the components to fuse (``unet``, ``text_encoder``...); the others are copied from
    the base (or the first model). None fuses every component that holds weights."""
    variant: str | None = pydantic.Field(None, pattern=r"^[A-Za-z0-9_]+$")
    """For diffusers pipelines: read each component's weights of this variant (``fp16``) where it has them, as
    ``from_pretrained(variant=...)`` does; the output is written as plain files either way."""
    output_format: Literal["dense", "adapter"] = "dense"
    """``adapter``: a pool of LoRA adapters fused into one peft LoRA adapter on the base instead of a dense model
    (exact, concatenated ranks, for methods linear in the task vectors; else each adapted module's fused delta
    factorised to ``rank``)."""
    rank: int | None = pydantic.Field(None, ge=1)
    """The adapter output's rank: a linear method's exact adapter truncated to it, or the rank of every other
    method's factorised deltas (default there: the largest rank among the adapters)."""
    allow_nonfinite: bool = False
    """Fuse tensors holding NaN or infinities instead of refusing them (they are carried through to the output)."""
    clamp_overflow: bool = False
    """Clamp fused values beyond the output dtype's range to its finite limits instead of refusing them."""

    @pydantic.model_validator(mode="before")
    @classmethod
    def _models_from_slices(cls, data: Any) -> Any:
        """Without ``models``, the models are the slices' sources other than the base, in order of appearance
        (a mergekit recipe names them only in its slices)."""
        if not isinstance(data, dict) or data.get("models") or not data.get("slices"):
            return data
        base = _model_ref(data.get("base"))
        found: list[Any] = []
        for out in data["slices"]:
            for source in out.get("sources", []) if isinstance(out, dict) else []:
                ref = _model_ref(source.get("model")) if isinstance(source, dict) else None
                if isinstance(ref, ModelRef) and ref != base and ref not in found:
                    found.append(ref)
        return {**data, "models": found} if found else data

    @pydantic.field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            value = [value]
        return [_model_ref(v) for v in value] if isinstance(value, (list, tuple)) else value

    @pydantic.field_validator("base", mode="before")
    @classmethod
    def _parse_base(cls, value: Any) -> Any:
        return _model_ref(value)

    @pydantic.field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lower() in OUTPUT_DTYPES:
            code = OUTPUT_DTYPES[value.lower()]
            return {None: "auto", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[code]
        return value

    @pydantic.field_validator("parameters", mode="before")
    @classmethod
    def _no_null_parameters(cls, value: Any) -> Any:
        return {} if value is None else value

    @classmethod
    def build(cls, **fields: Any) -> Recipe:
        """Validates fields into a recipe; raises :class:`RecipeError` with every problem spelled out."""
        known = list(cls.model_fields)
        for key in fields:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise RecipeError(f"unknown recipe field {key!r}.{hint} Fields: {', '.join(known)}.")
        try:
            return cls(**fields)
        except pydantic.ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}" for e in err.errors())
            raise RecipeError(f"invalid recipe: {problems}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return cls.build(**read_yaml_mapping(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "method": self.method,
            "pool": self.pool,
            "models": [m.to_yaml_value() for m in self.models],
            "base": self.base.to_yaml_value() if self.base else None,
            "parameters": dict(self.parameters),
            "dtype": self.dtype,
        }
        if self.exclude:
            data["exclude"] = list(self.exclude)
        if self.heads:
            data["heads"] = list(self.heads)
        if self.slices:
            data["slices"] = [s.to_yaml_value() for s in self.slices]
        if self.tokenizer:
            data["tokenizer"] = self.tokenizer
        if self.chat_template:
            data["chat_template"] = self.chat_template
        if self.components:
            data["components"] = list(self.components)
        if self.variant:
            data["variant"] = self.variant
        if self.output_format != "dense":
            data["output_format"] = self.output_format
        if self.rank is not None:
            data["rank"] = self.rank
        if self.device != "cpu":
            data["device"] = self.device
        if self.output:
            data["output"] = self.output
        if self.allow_nonfinite:
            data["allow_nonfinite"] = True
        if self.clamp_overflow:
            data["clamp_overflow"] = True
        return {k: v for k, v in data.items() if v is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def replace(self, **changes: Any) -> Recipe:
        return Recipe.build(**{**self.model_dump(), **changes})
