"""Reading a lazy checkpoint whole in tests, through the same row reader the engine uses."""

from __future__ import annotations

import torch


def read_checkpoint(ckpt, rows_per_read: int) -> dict[str, torch.Tensor]:
    """Every tensor of a lazy checkpoint, read through its row reader ``rows_per_read`` rows at a time (as the
    engine reads slices), so row-range arithmetic is exercised."""
    from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH

    out = {}
    for name, entry in ckpt.entries.items():
        parts = []
        for start in range(0, max(entry.rows, 1), rows_per_read):
            stop = min(entry.rows, start + rows_per_read)
            nbytes = entry.nbytes * (stop - start) // entry.rows if entry.rows else entry.nbytes
            buf = torch.empty(nbytes, dtype=torch.uint8)
            ckpt.read_rows(name, start, stop, buf)
            shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
            parts.append(buf.view(SAFETENSORS_TO_TORCH[entry.dtype]).view(shape).clone())
        out[name] = torch.cat(parts) if entry.shape else parts[0]
    return out
