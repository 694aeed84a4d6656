"""What the recipe's ``tokenizer`` and ``chat_template`` ask for, checked from the recipe alone, and the rules that pick
an input or a template."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from hf_fusion.errors import RecipeError
from hf_fusion.recipe import TOKENIZER_CHOICES, ModelRef, Recipe, path_exists


def recipe_inputs(recipe: Recipe) -> list[ModelRef]:
    """The inputs in the order ties are broken in: the models in recipe order, then the base."""
    return [*recipe.models, *([recipe.base] if recipe.base else [])]


def find_input(text: str, recipe: Recipe) -> int | None:
    """The position in :func:`recipe_inputs` of the input ``text`` names (its reference as written, its path or repo
    id, or the same local folder), or ``None``."""
    inputs = recipe_inputs(recipe)
    text = text.strip()
    for i, ref in enumerate(inputs):
        if text == str(ref):
            return i
    try:
        wanted = ModelRef.parse(text)
    except RecipeError:
        return None
    same = [i for i, ref in enumerate(inputs) if ref.path == wanted.path and ref.revision == wanted.revision]
    if not same and wanted.revision is None:
        same = [i for i, ref in enumerate(inputs) if ref.path == wanted.path]
    if not same and path_exists(wanted.path):
        place = Path(wanted.path).expanduser().resolve()
        same = [i for i, r in enumerate(inputs) if path_exists(r.path) and Path(r.path).expanduser().resolve() == place]
    return same[0] if len(set(str(inputs[i]) for i in same)) == 1 else None


def is_literal_template(text: str) -> bool:
    """A chat template written out in the recipe: Jinja, so it holds ``{{`` or ``{%``."""
    return "{{" in text or "{%" in text


def check_tokenizer_fields(recipe: Recipe, *, model_wise: bool) -> None:
    """Refuses, before any I/O, a ``tokenizer`` or ``chat_template`` that names no input or cannot apply."""
    if recipe.tokenizer is None and recipe.chat_template is None:
        return
    if model_wise:
        field = "tokenizer" if recipe.tokenizer is not None else "chat_template"
        raise RecipeError(
            f"`{field}` applies to tensor-wise methods only; {recipe.method} is model-wise and keeps the tokenizer of "
            "the model it builds on. Remove the option, or fuse with a tensor-wise method."
        )
    names = ", ".join(str(r) for r in recipe_inputs(recipe))
    if recipe.tokenizer is not None:
        if recipe.tokenizer == "base" and recipe.base is None:
            raise RecipeError("tokenizer: base needs a base model (--base); or use `union`, or name one of the models.")
        if recipe.tokenizer not in TOKENIZER_CHOICES and find_input(recipe.tokenizer, recipe) is None:
            raise RecipeError(
                f"tokenizer {recipe.tokenizer!r} is neither `base`, `union` nor one of the inputs ({names})."
            )
    template = recipe.chat_template
    if template is not None and template != "auto" and not is_literal_template(template):
        if find_input(template, recipe) is None:
            raise RecipeError(
                f"chat_template {template!r} is neither `auto`, one of the inputs ({names}), nor a Jinja template "
                "(a literal template holds {{ or {%)."
            )


def most_common_template(templates: Sequence[str | None]) -> str | None:
    """The template most inputs have (``templates`` in :func:`recipe_inputs` order; a tie goes to the first of
    them); inputs without one do not count."""
    counts = Counter(t for t in templates if t is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(t for t in templates if t is not None and counts[t] == best)
