"""The output's tokenizer, settled before any weight is downloaded: the recipe's ``tokenizer`` (whose vocabulary) and
``chat_template`` (which template it carries).

Each input's tokenizer is loaded with transformers from its own files (a Hub model's tokenizer files are fetched
alone, ahead of its weights). The output tokenizer is the chosen one, with the union's extra tokens added by
``add_tokens`` (so ids are whatever transformers gives them, and the row maps follow those ids). Every input then
gets a row map onto the output vocabulary (:mod:`hf_fusion.engine.vocabulary`), and its checkpoint is presented
re-indexed (:mod:`hf_fusion.engine.reindexed`) to the plan, the headers' checks included.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hf_fusion.engine.checkpoint import Checkpoint
from hf_fusion.engine.reindexed import reindex
from hf_fusion.engine.vocabulary import RowMap, Vocab, extra_tokens, id_count, output_rows, row_maps
from hf_fusion.errors import IncompatibleModelsError, RecipeError
from hf_fusion.fusion.tokenizer_choice import find_input, is_literal_template, most_common_template, recipe_inputs
from hf_fusion.model_files import config_vocab_size
from hf_fusion.recipe import Recipe
from hf_fusion.sources import Source, tokenizer_folder

log = logging.getLogger(__name__)


@dataclass
class VocabularyAlignment:
    """The output tokenizer (its chat template set) and, when the recipe sets ``tokenizer``, the output's embedding
    rows and each input's row map (inputs in ``sources`` order)."""

    tokenizer: Any
    rows: int | None = None
    maps: Sequence[RowMap] = ()
    vocabs: Sequence[Vocab] = ()
    vocab_sizes: Sequence[int | None] = ()

    def views(self, checkpoints: Sequence[Checkpoint | None]) -> list[Checkpoint | None]:
        """The inputs' checkpoints with their embeddings on the output vocabulary's rows."""
        if self.rows is None:
            return list(checkpoints)
        return reindex(checkpoints, self.maps, self.vocabs, self.vocab_sizes, self.rows)


def align_vocabularies(
    recipe: Recipe, sources: Sequence[Source], *, has_base: bool, reference: int, token: str | None
) -> VocabularyAlignment | None:
    """The output tokenizer the recipe asks for, from the inputs' tokenizer files alone; ``None`` when it sets
    neither ``tokenizer`` nor ``chat_template`` (the reference's tokenizer files are copied as they are).
    ``sources`` are [base] + models when ``has_base``; ``reference`` indexes the model the output's config follows."""
    if recipe.tokenizer is None and recipe.chat_template is None:
        return None
    order = [*range(1 if has_base else 0, len(sources)), *([0] if has_base else [])]  # recipe order, base last
    loaded: dict[int, Any] = {}

    def tokenizer_of(index: int, *, required: bool = True) -> Any:
        if index not in loaded:
            loaded[index] = _load_tokenizer(sources[index], token=token)
        if loaded[index] is None and required:
            raise IncompatibleModelsError(
                f"{sources[index].label} has no tokenizer files (tokenizer.json, tokenizer_config.json...), which "
                "the recipe's `tokenizer` and `chat_template` read. Save its tokenizer next to its weights, or "
                "remove those options."
            )
        return loaded[index]

    if recipe.tokenizer is None:
        alignment = VocabularyAlignment(_fresh(tokenizer_of(reference)))
    else:
        alignment = _aligned(recipe, sources, has_base=has_base, order=order, tokenizer_of=tokenizer_of)
    template = _chat_template(recipe, sources, has_base=has_base, order=order, reference=reference, of=tokenizer_of)
    alignment.tokenizer.chat_template = template
    return alignment


def _aligned(
    recipe: Recipe, sources: Sequence[Source], *, has_base: bool, order: list[int], tokenizer_of: Callable[..., Any]
) -> VocabularyAlignment:
    """The output tokenizer and row maps for ``tokenizer: base | union | MODEL``."""
    tokenizers = [tokenizer_of(i) for i in range(len(sources))]
    vocabs = [dict(t.get_vocab()) for t in tokenizers]
    choice = recipe.tokenizer
    assert choice is not None
    if choice == "union":
        start = 0  # the base when there is one, else the first model
    elif choice == "base":
        if not has_base:
            raise RecipeError(
                f"tokenizer: base needs a base the fusion reads, but {recipe.method} does not use one; "
                "use `union` or name one of the models."
            )
        start = 0
    else:
        start = _source_index(choice, recipe, has_base=has_base)
    output = _fresh(tokenizers[start])
    if choice == "union":
        extras = extra_tokens(vocabs[start], [vocabs[i] for i in order if i != start])
        _add_tokens(output, extras, [tokenizers[i] for i in order])
    vocab = dict(output.get_vocab())
    rows = output_rows(id_count(vocab), config_vocab_size(sources[start].config), id_count(vocabs[start]))
    _log_moved(sources, vocabs, vocab)
    maps = row_maps(vocab, rows, vocabs, 0 if has_base else None)
    sizes = [config_vocab_size(s.config) for s in sources]
    return VocabularyAlignment(output, rows, maps, vocabs, sizes)


def _source_index(text: str, recipe: Recipe, *, has_base: bool) -> int:
    """The index in ``sources`` of the input ``text`` names."""
    position = find_input(text, recipe)
    if position is None:
        raise RecipeError(f"{text!r} names none of the inputs ({', '.join(map(str, recipe_inputs(recipe)))}).")
    if position < len(recipe.models):
        return position + (1 if has_base else 0)
    if not has_base:
        raise RecipeError(f"{text} is the base, which {recipe.method} does not read; name one of the models.")
    return 0


def _load_tokenizer(source: Source, *, token: str | None) -> Any:
    """The source's tokenizer, loaded by transformers from its files (never with remote code); ``None`` when it has
    no tokenizer files."""
    folder = tokenizer_folder(source, token=token)
    if folder is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many kinds for tokenizer files it cannot read
        raise IncompatibleModelsError(
            f"{source.label}: its tokenizer cannot be loaded by transformers ({err})."
        ) from err


def _fresh(tokenizer: Any) -> Any:
    """A copy of a loaded tokenizer the output may change (tokens added, template set)."""
    return copy.deepcopy(tokenizer)


def _add_tokens(output: Any, extras: list[str], tokenizers: Sequence[Any]) -> None:
    """Adds the union's extra tokens in order, each with the settings (special or not, stripping, normalisation) it
    has in the first tokenizer that added it; a token of another tokenizer's own vocabulary is added as a plain
    added token."""
    from tokenizers import AddedToken

    settings: dict[str, Any] = {}
    for tokenizer in tokenizers:
        for added in tokenizer.added_tokens_decoder.values():
            settings.setdefault(str(added), added)
    for text in extras:
        added = settings.get(text)
        if added is None:
            added = AddedToken(text, special=False, normalized=False)
        output.add_tokens([added], special_tokens=bool(getattr(added, "special", False)))


def _log_moved(sources: Sequence[Source], vocabs: Sequence[Vocab], output: Vocab) -> None:
    """Says how many tokens sit at another id in an input than in the output (their rows are moved)."""
    for source, vocab in zip(sources, vocabs):
        moved = sum(1 for t, i in vocab.items() if output.get(t, i) != i)
        missing = sum(1 for t in output if t not in vocab)
        if moved or missing:
            log.info(
                "%s: %d token(s) at another id than in the output, %d output token(s) it lacks",
                source.label,
                moved,
                missing,
            )


def _chat_template(
    recipe: Recipe,
    sources: Sequence[Source],
    *,
    has_base: bool,
    order: list[int],
    reference: int,
    of: Callable[..., Any],
) -> str | None:
    """The template the output carries: ``auto`` (the most common among the inputs), an input's, a literal one, or
    (unset) the reference's."""
    setting = recipe.chat_template
    if setting is None:
        return _template_of(of(reference, required=False))
    if setting == "auto":
        chosen = most_common_template([_template_of(of(i, required=False)) for i in order])
        if chosen is None:
            raise RecipeError("chat_template: auto, but none of the inputs has a chat template; give one literally.")
        return chosen
    if is_literal_template(setting) and find_input(setting, recipe) is None:
        return setting
    index = _source_index(setting, recipe, has_base=has_base)
    chosen = _template_of(of(index, required=False))
    if chosen is None:
        raise RecipeError(f"chat_template: {setting}, but {sources[index].label} has no chat template.")
    return chosen


def _template_of(tokenizer: Any) -> str | None:
    """A tokenizer's chat template; of several named ones, the default."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None
