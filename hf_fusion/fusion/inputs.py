"""The fusion's inputs, prepared once for every kind of method: resolved (metadata only), checked, fetched, pinned.

One rule (:func:`reference_is_base`) decides which model the output takes its config, tokenizer and other side
files from, for tensor-wise and model-wise methods alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from hf_fusion.engine.checkpoint import Checkpoint
from hf_fusion.engine.plan import check_headers
from hf_fusion.engine.slices import slice_checkpoints
from hf_fusion.errors import RecipeError
from hf_fusion.fusion.options import FusionOptions
from hf_fusion.fusion.slicing import check_ranges, input_layers, layer_runs
from hf_fusion.fusion.validate import ValidatedRecipe
from hf_fusion.fusion.vocabularies import VocabularyAlignment, align_vocabularies
from hf_fusion.model_files import check_same_architecture, same_architecture
from hf_fusion.recipe import ModelRef, Recipe, path_exists
from hf_fusion.sources import Source, check_download_space, fetch, header_checkpoint, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    """The resolved inputs: ``sources`` is [base] + models when a base is present, else the models.

    A base is present when the method reads it (``base_is_input``), when LoRA adapters need it to become dense
    models, or (model-wise methods) when it names the shared architecture and tokenizer without being fused.
    """

    sources: list[Source]
    has_base: bool
    base_is_input: bool
    vocabulary: VocabularyAlignment | None = None
    """The output tokenizer and the inputs' row maps, when the recipe sets ``tokenizer`` or ``chat_template``."""

    @property
    def experts(self) -> list[int]:
        return list(range(1 if self.has_base else 0, len(self.sources)))

    @property
    def base(self) -> Source | None:
        return self.sources[0] if self.has_base else None

    @property
    def read(self) -> list[int]:
        """The positions the fusion reads: the base when the method does, and the models."""
        return ([0] if self.base_is_input else []) + self.experts

    @property
    def first_expert(self) -> Source:
        return self.sources[self.experts[0]]


def reference_is_base(base: Source | None, first: Source, heads: list[str] | tuple[str, ...]) -> bool:
    """Whether the output takes its config and side files from the base rather than the first model.

    The base's, when it has a config and the models are the base's own architecture: per-task heads are left out
    (the shared backbone is the base's), the first model has the base's architecture, or the first model has no
    config of its own (a LoRA adapter, or weights alone).
    """
    if base is None or base.config is None:
        return False
    return bool(heads) or same_architecture(base.config, first.config) or first.config is None


def reference_index(inputs: Inputs, heads: list[str] | tuple[str, ...]) -> int:
    """The index in ``inputs.sources`` of the model the output's config and side files come from."""
    if inputs.base_is_input and reference_is_base(inputs.base, inputs.first_expert, heads):
        return 0
    return inputs.experts[0]


def resolve_inputs(checked: ValidatedRecipe, options: FusionOptions) -> tuple[Inputs, list[Checkpoint | None]]:
    """Resolves every input (metadata only) and checks architectures, names and shapes from headers."""
    recipe = checked.recipe
    experts = [resolve(ref, token=options.token, allow_pickle=options.allow_pickle) for ref in recipe.models]
    base_ref = recipe.base if checked.uses_base else _adapter_base(recipe, experts)
    if recipe.base is not None and base_ref is None:
        log.warning("method %s does not use a base model; %s is ignored", recipe.method, recipe.base)
    base = [resolve(base_ref, token=options.token, allow_pickle=options.allow_pickle)] if base_ref else []
    inputs = Inputs(base + experts, bool(base), checked.uses_base)
    check_same_architecture([s.label for s in experts], [s.config for s in experts])
    vocabulary = align_vocabularies(
        recipe,
        inputs.sources,
        has_base=inputs.has_base,
        reference=reference_index(inputs, recipe.heads),
        token=options.token,
    )
    inputs = replace(inputs, vocabulary=vocabulary)
    headers = [header_checkpoint(s, allow_pickle=options.allow_pickle) for s in inputs.sources]
    headers = vocabulary.views(headers) if vocabulary is not None else headers
    sliced = sliced_headers(checked, inputs, headers)
    if all(h is not None for h in sliced):
        check_headers(
            sliced,
            base=0 if inputs.base_is_input else None,
            experts=inputs.experts,  # type: ignore[arg-type]
            uses_base=inputs.base_is_input,
            exclude=recipe.exclude,
            heads=recipe.heads,
        )
    return inputs, headers


def sliced_headers(
    checked: ValidatedRecipe, inputs: Inputs, headers: list[Checkpoint | None]
) -> list[Checkpoint | None]:
    """With slices: each range checked against its model's layers, and the headers as the plan will see them."""
    slices = checked.recipe.slices
    if not slices:
        return headers
    runs = layer_runs(slices, [s.ref for s in inputs.sources], inputs.read)
    layers = [input_layers(h, s.config) for h, s in zip(headers, inputs.sources)]
    check_ranges(runs, [s.label for s in inputs.sources], layers)
    if not all(h is not None for h in headers):
        return headers
    return slice_checkpoints(headers, runs, inputs.read).views  # type: ignore[arg-type]


def _adapter_base(recipe: Recipe, experts: list[Source]) -> ModelRef | None:
    """The base LoRA adapters need to become dense models: the recipe's, else the one the adapters all name."""
    adapters = [s for s in experts if s.adapter_config is not None]
    if not adapters:
        return None
    if recipe.base is not None:
        return recipe.base
    named = {str(b): b for b in (s.adapter_base() for s in adapters) if b is not None}
    if not named:
        raise RecipeError(f"{adapters[0].label} is a LoRA adapter that names no base model: pass --base.")
    if len(named) > 1:
        raise RecipeError(f"the LoRA adapters name different base models ({', '.join(sorted(named))}): pass --base.")
    return next(iter(named.values()))


def fetch_inputs(inputs: Inputs, options: FusionOptions) -> Inputs:
    """Downloads what is not local yet, after checking the cache's disk can hold it."""
    check_download_space(inputs.sources)
    sources = [fetch(s, token=options.token, show_progress=options.show_progress) for s in inputs.sources]
    return replace(inputs, sources=sources)


def with_architecture_base(inputs: Inputs, recipe: Recipe, options: FusionOptions) -> Inputs:
    """For model-wise methods: a base the method does not fuse still names the architecture and holds the tokenizer
    the tasks read, so it is fetched too (not pinned: it is not an input of the fusion)."""
    if inputs.has_base or recipe.base is None:
        return inputs
    base = resolve(recipe.base, token=options.token, allow_pickle=False)
    fetched = fetch(base, token=options.token, show_progress=options.show_progress)
    return Inputs([fetched, *inputs.sources], has_base=True, base_is_input=False)


def pin(recipe: Recipe, inputs: Inputs) -> Recipe:
    """The recipe with every Hub input pinned to the commit it was fetched at (a LoRA-only base recorded too)."""
    refs = [s.ref for s in inputs.sources]
    base = refs.pop(0) if inputs.has_base else recipe.base
    return recipe.replace(models=refs, base=base)


def check_output_is_not_an_input(target: Path, recipe: Recipe) -> None:
    """Refuses an output folder that is, or contains, one of the models being read."""
    out = target.resolve()
    for ref in [*recipe.models, *([recipe.base] if recipe.base else [])]:
        path = Path(ref.path).expanduser()
        if path_exists(path):
            model = path.resolve()
            if model == out or out in model.parents:
                raise RecipeError(f"the output folder {target} would replace the input model {ref}; choose another.")


def input_bytes(headers: list[Checkpoint | None]) -> int:
    """Bytes of the inputs' tensors, from their headers."""
    return sum(e.nbytes for h in headers if h is not None for e in h.entries.values())


def folders(inputs: Inputs) -> list[Path]:
    """The fetched inputs' local folders, in ``sources`` order."""
    return [s.folder for s in inputs.sources if s.folder is not None]
