"""Streaming safetensors writer: headers first, then tensor data in order, so no shard is ever held in memory.

``safetensors.torch.save_file`` needs every tensor of a shard in memory at once; since the fused model's names,
dtypes and shapes are known before any data is computed, each shard's header can be written up front and the data
appended slice by slice. Output follows transformers' layout: ``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_fusion.engine.dtypes import itemsize

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def shard_layout(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: Sequence[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Writes planned tensors into ``folder``; call :meth:`write` with each tensor's bytes in plan order."""

    def __init__(
        self,
        folder: Path,
        tensors: Sequence[OutputTensor],
        *,
        stem: str = "model",
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.stem = stem
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = shard_layout(tensors, max_shard_bytes)
        n = len(self.shards)
        self.file_names = (
            [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._queue = [(shard_index, t) for shard_index, shard in enumerate(self.shards) for t in shard]
        self._position = 0
        self._remaining = 0
        self._fd: int | None = None
        self._open_shard = -1

    @property
    def files(self) -> list[str]:
        names = list(self.file_names)
        if len(names) > 1:
            names.append(f"{self.stem}.safetensors.index.json")
        return names

    def _start_shard(self, index: int) -> None:
        self._close_fd()
        path = self.folder / self.file_names[index]
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._write_all(_header_bytes(self.shards[index], self.metadata))
        self._open_shard = index

    def _write_all(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        assert self._fd is not None
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def begin(self, name: str) -> OutputTensor:
        """Starts the next tensor, which must be ``name``; returns its planned entry."""
        shard_index, planned = self._queue[self._position]
        if planned.name != name:
            raise RuntimeError(f"writer expected tensor {planned.name!r}, got {name!r}")
        if self._remaining:
            raise RuntimeError("previous tensor was not written completely")
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        self._position += 1
        self._remaining = planned.nbytes
        return planned

    def write(self, data: torch.Tensor) -> None:
        """Appends raw bytes of the current tensor (any dtype, contiguous, on the CPU)."""
        raw = data.contiguous().reshape(-1).view(torch.uint8)
        if raw.numel() > self._remaining:
            raise RuntimeError("more bytes than the planned tensor holds")
        self._write_all(memoryview(raw.numpy()))
        self._remaining -= raw.numel()

    def overwrite(self, name: str, byte_offset: int, data: torch.Tensor) -> None:
        """Rewrites bytes of an already written tensor in place (a slice fused again after the merge pass)."""
        for shard_index, shard in enumerate(self.shards):
            start = len(_header_bytes(shard, self.metadata))
            for t in shard:
                if t.name == name:
                    raw = data.contiguous().reshape(-1).view(torch.uint8)
                    if byte_offset < 0 or byte_offset + raw.numel() > t.nbytes:
                        raise RuntimeError(f"overwrite outside tensor {name!r}")
                    fd = os.open(self.folder / self.file_names[shard_index], os.O_WRONLY)
                    try:
                        view = memoryview(raw.numpy())
                        done = 0
                        while done < len(view):
                            done += os.pwrite(fd, view[done:], start + byte_offset + done)
                    finally:
                        os.close(fd)
                    return
                start += t.nbytes
        raise KeyError(name)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Checks everything planned was written and writes the index for sharded output."""
        self._close_fd()
        if self._position != len(self._queue) or self._remaining:
            raise RuntimeError("not every planned tensor was written")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for shard in self.shards for t in shard)},
                "weight_map": {t.name: self.file_names[i] for i, shard in enumerate(self.shards) for t in shard},
            }
            (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._close_fd()
