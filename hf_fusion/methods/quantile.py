"""Exact magnitude quantiles over data that arrives in slices: TIES' model-wide top-k without holding the model.

TIES keeps, per task vector, every element whose magnitude is at least the k-th smallest magnitude of the whole
flattened vector (``k = D - int(D * keep)``, as ``torch.kthvalue`` in the paper's code). Sorting a model-sized
vector needs memory proportional to the model; this selects the same value in two streaming passes with two
fixed-size histograms. A non-negative float32's bit pattern, read as an integer, grows with its value, so pass 1
bins magnitudes by the top 16 bits of that pattern (32,768 bins for non-negative values, one shift per element) and
finds the bin holding the k-th value; pass 2 histograms the low 16 bits of the elements inside that bin (65,536
values), which pins the k-th value exactly.

Magnitudes often tie at the threshold (bf16 fine-tunes differ from their base by a few ulps, so their task vectors
hold a handful of distinct magnitudes). The paper's ``kthvalue`` keeps every tie; an exact count keeps only as many
as the count allows, the first ones in the order the engine visits them (flat index order within a tensor), and
:meth:`MagnitudeQuantile.ties_kept` says how many that is.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

_COARSE_BINS = 1 << 15
_FINE_BINS = 1 << 16


@dataclass
class _Group:
    count: int = 0
    coarse: torch.Tensor | None = None
    bin: int = -1
    rank: int = 0
    fine: torch.Tensor | None = None
    threshold: float | None = None
    ties_kept: int | None = None
    """How many magnitudes equal to the threshold are kept; None keeps them all."""


def _coarse_bins(mags: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each magnitude's float32 pattern (its value truncated to bfloat16), as int32."""
    return torch.bitwise_right_shift(_bits(mags), 16)


def _bits(mags: torch.Tensor) -> torch.Tensor:
    """Float32 bit patterns as int32 (float64 inputs are rounded to float32 first: thresholds are float32)."""
    return (mags if mags.dtype == torch.float32 else mags.float()).view(torch.int32)


def keep_count_rank(total: int, keep_fraction: float, exact: bool = False) -> int:
    """The 1-based rank (ascending) of the threshold element; 0 keeps all.

    By default as ``kthvalue`` in the TIES code, which keeps one value more than the fraction; ``exact`` keeps
    ``floor(fraction * total)`` values (at least one), as mergekit's top-k does.
    """
    if exact:
        return total - max(1, int(total * keep_fraction)) + 1 if keep_fraction < 1.0 else 0
    return total - int(total * keep_fraction)


class MagnitudeQuantile:
    """The exact threshold magnitude of each group (a task vector, or one tensor of it) for a keep fraction."""

    def __init__(self, keep_fraction: float, *, exact: bool = False) -> None:
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction}")
        self.keep_fraction = keep_fraction
        self.exact = exact
        self._groups: dict[Hashable, _Group] = {}

    # pass 1 -------------------------------------------------------------------------------------------------
    def count(self, key: Hashable, mags: torch.Tensor) -> None:
        """Adds non-negative float32 magnitudes to the coarse histogram of ``key``."""
        group = self._groups.setdefault(key, _Group())
        hist = torch.bincount(_coarse_bins(mags).reshape(-1), minlength=_COARSE_BINS).cpu()
        group.coarse = hist if group.coarse is None else group.coarse.add_(hist)
        group.count += mags.numel()

    def end_count(self, key: Hashable, keep_fraction: float | None = None) -> None:
        """Locates the bin holding the threshold for ``key`` and frees its coarse histogram; ``keep_fraction``
        overrides the quantile's own for this group (a fraction that varies by tensor)."""
        group = self._groups[key]
        fraction = self.keep_fraction if keep_fraction is None else keep_fraction
        k = keep_count_rank(group.count, fraction, self.exact)
        if k <= 0 or group.coarse is None:
            group.bin, group.threshold = -1, 0.0
        else:
            cumulative = torch.cumsum(group.coarse, 0)
            group.bin = int(torch.searchsorted(cumulative, torch.tensor(k, dtype=cumulative.dtype)).item())
            group.rank = k - (int(cumulative[group.bin - 1]) if group.bin > 0 else 0)
        group.coarse = None

    # pass 2 -------------------------------------------------------------------------------------------------
    def refine(self, key: Hashable, mags: torch.Tensor) -> None:
        """Adds the exact bit patterns of the elements in the threshold's bin to the fine histogram of ``key``."""
        group = self._groups[key]
        if group.threshold is not None:
            return
        bits = _bits(mags).reshape(-1)
        inside = bits[torch.bitwise_right_shift(bits, 16) == group.bin]
        if inside.numel() == 0:
            return
        hist = torch.bincount(torch.bitwise_and(inside, 0xFFFF), minlength=_FINE_BINS).cpu()
        group.fine = hist if group.fine is None else group.fine.add_(hist)

    def end_refine(self, key: Hashable) -> float:
        """Returns the exact threshold of ``key``: elements with magnitude >= it are kept."""
        group = self._groups[key]
        if group.threshold is None:
            if group.fine is None:
                raise RuntimeError(f"no values reached the threshold bin of {key!r}: the passes saw different data")
            cumulative = torch.cumsum(group.fine, 0)
            offset = int(torch.searchsorted(cumulative, torch.tensor(group.rank, dtype=cumulative.dtype)).item())
            bits = torch.tensor([(group.bin << 16) + offset], dtype=torch.int64).to(torch.int32)
            group.threshold = float(bits.view(torch.float32).item())
            if self.exact:  # the threshold's rank among its ties: those below it are dropped, the rest kept
                below_in_bin = int(cumulative[offset - 1]) if offset > 0 else 0
                group.ties_kept = int(group.fine[offset]) - (group.rank - below_in_bin) + 1
            group.fine = None
        return group.threshold

    def ties_kept(self, key: Hashable) -> int | None:
        """How many magnitudes equal to the threshold of ``key`` are kept (the first ones visited); None: all."""
        return self._groups[key].ties_kept

    def threshold(self, key: Hashable) -> float:
        value = self._groups[key].threshold
        if value is None:
            raise RuntimeError(f"threshold of {key!r} is not known yet")
        return value
