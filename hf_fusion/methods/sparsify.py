"""Sparsification primitives shared by DARE and TIES: random drop with rescaling, magnitude trimming.

Pure functions over tensors. Randomness is keyed by (seed, stream, element index), never by call order, so the
same recipe drops the same elements whether the engine reads a tensor whole or in slices, on any device.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch

RANDOM_CHUNK = 1 << 20
"""Elements per independently seeded block of uniforms; fixes the random stream regardless of slicing."""

Rescale = Literal["inverse", "l1", "none"]


def _chunk_seed(seed: int, stream: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x1f{stream}\x1f{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_uniform(seed: int, stream: str, flat_offset: int, numel: int) -> torch.Tensor:
    """Uniform [0, 1) float32 draws for elements ``flat_offset .. flat_offset + numel`` of a stream.

    Element ``j`` is draw ``j % RANDOM_CHUNK`` of ``torch.rand`` from a CPU generator seeded with
    blake2b(seed, stream, j // RANDOM_CHUNK); the result is therefore independent of slicing and device.
    """
    out = torch.empty(numel, dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    stop = flat_offset + numel
    for chunk in range(flat_offset // RANDOM_CHUNK, (stop - 1) // RANDOM_CHUNK + 1 if numel else 0):
        gen.manual_seed(_chunk_seed(seed, stream, chunk))
        lo = max(flat_offset, chunk * RANDOM_CHUNK)
        hi = min(stop, (chunk + 1) * RANDOM_CHUNK)
        draws = torch.rand(hi - chunk * RANDOM_CHUNK, generator=gen)  # a prefix of the chunk's stream
        out[lo - flat_offset : hi - flat_offset] = draws[lo - chunk * RANDOM_CHUNK :]
    return out


def random_drop(
    delta: torch.Tensor,
    sparsity_ratio: float,
    *,
    seed: int,
    stream: str,
    flat_offset: int = 0,
    rescale: Rescale = "inverse",
) -> torch.Tensor:
    """DARE's drop-and-rescale (Yu et al. 2023, eq. 2) of one task vector (slice).

    Each element is kept when its keyed uniform draw is at least ``sparsity_ratio``. ``rescale="inverse"`` divides
    the kept elements by ``1 - sparsity_ratio`` (the paper and FusionBench); ``"l1"`` rescales so the L1 norm matches
    the undropped tensor (mergekit's default; needs the whole tensor); ``"none"`` keeps the raw values.
    """
    if sparsity_ratio <= 0.0:
        return delta
    draws = keyed_uniform(seed, stream, flat_offset, delta.numel()).to(delta.device).view(delta.shape)
    dropped = torch.where(draws >= sparsity_ratio, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if rescale == "inverse":
        return dropped / (1.0 - sparsity_ratio)
    if rescale == "l1":
        before, after = delta.abs().sum(), dropped.abs().sum()
        return dropped * (before / after) if after > 0 else dropped
    return dropped


def magnitude_trim_(delta: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """TIES' trim step, in place: zero the elements whose magnitude is below ``threshold`` (ties are kept).

    ``delta`` is ``(num_models, ...)``; ``threshold`` is a scalar or broadcasts against it (one value per model).
    """
    return delta.mul_(delta.abs() >= threshold)
