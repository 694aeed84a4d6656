"""The streaming writer produces files the safetensors library itself reads back identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_fusion.engine.dtypes import TORCH_TO_SAFETENSORS
from hf_fusion.engine.writer import OutputTensor, ShardedSafetensorsWriter, shard_layout


def _write(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, chunk_rows: int = 2):
    planned = [OutputTensor(k, TORCH_TO_SAFETENSORS[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardedSafetensorsWriter(folder, planned, max_shard_bytes=max_shard_bytes)
    for name, value in tensors.items():
        writer.begin(name)
        if value.dim() == 0:
            writer.write(value)
        for start in range(0, value.shape[0] if value.dim() else 0, chunk_rows):
            writer.write(value[start : start + chunk_rows])
    writer.close()
    return writer


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(5, 3, generator=g),
        "b": torch.randn(11, generator=g).to(torch.bfloat16),
        "c": torch.tensor(2.0, dtype=torch.float16),
        "d": torch.arange(8, dtype=torch.int32).view(4, 2),
        "e": torch.randn(3, 4, 2, generator=g).to(torch.float64),
    }


@pytest.mark.parametrize("max_shard_bytes", [10**9, 64, 1])
def test_round_trip_through_safetensors(tmp_path: Path, max_shard_bytes: int) -> None:
    tensors = _tensors()
    writer = _write(tmp_path, tensors, max_shard_bytes)
    loaded = {}
    for name in writer.file_names:
        with safe_open(str(tmp_path / name), "pt") as f:
            assert f.metadata()["format"] == "pt"
            loaded.update({k: f.get_tensor(k) for k in f.keys()})
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype
    if len(writer.file_names) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(writer.file_names)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    else:
        assert writer.file_names == ["model.safetensors"]


def test_header_keeps_data_8_byte_aligned(tmp_path: Path) -> None:
    _write(tmp_path, _tensors(), 10**9)
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0


def test_out_of_order_or_incomplete_writes_fail(tmp_path: Path) -> None:
    planned = [OutputTensor("a", "F32", (2,)), OutputTensor("b", "F32", (2,))]
    writer = ShardedSafetensorsWriter(tmp_path, planned)
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        writer.begin("b")
    writer.begin("a")
    writer.write(torch.zeros(1))
    with pytest.raises(RuntimeError, match="not written completely"):
        writer.begin("b")


def test_shard_layout_gives_oversized_tensors_their_own_shard() -> None:
    planned = [OutputTensor("a", "F32", (10,)), OutputTensor("b", "F32", (100,)), OutputTensor("c", "F32", (10,))]
    assert [[t.name for t in s] for s in shard_layout(planned, 100)] == [["a"], ["b"], ["c"]]
    assert [[t.name for t in s] for s in shard_layout(planned, 1000)] == [["a", "b", "c"]]
