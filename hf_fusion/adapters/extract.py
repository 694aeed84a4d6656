"""One weight difference as a LoRA pair: truncated SVD, rank chosen by the energy it keeps.

For ``delta = U diag(S) Vh`` (``[out, in]``, singular values in decreasing order), the best rank-``r`` approximation in
the Frobenius norm (Eckart-Young) is ``B @ A`` with ``B = U[:, :r] sqrt(S[:r])`` (``[out, r]``, peft's ``lora_B``) and
``A = sqrt(S[:r]) Vh[:r]`` (``[r, in]``, peft's ``lora_A``); splitting ``sqrt(S)`` between the two keeps both factors
on the same scale. The *energy kept* is ``sum(S[:r]^2) / sum(S^2)``, so ``||delta - B A||_F^2 / ||delta||_F^2`` is
``1 - energy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankFactors:
    """``b @ a`` approximates the delta: ``a`` is ``[rank, in]``, ``b`` is ``[out, rank]`` (float32)."""

    a: torch.Tensor
    b: torch.Tensor
    energy: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def choose_rank(singular_values: torch.Tensor, max_rank: int, threshold: float | None = None) -> int:
    """The rank to keep: ``max_rank``, or with ``threshold`` the smallest rank whose share of the squared singular
    values reaches it, capped at ``max_rank``. Singular values in decreasing order; at least 1."""
    if max_rank < 1:
        raise ValueError(f"rank must be at least 1, got {max_rank}")
    rank = min(max_rank, singular_values.numel())
    if threshold is None:
        return max(rank, 1)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the energy threshold must be in (0, 1], got {threshold}")
    squares = singular_values.double().square()
    total = squares.sum()
    if total == 0:
        return 1
    shares = squares.cumsum(0) / total
    reached = int(torch.searchsorted(shares, torch.tensor([threshold], dtype=shares.dtype)).item()) + 1
    return max(1, min(rank, reached))


RANDOMIZED_OVERSAMPLING = 8
"""At least this many extra columns; the range finder samples twice the rank when that is more."""
RANDOMIZED_ITERATIONS = 4
RANDOMIZED_DECAY = 0.5
"""The randomised factorisation is kept when the last singular value it estimates is at most this share of the r-th:
its error in the kept directions then shrinks like that ratio to the power ``2 * iterations + 1`` (Halko et al.,
2011, section 10). A flatter spectrum (a delta that is not low rank) falls back to the exact SVD."""


def factorise(
    delta: torch.Tensor, max_rank: int, threshold: float | None = None, *, randomized: bool | None = None
) -> LowRankFactors:
    """Factorises a 2-D ``delta`` (``[out, in]``) as ``b @ a`` of rank ``choose_rank(S, max_rank, threshold)``.

    The SVD runs in float32 on ``delta``'s device; the energy kept is computed in float64. A zero delta gives
    rank-1 zero factors and energy 1. ``randomized`` (by default: for a fixed rank at most a quarter of the
    smaller side, less the oversampling) uses Halko et al.'s randomised range finder (``torch.svd_lowrank``,
    ``max(8, rank)`` extra columns, 4 power iterations): ``b @ a`` is then the best rank-``r`` approximation of ``delta`` projected
    on the range found, and ``energy`` stays exact for the factors returned, because the residual is orthogonal to
    them (``||delta - b a||^2 = ||delta||^2 - sum(S[:r]^2)``). Chosen by default, it falls back to the exact SVD
    when the spectrum beyond the rank is too flat for it to be as accurate (:data:`RANDOMIZED_DECAY`).
    """
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D delta, got shape {list(delta.shape)}")
    if max_rank > min(delta.shape):
        raise ValueError(f"rank {max_rank} exceeds min(out, in) = {min(delta.shape)} of a {list(delta.shape)} delta")
    values = delta.float()
    chosen = randomized is None
    if threshold is not None:  # a rank by energy needs the whole spectrum
        randomized = False
    elif randomized is None:
        randomized = 4 * (max_rank + RANDOMIZED_OVERSAMPLING) <= min(delta.shape)
    if randomized:
        q = min(max_rank + max(RANDOMIZED_OVERSAMPLING, max_rank), min(delta.shape))
        u, s, v = torch.svd_lowrank(values, q=q, niter=RANDOMIZED_ITERATIONS)
        vh = v.T
        total = float(values.double().square().sum())
        if chosen and float(s[-1]) > RANDOMIZED_DECAY * float(s[max_rank - 1]):
            randomized = False  # flat beyond the rank: the exact SVD keeps measurably more
    if not randomized:
        u, s, vh = torch.linalg.svd(values, full_matrices=False)
        total = float(s.double().square().sum())
    rank = choose_rank(s, max_rank, threshold)
    squares = s.double().square()
    energy = float(squares[:rank].sum()) / total if total > 0 else 1.0
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    return LowRankFactors(a=a.contiguous(), b=b.contiguous(), energy=min(energy, 1.0))
