"""The output vocabulary's rows (engine/vocabulary.py) and checkpoints presented on them (engine/reindexed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_fusion.engine.checkpoint import Checkpoint, TensorEntry
from hf_fusion.engine.dtypes import TORCH_TO_SAFETENSORS
from hf_fusion.engine.reindexed import ReindexedCheckpoint, reindex
from hf_fusion.engine.vocabulary import (
    extra_tokens,
    output_rows,
    pad_multiple,
    row_maps,
    vocabulary_role,
    vocabulary_tensors,
)
from hf_fusion.errors import IncompatibleModelsError


class Memory(Checkpoint):
    """Tensors held in memory, read row range by row range like a file."""

    def __init__(self, label: str, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        entries = {
            n: TensorEntry(
                n, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape), Path(label), 0, t.numel() * t.element_size()
            )
            for n, t in tensors.items()
        }
        super().__init__(label, entries, [Path("model.safetensors")])

    def read_rows(self, name: str, row_start: int, row_stop: int, out: torch.Tensor) -> None:
        raw = self.tensors[name][row_start:row_stop].contiguous().reshape(-1).view(torch.uint8)
        out[: raw.numel()].copy_(raw)


def read(ckpt: Checkpoint, name: str, start: int, stop: int) -> torch.Tensor:
    entry = ckpt.entries[name]
    out = torch.empty(entry.nbytes, dtype=torch.uint8)
    ckpt.read_rows(name, start, stop, out)
    return out[: (stop - start) * entry.nbytes // entry.rows].view(torch.float32).view(stop - start, *entry.shape[1:])


def test_union_extras_come_in_model_order_then_id_order() -> None:
    start = {"a": 0, "b": 1}
    assert extra_tokens(start, [{"b": 0, "y": 3, "x": 2}, {"z": 0, "x": 1}]) == ["x", "y", "z"]


def test_padding_keeps_the_reference_rows_or_rounds_up_to_its_multiple() -> None:
    assert pad_multiple(32064, 32011) == 64 and pad_multiple(151936, 151665) == 128 and pad_multiple(32000, 32000) == 1
    assert output_rows(32013, 32064, 32011) == 32064  # the added tokens fit in the padding
    assert output_rows(32070, 32064, 32011) == 32128  # rounded up to the same multiple
    assert output_rows(32002, 32000, 32000) == 32002  # no padding in the reference, none in the output
    assert output_rows(35, None, 33) == 35


def test_vocabulary_tensors_by_name_and_rows() -> None:
    assert vocabulary_role("model.embed_tokens.weight") == "input" and vocabulary_role("lm_head.weight") == "output"
    assert vocabulary_role("model.layers.0.mlp.up_proj.weight") is None
    ckpt = Memory(
        "m",
        {
            "model.embed_tokens.weight": torch.zeros(10, 4),
            "lm_head.weight": torch.zeros(10, 4),
            "model.layers.0.mlp.up_proj.weight": torch.zeros(10, 4),  # as many rows, but not named like one
        },
    )
    assert vocabulary_tensors("m", ckpt.entries, 10) == {
        "model.embed_tokens.weight": "input",
        "lm_head.weight": "output",
    }
    odd = Memory("odd", {"model.embed_tokens.weight": torch.zeros(10, 4), "lm_head.weight": torch.zeros(12, 4)})
    with pytest.raises(IncompatibleModelsError, match="odd: cannot tell which tensors are its token embeddings"):
        vocabulary_tensors("odd", odd.entries, None)


def test_row_maps_stand_ins_and_padding() -> None:
    base, a, b = {"x": 0, "y": 1}, {"x": 1, "y": 0, "p": 2}, {"x": 0, "q": 1, "p": 2}
    output = {"x": 0, "y": 1, "p": 2, "q": 3}
    maps = row_maps(output, 6, [base, a, b], base=0)
    assert maps[1].own == (1, 0, 2, -1, -1, -1) and maps[1].padding == (4, 5)
    assert maps[1].donors == {3: ((2, 1),)}  # only b has q
    assert maps[2].donors == {1: ((0, 1),)}  # the base has y
    assert maps[0].donors == {2: ((1, 2), (2, 2)), 3: ((2, 1),)}  # the base lacks p: the mean of a and b


def test_reindexed_rows_in_any_slicing() -> None:
    torch.manual_seed(0)
    base_t = {"model.embed_tokens.weight": torch.randn(3, 4), "lm_head.weight": torch.randn(3, 4), "n": torch.randn(2)}
    a_t = {"model.embed_tokens.weight": torch.randn(4, 4), "lm_head.weight": torch.randn(4, 4), "n": torch.randn(2)}
    b_t = {"model.embed_tokens.weight": torch.randn(5, 4), "n": torch.randn(2)}  # tied: no LM head stored
    base, a, b = Memory("base", base_t), Memory("a", a_t), Memory("b", b_t)
    vocabs = [{"x": 0, "y": 1, "z": 2}, {"y": 0, "x": 1, "p": 2, "z": 3}, {"x": 0, "y": 1, "q": 2, "p": 3}]
    output = {"x": 0, "y": 1, "z": 2, "p": 3, "q": 4}
    maps = row_maps(output, 8, vocabs, base=0)
    views = reindex([base, a, b], maps, vocabs, [3, 4, 5], 8)
    assert all(isinstance(v, ReindexedCheckpoint) for v in views)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        e = lambda t, n=name: t.get(n, t["model.embed_tokens.weight"])  # noqa: E731
        expected_a = torch.stack(
            [
                e(a_t)[1],
                e(a_t)[0],
                e(a_t)[3],
                e(a_t)[2],
                e(b_t)[2],  # q: only b has it
                *[e(a_t).mean(dim=0)] * 3,  # padding: a's mean token row
            ]
        )
        whole = read(views[1], name, 0, 8)
        torch.testing.assert_close(whole, expected_a)
        pieces = torch.cat([read(views[1], name, s, min(8, s + 3)) for s in range(0, 8, 3)])
        torch.testing.assert_close(pieces, expected_a)
        torch.testing.assert_close(read(views[0], name, 3, 4)[0], (e(a_t)[2] + e(b_t)[3]) / 2)  # base lacks p
    # b lacks z: the base's row (b's tied embedding stands in for its LM head, so the base's embedding is read).
    torch.testing.assert_close(
        read(views[2], "model.embed_tokens.weight", 2, 3)[0], base_t["model.embed_tokens.weight"][2]
    )
    assert views[2].entries["model.embed_tokens.weight"].shape == (8, 4) and "lm_head.weight" not in views[2].entries
    torch.testing.assert_close(read(views[1], "n", 0, 2), a_t["n"].view(2))


def test_identity_maps_leave_a_checkpoint_as_it_is_and_short_embeddings_are_refused() -> None:
    ckpt = Memory("same", {"model.embed_tokens.weight": torch.zeros(2, 4)})
    vocab = {"x": 0, "y": 1}
    assert reindex([ckpt, None], row_maps(vocab, 2, [vocab, vocab], None), [vocab, vocab], [2, None], 2)[:1] == [ckpt]
    short = {"x": 0, "y": 1, "z": 2}
    with pytest.raises(IncompatibleModelsError, match="same: its tokenizer has token ids up to 2 \\('z'\\)"):
        reindex([ckpt], row_maps(short, 3, [short], None), [short], [2], 3)
