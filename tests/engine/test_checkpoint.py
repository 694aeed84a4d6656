"""Reading checkpoints: headers, shards, row ranges, and clear errors for broken or unsafe files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_fusion.engine.checkpoint import open_checkpoint
from hf_fusion.errors import CheckpointError, PickleCheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=g),
        "h": torch.randn(9, generator=g).to(torch.bfloat16),
        "s": torch.tensor(3.5, dtype=torch.float16),
        "ids": torch.arange(6, dtype=torch.int64).view(2, 3),
        "empty": torch.zeros(0, 4),
    }


def _read(ckpt, name: str, start: int, stop: int) -> torch.Tensor:
    entry = ckpt.entries[name]
    from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH

    rows = stop - start
    nbytes = entry.nbytes * rows // entry.rows if entry.rows else entry.nbytes
    out = torch.empty(nbytes, dtype=torch.uint8)
    ckpt.read_rows(name, start, stop, out)
    shape = (rows, *entry.shape[1:]) if entry.shape else ()
    return out.view(SAFETENSORS_TO_TORCH[entry.dtype]).view(shape)


def test_reads_every_dtype_and_row_range(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path, "m")
    assert set(ckpt.entries) == set(tensors)
    assert torch.equal(_read(ckpt, "w", 2, 5), tensors["w"][2:5])
    assert torch.equal(_read(ckpt, "h", 0, 9), tensors["h"])
    assert torch.equal(_read(ckpt, "s", 0, 1), tensors["s"])
    assert torch.equal(_read(ckpt, "ids", 1, 2), tensors["ids"][1:2])
    assert _read(ckpt, "empty", 0, 0).shape == (0, 4)
    ckpt.close()


def test_sharded_checkpoint_via_index(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file({"w": tensors["w"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"h": tensors["h"]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {},
                "weight_map": {"w": "model-00001-of-00002.safetensors", "h": "model-00002-of-00002.safetensors"},
            }
        )
    )
    ckpt = open_checkpoint(tmp_path, "m")
    assert list(ckpt.entries) == ["w", "h"]
    assert ckpt.weights_stem == "model"
    assert torch.equal(_read(ckpt, "h", 3, 9), tensors["h"][3:])


def test_truncated_file_is_named(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"model.safetensors: file is truncated: tensor"):
        open_checkpoint(tmp_path, "m")


@pytest.mark.parametrize("content", [b"", b"abc", b"\xff" * 64, (20).to_bytes(8, "little") + b"{not json}" + b" " * 10])
def test_garbage_is_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(tmp_path, "m")


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        open_checkpoint(tmp_path, "m")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights found"):
        open_checkpoint(tmp_path, "m")


def test_pickle_refused_unless_allowed(tmp_path: Path) -> None:
    tensors = _tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match="--allow-pickle"):
        open_checkpoint(tmp_path, "m")
    ckpt = open_checkpoint(tmp_path, "m", allow_pickle=True)
    assert torch.equal(_read(ckpt, "w", 1, 3), tensors["w"][1:3])
    assert ckpt.weights_stem == "pytorch_model"


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: D105
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        open_checkpoint(tmp_path, "m", allow_pickle=True)


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            8,
            "overlaps the tensor before it",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
            "overlaps the tensor before it",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "leaves a gap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "invalid data offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "bytes after the last tensor"),
    ],
)
def test_headers_the_safetensors_library_refuses_are_refused(
    tmp_path: Path, header: dict, data: int, message: str
) -> None:
    from safetensors import SafetensorError

    path = tmp_path / "model.safetensors"
    _raw_safetensors(path, header, bytes(data))
    with pytest.raises(SafetensorError):  # the reference: the library itself refuses the file
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                handle.get_tensor(name)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path, "m")
