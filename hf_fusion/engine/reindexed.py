"""An input's checkpoint seen with the output vocabulary's rows, so models that added different tokens fuse row by row.

Its token embedding and LM head (found by :func:`~hf_fusion.engine.vocabulary.vocabulary_tensors`) are presented
with one row per output id, following the input's :class:`~hf_fusion.engine.vocabulary.RowMap`: its own row, the
mean of rows read from the base or the other inputs, or its mean token row for padding. Every other tensor is the
input's own. Rows are read when the engine asks for them; runs of consecutive rows are read at once.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from hf_fusion.engine.checkpoint import Checkpoint, TensorEntry
from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH
from hf_fusion.engine.vocabulary import RowMap, Vocab, id_count, vocabulary_tensors
from hf_fusion.errors import IncompatibleModelsError

_CHUNK_BYTES = 64 << 20

Peer = tuple[Checkpoint, dict[str, str]]
"""An input's checkpoint (as stored, not re-indexed) and its vocabulary tensors by name, with their roles."""


class ReindexedCheckpoint(Checkpoint):
    """``inner`` with its vocabulary tensors re-indexed onto ``rows`` output rows."""

    def __init__(
        self,
        inner: Checkpoint,
        tensors: dict[str, str],
        row_map: RowMap,
        rows: int,
        token_rows: Sequence[int],
        peers: Sequence[Peer | None],
    ) -> None:
        entries = dict(inner.entries)
        for name in tensors:
            e = inner.entries[name]
            shape = (rows, *e.shape[1:])
            entries[name] = TensorEntry(name, e.dtype, shape, e.file, e.start, e.nbytes // e.rows * rows)
        super().__init__(inner.label, entries, inner.weight_files)
        self._inner = inner
        self._tensors = tensors
        self._map = row_map
        self._token_rows = list(token_rows)
        self._peers = peers
        self._segments = _segments(row_map.own)
        self._starts = [s[0] for s in self._segments]
        self._fills: dict[tuple[str, int], torch.Tensor] = {}
        self._means: dict[str, torch.Tensor] = {}

    def read_rows(self, name: str, row_start: int, row_stop: int, out: torch.Tensor) -> None:
        if name not in self._tensors:
            self._inner.read_rows(name, row_start, row_stop, out)
            return
        entry = self.entries[name]
        row_bytes = entry.nbytes // entry.rows
        i = bisect.bisect_right(self._starts, row_start) - 1
        while i < len(self._segments) and self._segments[i][0] < row_stop:
            first, source, length = self._segments[i]
            lo, hi = max(first, row_start), min(first + length, row_stop)
            dest = out[(lo - row_start) * row_bytes : (hi - row_start) * row_bytes]
            if source >= 0:
                self._inner.read_rows(name, source + lo - first, source + hi - first, dest)
            else:
                dest.copy_(self._fill(name, lo))
            i += 1

    def _fill(self, name: str, row: int) -> torch.Tensor:
        """The raw bytes of an output row this input has no row for: its stand-in, or padding."""
        cached = self._fills.get((name, row))
        if cached is None:
            donors = self._map.donors.get(row)
            if donors is None:
                value = self._mean_row(name)
            else:
                value = torch.stack([self._peer_row(i, name, r) for i, r in donors]).mean(dim=0)
            dtype = SAFETENSORS_TO_TORCH[self.entries[name].dtype]
            cached = self._fills[(name, row)] = value.to(dtype).contiguous().view(torch.uint8)
        return cached

    def _peer_row(self, index: int, name: str, row: int) -> torch.Tensor:
        """Row ``row`` of the matching vocabulary tensor of input ``index``, in float32."""
        peer = self._peers[index]
        if peer is None:
            raise IncompatibleModelsError(f"{self.label}: input {index} cannot be read for a stand-in row of {name!r}.")
        ckpt, tensors = peer
        target = _counterpart(name, self._tensors[name], tensors)
        entry = ckpt.entries[target]
        buffer = torch.empty(entry.nbytes // entry.rows, dtype=torch.uint8)
        ckpt.read_rows(target, row, row + 1, buffer)
        return buffer.view(SAFETENSORS_TO_TORCH[entry.dtype]).float()

    def _mean_row(self, name: str) -> torch.Tensor:
        """The mean of this input's rows for the tokens of its own vocabulary (read once, in chunks)."""
        mean = self._means.get(name)
        if mean is not None:
            return mean
        entry = self._inner.entries[name]
        row_bytes = entry.nbytes // entry.rows
        dtype = SAFETENSORS_TO_TORCH[entry.dtype]
        wanted = torch.zeros(entry.rows, dtype=torch.bool)
        wanted[self._token_rows] = True
        total = torch.zeros(entry.row_numel, dtype=torch.float64)
        step = max(1, _CHUNK_BYTES // max(1, row_bytes))
        for start in range(0, entry.rows, step):
            stop = min(entry.rows, start + step)
            buffer = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
            self._inner.read_rows(name, start, stop, buffer)
            block = buffer.view(dtype).view(stop - start, entry.row_numel)
            total += block[wanted[start:stop]].double().sum(dim=0)
        mean = self._means[name] = (total / max(1, int(wanted.sum()))).float()
        return mean


def _segments(own: Sequence[int]) -> list[tuple[int, int, int]]:
    """``own`` as ``(first output row, first source row or -1, length)`` runs; rows without a source stand alone."""
    segments: list[tuple[int, int, int]] = []
    for row, source in enumerate(own):
        if segments and source >= 0:
            first, start, length = segments[-1]
            if start >= 0 and start + length == source:
                segments[-1] = (first, start, length + 1)
                continue
        segments.append((row, source, 1))
    return segments


def _counterpart(name: str, role: str, tensors: dict[str, str]) -> str:
    """The tensor of another input that plays the part of ``name``: the same name, a name that differs by a prefix,
    the same role (an LM head tied to the embedding is stored once), or its only vocabulary tensor."""
    if name in tensors:
        return name
    for other in tensors:
        if other.endswith("." + name) or name.endswith("." + other):
            return other
    return next((n for n, r in tensors.items() if r == role), next(iter(tensors)))


def check_rows(label: str, vocab: Vocab, rows: int) -> None:
    """Refuses an input whose tokenizer has ids its embeddings have no row for."""
    needed = id_count(vocab)
    if needed > rows:
        token = max(vocab, key=lambda t: vocab[t])
        raise IncompatibleModelsError(
            f"{label}: its tokenizer has token ids up to {needed - 1} ({token!r}) but its embeddings have {rows} rows, "
            "so some tokens have no embedding. Resize the model's embeddings to its tokenizer "
            "(model.resize_token_embeddings(len(tokenizer))) and save it again, or leave `tokenizer` unset."
        )


def reindex(
    checkpoints: Sequence[Checkpoint | None],
    maps: Sequence[RowMap],
    vocabs: Sequence[Vocab],
    vocab_sizes: Sequence[int | None],
    rows: int,
) -> list[Checkpoint | None]:
    """Every input (``None`` stays ``None``: not known yet) with its vocabulary tensors on ``rows`` output rows; an
    input that already has exactly those rows is returned as it is. ``vocab_sizes`` are the configs' ``vocab_size``."""
    tensors = [
        vocabulary_tensors(c.label, c.entries, size) if c is not None else None
        for c, size in zip(checkpoints, vocab_sizes)
    ]
    peers: list[Peer | None] = [(c, t) if c is not None and t else None for c, t in zip(checkpoints, tensors)]
    views: list[Checkpoint | None] = []
    for ckpt, found, row_map, vocab in zip(checkpoints, tensors, maps, vocabs):
        if ckpt is None or not found:
            views.append(ckpt)
            continue
        have = ckpt.entries[next(iter(found))].rows
        check_rows(ckpt.label, vocab, have)
        if have == rows and row_map.is_identity(rows):
            views.append(ckpt)
        else:
            views.append(ReindexedCheckpoint(ckpt, found, row_map, rows, sorted(set(vocab.values())), peers))
    return views
