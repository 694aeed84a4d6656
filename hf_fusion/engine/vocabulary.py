"""The output vocabulary's rows, as pure functions over token strings and ids.

Fine-tunes of one base often add tokens of their own (chat markers, tool tags) or pad their vocabulary to a multiple
of 64, so their embedding matrices differ in rows. Tokens are matched by their string, never by their id, and every
input is given a :class:`RowMap` that says where each row of the output vocabulary comes from in that input.

A token an input lacks is stood in for by the base's row when the base has the token, else by the mean of the rows of
the inputs that have it. Under task-vector methods the input then contributes no change for that token (its row
equals the base's), and a token only one input has comes out as that input's own row (the stand-in equals it).
Padding rows (output rows no token uses) are each input's mean token row, so they never dominate an LM head's logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hf_fusion.engine.checkpoint import TensorEntry
from hf_fusion.errors import IncompatibleModelsError

Vocab = Mapping[str, int]
"""A tokenizer's vocabulary: token string -> id (``get_vocab()``, added tokens included)."""

INPUT, OUTPUT = "input", "output"
VOCABULARY_MODULES = {
    "embed_tokens": INPUT,
    "tok_embeddings": INPUT,
    "word_embeddings": INPUT,
    "wte": INPUT,
    "embed_in": INPUT,
    "embeddings": INPUT,
    "shared": INPUT,
    "lm_head": OUTPUT,
    "embed_out": OUTPUT,
    "output": OUTPUT,
}
"""The last module name of the tensors indexed by token id, and whether they embed tokens or score them."""

MAX_PAD_MULTIPLE = 128


def vocabulary_role(name: str) -> str | None:
    """``input`` (an embedding) or ``output`` (an LM head) for a tensor named like one, else ``None``."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return VOCABULARY_MODULES.get(parts[-1]) if parts else None


def vocabulary_tensors(label: str, entries: Mapping[str, TensorEntry], vocab_size: int | None) -> dict[str, str]:
    """The tensors of one model indexed by token id, with their role: named like an embedding or an LM head, and
    with as many rows as the config's ``vocab_size`` (or, without one, as each other)."""
    named = {n: e for n, e in entries.items() if vocabulary_role(n) and 1 <= len(e.shape) <= 2}
    counts = {e.shape[0] for e in named.values()}
    if vocab_size in counts:
        counts = {vocab_size}
    if len(counts) != 1:
        found = ", ".join(f"{n} {list(e.shape)}" for n, e in named.items()) or "none"
        raise IncompatibleModelsError(
            f"{label}: cannot tell which tensors are its token embeddings (vocab_size {vocab_size}; tensors named "
            f"like embeddings: {found}). Aligning vocabularies needs the embedding and LM head to have one row per "
            "token; leave `tokenizer` unset for this model."
        )
    rows = counts.pop()
    return {n: vocabulary_role(n) for n, e in named.items() if e.shape[0] == rows}  # type: ignore[misc]


def extra_tokens(start: Vocab, others: Sequence[Vocab]) -> list[str]:
    """The union's tokens beyond ``start``: each other vocabulary's missing tokens in id order, vocabularies in the
    order given, each token once."""
    seen = set(start)
    extra: list[str] = []
    for vocab in others:
        for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
            if token not in seen:
                seen.add(token)
                extra.append(token)
    return extra


def pad_multiple(rows: int, tokens: int) -> int:
    """The multiple a padded vocabulary was rounded to: the largest power of two (at most 128) dividing its row
    count, when it has more rows than tokens; 1 when it is not padded."""
    if rows <= tokens:
        return 1
    multiple = 1
    while multiple < MAX_PAD_MULTIPLE and rows % (multiple * 2) == 0:
        multiple *= 2
    return multiple


def output_rows(tokens: int, reference_rows: int | None, reference_tokens: int) -> int:
    """Rows of the output's embeddings for ``tokens`` ids: a padded reference keeps its row count when the tokens fit
    (padding exists to hold added tokens), else rounds up to its multiple; an unpadded one gets one row per id."""
    if reference_rows is None:
        return tokens
    multiple = pad_multiple(reference_rows, reference_tokens)
    if multiple == 1:
        return tokens
    return reference_rows if tokens <= reference_rows else -(-tokens // multiple) * multiple


def id_count(vocab: Vocab) -> int:
    """How many rows a vocabulary needs: its largest id plus one."""
    return max(vocab.values(), default=-1) + 1


@dataclass(frozen=True)
class RowMap:
    """Where each output row comes from in one input.

    ``own[r]`` is the input's row for output row ``r``, or -1; ``donors[r]`` lists the ``(input, row)`` pairs whose
    mean stands in for a token the input lacks; ``padding`` are the rows no token uses (the input's mean token row).
    """

    own: tuple[int, ...]
    donors: Mapping[int, tuple[tuple[int, int], ...]]
    padding: tuple[int, ...]

    def is_identity(self, rows: int) -> bool:
        """Whether the input already has exactly these rows, in this order."""
        return rows == len(self.own) and all(own == r for r, own in enumerate(self.own))


def row_maps(output: Vocab, rows: int, vocabs: Sequence[Vocab], base: int | None) -> list[RowMap]:
    """Each input's :class:`RowMap` onto the output vocabulary (``rows`` rows, ids beyond its tokens are padding);
    ``base`` is the index of the base among ``vocabs``, if there is one."""
    token_at: dict[int, str] = {i: t for t, i in output.items()}
    maps = []
    for vocab in vocabs:
        own, donors, padding = [], {}, []
        for r in range(rows):
            token = token_at.get(r)
            if token is None:
                own.append(-1)
                padding.append(r)
            elif token in vocab:
                own.append(vocab[token])
            else:
                own.append(-1)
                donors[r] = _donors(token, vocabs, base)
        maps.append(RowMap(tuple(own), donors, tuple(padding)))
    return maps


def _donors(token: str, vocabs: Sequence[Vocab], base: int | None) -> tuple[tuple[int, int], ...]:
    """The base's row for ``token`` when it has one, else every input's that has the token."""
    if base is not None and token in vocabs[base]:
        return ((base, vocabs[base][token]),)
    having = tuple((i, v[token]) for i, v in enumerate(vocabs) if token in v)
    if not having:
        raise IncompatibleModelsError(f"no input has the token {token!r} of the output vocabulary.")
    return having
