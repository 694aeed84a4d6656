"""Tensor math shared by several methods: task vectors, averaging, interpolation, sparsification, sign election
and disjoint merge.

Every function here is pure tensor math: no method state, no recipe, no registry. A method file takes what it shares
with other methods from here, never from another method file, so each method can change without moving the others.
Randomness is keyed by (seed, stream, element index), never by call order, so the same recipe drops the same
elements whether the engine reads a tensor whole or in slices, on any device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Literal

import torch

from hf_fusion.engine.contract import TensorInputs

# Task vectors (EMR-Merging, TALL masks, the subspace methods, WUDI) ---------------------------------------------------


def stacked_task_vectors(inputs: TensorInputs) -> torch.Tensor:
    """theta_t - theta_0 of every model, stacked ``(n, ...)`` in a new tensor.

    Stacked because these methods compare the models element by element (masks, votes) or all at once (SVDs); a
    new tensor, so the engine's input buffers are never written.
    """
    assert inputs.base is not None, "this method needs the base model"
    return torch.stack(list(inputs.experts)) - inputs.base


# Averaging and interpolation (simple average, ExPO, Model Stock; linear interpolation, SLERP) -------------------------


def simple_average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """theta = (1/n) sum_t theta_t over ``n`` same-shaped tensors.

    The first addition (or the clone, for one tensor) allocates the result, so the inputs are never written; the
    rest accumulate into it in place, keeping a single output buffer however many models there are.
    """
    total = tensors[0].clone() if len(tensors) == 1 else tensors[0] + tensors[1]
    for t in tensors[2:]:
        total.add_(t)
    return total.div_(len(tensors))


def linear_interpolation(start: torch.Tensor, end: torch.Tensor, t: float) -> torch.Tensor:
    """theta = (1 - t) theta_0 + t theta_1."""
    return torch.add(start * (1.0 - t), end, alpha=t)


# Sparsification (DARE, DELLA, TIES) -----------------------------------------------------------------------------------

RANDOM_CHUNK = 1 << 20
"""Elements per independently seeded block of uniforms; fixes the random stream regardless of slicing."""

Rescale = Literal["inverse", "l1", "none"]


def _chunk_seed(seed: int, stream: str, chunk: int) -> int:
    """A 63-bit generator seed per (seed, stream, chunk), hashed so neighbouring chunks and streams are unrelated."""
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


# Masks as 0/1 floats: on CPUs torch's boolean-mask kernels (masked_fill, where, multiplying by a bool tensor) run
# several times slower than sign, clamp, add and mul. Each formula below gives the same values for finite inputs
# (a signed zero may come out as +0.0).


def at_least(values: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """1.0 where ``values >= threshold``, else 0.0 (a new tensor)."""
    return torch.sub(values, threshold).sign_().add_(1.0).clamp_(max=1.0)


def choose(where: torch.Tensor, if_one: torch.Tensor, if_zero: torch.Tensor) -> torch.Tensor:
    """``if_one`` where the 0/1 mask ``where`` is 1, else ``if_zero``: exact, since x*1 + y*0 == x for finite y.
    Where a candidate is infinite (a sum that overflowed), ``torch.where`` decides instead, so inf stays inf."""
    if math.isfinite(float(if_one.sum())) and math.isfinite(float(if_zero.sum())):
        return torch.addcmul(if_zero * (1.0 - where), if_one, where)
    return torch.where(where > 0, if_one, if_zero)


def drop_ties(values: torch.Tensor, ties: torch.Tensor, keep: int) -> torch.Tensor:
    """Zeroes, in place, the ``ties`` (a boolean mask) of ``values`` after the first ``keep`` of them (flat order)."""
    if keep <= 0:
        return values.mul_(1.0 - ties.to(values.dtype))
    flat = ties.reshape(-1)
    if int(torch.count_nonzero(flat)) <= keep:
        return values
    beyond = torch.cumsum(flat, 0, dtype=torch.int64) > keep
    return values.masked_fill_((flat & beyond).view_as(ties), 0.0)


def sum_over_models(stacked: torch.Tensor) -> torch.Tensor:
    """The sum over models, added row by row in model order, several times faster on CPUs than ``sum(dim=0)``
    (a reduction over the outer dimension of an ``(n, N)`` tensor does not vectorise well). For up to 4 models it
    gives the same bits as torch's reduction; beyond that torch regroups the additions and the last bit may differ.
    Shapes: (n, ...) -> (...)."""
    total = stacked[0].clone()
    for row in stacked[1:]:
        total.add_(row)
    return total


def _count_over_models(trimmed: torch.Tensor, positive: bool, weights: torch.Tensor | None) -> torch.Tensor:
    """Per position, how many models (or how much of their weight) hold a positive (negative) value; a sum of 0
    becomes 1, as it divides."""
    total = torch.zeros(trimmed.shape[1:], dtype=trimmed.dtype, device=trimmed.device)
    for i, row in enumerate(trimmed):
        held = torch.sign(row).clamp_(min=0.0) if positive else torch.sign(row).clamp_(max=0.0).neg_()
        total.add_(held, alpha=1.0 if weights is None else float(weights.reshape(-1)[i]))
    return total.add_(1.0 - torch.sign(total).abs_())


# Sign election and disjoint merge (TIES, DARE-TIES, DELLA) ------------------------------------------------------------

MergeFunc = Literal["sum", "mean", "max"]


def elected_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """gamma_m = sgn(sum_t trimmed_t), the sign with the larger total mass.  Shapes: (n, ...) -> (...).

    Electing by mass, not by count, lets a few large updates outvote many small ones that mostly cancel.
    """
    return torch.sign(sum_over_models(trimmed))


def fill_zero_sign(sign: torch.Tensor, zero_sign: float) -> torch.Tensor:
    """Positions whose elected sum is exactly 0 take ``zero_sign`` (the paper's model-wide majority)."""
    return sign + zero_sign * (1.0 - sign.abs())


def signed_sums(trimmed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of the positive and of the negative values per position, each in model order.  (n, ...) -> 2 x (...).

    Computed once so the caller can both spot exact cancellations and pass them on to :func:`disjoint_merge`.
    """
    positive = trimmed[0].clamp(min=0)
    negative = trimmed[0].clamp(max=0)
    for row in trimmed[1:]:
        positive.add_(row.clamp(min=0))
        negative.add_(row.clamp(max=0))
    return positive, negative


def disjoint_merge(
    trimmed: torch.Tensor,
    sign: torch.Tensor,
    merge_func: MergeFunc,
    sums: tuple[torch.Tensor, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Combine, per position, the values whose sign agrees with the elected one.  Shapes: (n, ...), (...) -> (...).

    ``mean`` divides by the number of agreeing values (the paper's disjoint mean), ``sum`` adds them (FusionBench's
    default), ``max`` keeps the largest magnitude with the elected sign. As in the paper's code, a zero elected sign
    selects the negative values. Summing the positive and negative parts separately in model order gives the same
    bits as masking then summing, with fewer passes over memory; pass ``sums`` if :func:`signed_sums` was computed.
    With ``weights`` (``(n, 1, ..., 1)``, already applied to ``trimmed``), ``mean`` divides by the sum of the agreeing
    models' weights instead of their count (mergekit's normalisation; where that sum is 0 it divides by 1).
    """
    if merge_func == "max":
        top = trimmed.amax(dim=0).clamp_(min=0)
        bottom = trimmed.amin(dim=0).clamp_(max=0)
        return torch.where(sign > 0, top, torch.where(sign < 0, bottom, torch.zeros_like(bottom)))
    positive, negative = sums if sums is not None else signed_sums(trimmed)
    if merge_func == "mean":
        positive = positive / _count_over_models(trimmed, True, weights)
        negative = negative / _count_over_models(trimmed, False, weights)
    elif merge_func != "sum":
        raise ValueError(f"unknown merge_func {merge_func!r}")
    return choose(sign.clamp(min=0.0), positive, negative)
