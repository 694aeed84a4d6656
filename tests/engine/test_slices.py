"""Checkpoint views for slices: which input tensor each output name stands for, reads delegated row by row, the plan
copying one-source runs, and the gradient positions per slice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_fusion.engine.checkpoint import Checkpoint, open_checkpoint
from hf_fusion.engine.layers import layer_positions
from hf_fusion.engine.plan import build_plan
from hf_fusion.engine.slices import (
    LayerRun,
    SlicedCheckpoint,
    before_stack,
    output_positions,
    slice_checkpoints,
    slice_positions,
)
from hf_fusion.errors import IncompatibleModelsError
from hf_fusion.recipe import OutputSlice, SliceSource


def _model(folder: Path, layers: int, seed: int) -> Checkpoint:
    """A decoder-shaped checkpoint: embeddings, ``layers`` blocks of two tensors, final norm and head."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(10, 4, generator=generator)}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.weight"] = torch.randn(6, 4, generator=generator)
        tensors[f"model.layers.{i}.norm.weight"] = torch.randn(4, generator=generator)
    tensors["model.norm.weight"] = torch.randn(4, generator=generator)
    tensors["lm_head.weight"] = torch.randn(10, 4, generator=generator)
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    return open_checkpoint(folder, folder.name)


def _read(ckpt: Checkpoint, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
    entry = ckpt.entries[name]
    stop = entry.rows if stop is None else stop
    out = torch.empty(entry.nbytes, dtype=torch.uint8)
    ckpt.read_rows(name, start, stop, out)
    rows = stop - start
    return out[: entry.nbytes * rows // entry.rows].view(torch.float32).view(rows, *entry.shape[1:])


@pytest.fixture()
def pair(tmp_path: Path) -> list[Checkpoint]:
    return [_model(tmp_path / "a", 6, seed=1), _model(tmp_path / "b", 6, seed=2)]


def test_copied_runs_stack_layers_and_take_the_ends_from_the_first_and_last_input(pair) -> None:
    a, b = pair
    sliced = slice_checkpoints(pair, [LayerRun(((0, 0),), 4), LayerRun(((1, 2),), 4)], read=[0, 1])
    for view in sliced.views:
        assert isinstance(view, SlicedCheckpoint)
        assert list(view.entries)[0] == "model.embed_tokens.weight"
        assert set(list(view.entries)[-2:]) == {"model.norm.weight", "lm_head.weight"}
        assert sorted({int(n.split(".")[2]) for n in view.entries if ".layers." in n}) == list(range(8))
        assert torch.equal(_read(view, "model.layers.1.mlp.weight"), _read(a, "model.layers.1.mlp.weight"))
        assert torch.equal(_read(view, "model.layers.5.mlp.weight"), _read(b, "model.layers.3.mlp.weight"))
        assert torch.equal(_read(view, "model.layers.7.norm.weight"), _read(b, "model.layers.5.norm.weight"))
        assert torch.equal(_read(view, "model.embed_tokens.weight"), _read(a, "model.embed_tokens.weight"))
        assert torch.equal(_read(view, "lm_head.weight"), _read(b, "lm_head.weight"))
        assert torch.equal(_read(view, "model.norm.weight"), _read(b, "model.norm.weight"))
    assert sliced.copy_from["model.layers.2.mlp.weight"] == 0
    assert sliced.copy_from["model.layers.4.mlp.weight"] == 1
    assert sliced.copy_from["model.embed_tokens.weight"] == 0 and sliced.copy_from["lm_head.weight"] == 1


def test_reads_are_delegated_by_row_range(pair) -> None:
    sliced = slice_checkpoints(pair, [LayerRun(((1, 3),), 2)], read=[0, 1])
    rows = _read(sliced.views[0], "model.layers.0.mlp.weight", 2, 5)
    assert torch.equal(rows, _read(pair[1], "model.layers.3.mlp.weight")[2:5])


def test_fused_runs_give_each_input_its_own_layers_and_ends(pair) -> None:
    a, b = pair
    runs = [LayerRun(((0, 0), (1, 3)), 3), LayerRun(((1, 0),), 2)]
    sliced = slice_checkpoints(pair, runs, read=[0, 1])
    va, vb = sliced.views
    assert torch.equal(_read(va, "model.layers.2.mlp.weight"), _read(a, "model.layers.2.mlp.weight"))
    assert torch.equal(_read(vb, "model.layers.2.mlp.weight"), _read(b, "model.layers.5.mlp.weight"))
    assert torch.equal(_read(va, "model.layers.3.mlp.weight"), _read(b, "model.layers.0.mlp.weight"))
    assert torch.equal(_read(va, "lm_head.weight"), _read(a, "lm_head.weight"))
    assert torch.equal(_read(vb, "lm_head.weight"), _read(b, "lm_head.weight"))
    assert set(sliced.copy_from) == {"model.layers.3.mlp.weight", "model.layers.3.norm.weight"} | {
        "model.layers.4.mlp.weight",
        "model.layers.4.norm.weight",
    }
    plan = build_plan(sliced.views, base=None, experts=[0, 1], uses_base=False, reference=0, copy_from=sliced.copy_from)
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["model.layers.0.mlp.weight"].fuse and set(by_name["model.layers.0.mlp.weight"].reads) == {0, 1}
    assert by_name["lm_head.weight"].fuse
    copied = by_name["model.layers.4.mlp.weight"]
    assert not copied.fuse and copied.reads == {1: "model.layers.4.mlp.weight"}


def test_a_plan_of_copies_only_is_valid(pair) -> None:
    sliced = slice_checkpoints(pair, [LayerRun(((0, 0),), 2), LayerRun(((1, 4),), 2)], read=[0, 1])
    plan = build_plan(sliced.views, base=None, experts=[0, 1], uses_base=False, reference=0, copy_from=sliced.copy_from)
    assert not plan.fused and len(plan.tensors) == 3 + 2 * 4
    assert {next(iter(t.reads)) for t in plan.tensors if t.name.startswith("model.layers.3.")} == {1}


def test_models_with_several_stacks_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "t5"
    folder.mkdir()
    save_file(
        {"encoder.block.0.w": torch.zeros(2, 2), "decoder.block.0.w": torch.zeros(2, 2)}, folder / "model.safetensors"
    )
    ckpt = open_checkpoint(folder, "t5")
    with pytest.raises(IncompatibleModelsError, match="several stacks of layers"):
        slice_checkpoints([ckpt], [LayerRun(((0, 0),), 1)], read=[0])


def test_embeddings_come_before_the_stack() -> None:
    assert before_stack("model.embed_tokens.weight") and before_stack("transformer.wte.weight")
    assert before_stack("bert.embeddings.word_embeddings.weight")
    assert not before_stack("model.norm.weight") and not before_stack("lm_head.weight")
    assert not before_stack("transformer.ln_f.bias")


def test_positions_are_relative_to_each_slice() -> None:
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.w" for i in range(8)), "lm_head.weight"]
    positions = slice_positions(names, [4, 3, 1])
    assert positions["model.embed_tokens.weight"] == 0.0 and positions["lm_head.weight"] == 0.0
    assert [positions[f"model.layers.{i}.w"] for i in range(8)] == [0.0, 1 / 3, 2 / 3, 1.0, 0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="beyond the 8 layers"):
        slice_positions(["model.layers.8.w"], [4, 3, 1])


def test_output_positions_follow_the_recipe() -> None:
    names = [f"model.layers.{i}.w" for i in range(6)]
    slices = [
        OutputSlice(sources=[SliceSource(model="a", layers=(0, 3))]),
        OutputSlice(sources=[SliceSource(model="b", layers=(1, 4))]),
    ]
    assert list(output_positions(names, slices).values()) == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert output_positions(names, None) == layer_positions(names)
