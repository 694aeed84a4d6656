"""A fused model written tensor by tensor: its config and an ordered plan of tensors, each computed only when it is
written. A model-wise method whose output is a stock architecture assembled from its inputs' tensors (dense experts
becoming a Mixtral) returns one instead of a module, so the output is never held whole in memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_fusion.engine.checkpoint import Checkpoint
from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH, TORCH_NAMES
from hf_fusion.engine.writer import OutputTensor, ShardedSafetensorsWriter
from hf_fusion.errors import FusionError
from hf_fusion.progress import progress_bar


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, safetensors dtype and shape, known up front, and how to compute it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    compute: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class StreamedModel:
    """A stock model's ``config`` (a transformers ``PretrainedConfig``), its tensors in writing order, and the
    checkpoints they are read from (closed once the model is written)."""

    config: Any
    tensors: list[PlannedTensor]
    sources: tuple[Checkpoint, ...] = ()

    def write(self, folder: Path, *, dtype: str | None, max_shard_bytes: int, show_progress: bool = False) -> int:
        """Writes ``config.json`` and the safetensors shards into ``folder``; ``dtype`` (a safetensors code, the
        recipe's output dtype) replaces every floating tensor's dtype. Returns the number of tensors written."""
        planned = [
            OutputTensor(t.name, dtype if dtype is not None and _is_float(t.dtype) else t.dtype, t.shape)
            for t in self.tensors
        ]
        floating = [p.dtype for p in planned if _is_float(p.dtype)]
        if floating:
            self.config.dtype = TORCH_NAMES.get(max(set(floating), key=floating.count), "float32")
        self.config.save_pretrained(folder)
        writer = ShardedSafetensorsWriter(folder, planned, max_shard_bytes=max_shard_bytes)
        try:
            with progress_bar(total=len(planned), desc="writing", unit="tensor", disable=not show_progress) as bar:
                for tensor, out in zip(self.tensors, planned):
                    writer.begin(out.name)
                    value = tensor.compute()
                    if tuple(value.shape) != out.shape:
                        raise FusionError(
                            f"tensor {out.name!r} has shape {tuple(value.shape)}, the output planned {out.shape}."
                        )
                    writer.write(value.to(SAFETENSORS_TO_TORCH[out.dtype]))
                    bar.update(1)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            for source in self.sources:
                source.close()
        return len(planned)


def _is_float(code: str) -> bool:
    return SAFETENSORS_TO_TORCH[code].is_floating_point
