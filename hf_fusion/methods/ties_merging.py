"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al. 2023).

Trimming keeps the top ``threshold`` percent of each task vector by magnitude. The paper's code (and FusionBench)
ranks over the whole flattened model (``threshold_scope="model"``, the default here); mergekit and peft rank within
each tensor (``threshold_scope="tensor"``). Either way the engine never holds the model: the threshold comes from
two streaming passes (:mod:`hf_fusion.methods.quantile`). Where the elected sign sum is exactly zero, the paper's
code falls back to the sign of the sum of all elected signs (over the model, or the tensor for tensor scope); that
too is computed in the passes, with a third pass only when the first two cannot decide it.
"""

from __future__ import annotations

from typing import Hashable, Literal

import pydantic
import torch

from hf_fusion.methods.base import Scan, TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, scaling_factor_field
from hf_fusion.methods.quantile import MagnitudeQuantile
from hf_fusion.methods.sparsify import magnitude_trim
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register

MergeFunc = Literal["sum", "mean", "max"]


class TiesParams(pydantic.BaseModel):
    model_config = FROZEN
    scaling_factor: float = scaling_factor_field(0.3)
    threshold: float = pydantic.Field(
        20.0,
        gt=0.0,
        le=100.0,
        description="percent of each task vector kept, by magnitude (20 keeps the top 20%)",
        json_schema_extra={"ui_range": (1.0, 100.0)},
    )
    merge_func: MergeFunc = pydantic.Field("sum", description="how the sign-agreeing values are combined")
    threshold_scope: Literal["model", "tensor"] = pydantic.Field(
        "model",
        description="rank magnitudes over the whole model (paper, FusionBench) or within each tensor (mergekit)",
    )


def elect_sign(trimmed: torch.Tensor, zero_sign: float) -> torch.Tensor:
    """gamma_m = sgn(sum_t trimmed_t); positions whose sum is exactly 0 take ``zero_sign``.  Shapes: (n, ...) -> (...)."""
    sign = torch.sign(trimmed.sum(dim=0))
    return torch.where(sign == 0, torch.tensor(zero_sign, dtype=sign.dtype, device=sign.device), sign)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, merge_func: MergeFunc) -> torch.Tensor:
    """Combine, per position, the values whose sign agrees with the elected one.  Shapes: (n, ...), (...) -> (...).

    ``mean`` divides by the number of agreeing non-zero values (the paper's disjoint mean), ``sum`` adds them
    (FusionBench's default), ``max`` keeps the largest magnitude with the elected sign.
    """
    agrees = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agrees
    if merge_func == "sum":
        return selected.sum(dim=0)
    if merge_func == "mean":
        count = (selected != 0).sum(dim=0).clamp_(min=1)
        return selected.sum(dim=0) / count
    if merge_func == "max":
        return selected.abs().amax(dim=0) * sign
    raise ValueError(f"unknown merge_func {merge_func!r}")


def ties_merge(
    task_vectors: torch.Tensor, thresholds: torch.Tensor, merge_func: MergeFunc, zero_sign: float
) -> torch.Tensor:
    """The merged task vector of TIES: trim each row at its threshold, elect signs, disjoint merge."""
    trimmed = magnitude_trim(task_vectors, thresholds)
    return disjoint_merge(trimmed, elect_sign(trimmed, zero_sign), merge_func)


_MAX_ENUMERATED_MODELS = 12


def _vote_sign(votes: int) -> float:
    return float((votes > 0) - (votes < 0))


class _SignTally:
    """What pass 2 knows about the fallback sign before the exact thresholds are known.

    Elements above the threshold's bin are surely kept, those inside it are undecided. ``votes`` sums the elected
    signs of positions without undecided elements; ``undecided`` counts the others. The fallback sign only matters
    where the elected sum is exactly zero with non-zero values: ``zero_sums`` counts such decided positions and
    ``maybe_zero_sums`` the undecided positions that could end up so (both possible sums are computed in the same
    order as the merge pass, so rounding cannot hide one).
    """

    def __init__(self) -> None:
        self.votes = self.undecided = self.zero_sums = self.maybe_zero_sums = 0

    def add(self, tvs: torch.Tensor, kept: torch.Tensor, unsure: torch.Tensor) -> None:
        zero = torch.zeros((), dtype=tvs.dtype, device=tvs.device)
        low = torch.where(kept, tvs, zero).sum(dim=0)
        high = torch.where(kept | unsure, tvs, zero).sum(dim=0)
        nonzero_low = (kept & (tvs != 0)).any(dim=0)
        nonzero_high = ((kept | unsure) & (tvs != 0)).any(dim=0)
        count = unsure.sum(dim=0)
        decided = count == 0
        self.votes += int(torch.sign(low)[decided].sum())
        self.undecided += int((~decided).sum())
        self.zero_sums += int(((low == 0) & nonzero_low & decided).sum())
        single = count == 1
        maybe = single & (((low == 0) & nonzero_low) | ((high == 0) & nonzero_high))
        self.maybe_zero_sums += int(maybe.sum()) + self._multi_undecided_zero_sums(tvs, kept, unsure, count >= 2)

    @staticmethod
    def _multi_undecided_zero_sums(
        tvs: torch.Tensor, kept: torch.Tensor, unsure: torch.Tensor, multi: torch.Tensor
    ) -> int:
        """Positions with several undecided values: try every keep/drop combination (they are rare)."""
        if not bool(multi.any()):
            return 0
        n = tvs.shape[0]
        flat = multi.reshape(-1).nonzero().squeeze(1)
        t, k, u = (x.reshape(n, -1)[:, flat] for x in (tvs, kept, unsure))
        if n > _MAX_ENUMERATED_MODELS:
            return int(flat.numel())
        zero = torch.zeros((), dtype=t.dtype, device=t.device)
        possible = torch.zeros(t.shape[1], dtype=torch.bool, device=t.device)
        bits = torch.arange(n, device=t.device).view(n, 1)
        for subset in range(1 << n):
            mask = k | (u & ((subset >> bits) & 1).bool())
            possible |= (torch.where(mask, t, zero).sum(dim=0) == 0) & (mask & (t != 0)).any(dim=0)
        return int(possible.sum())


class TiesMerging(TensorMerge[TiesParams]):
    """Runs the statistics passes in :meth:`prepare`, then merges any slice independently."""

    def __init__(self, params: TiesParams, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self._quantile = MagnitudeQuantile(params.threshold / 100.0)
        self._zero_sign: dict[Hashable, float] = {}
        self._thresholds: dict[tuple[Hashable, int], torch.Tensor] = {}

    def task_vectors(self, inputs: TensorInputs) -> torch.Tensor:
        """Stacked task vectors ``(n, ...)`` of one tensor (slice); DARE-TIES drops elements here first."""
        assert inputs.base is not None
        return torch.stack([e - inputs.base for e in inputs.experts])

    def _key(self, name: str, model: int) -> Hashable:
        return model if self.params.threshold_scope == "model" else (name, model)

    def _sign_key(self, name: str) -> Hashable:
        return None if self.params.threshold_scope == "model" else name

    def prepare(self, scan: Scan) -> None:
        q, per_tensor = self._quantile, self.params.threshold_scope == "tensor"

        def count(inputs: TensorInputs) -> None:
            mags = self.task_vectors(inputs).abs_()
            for i in range(len(mags)):
                q.count(self._key(inputs.name, i), mags[i])
                if per_tensor and inputs.is_last_slice:
                    q.end_count(self._key(inputs.name, i))

        scan(count)
        if not per_tensor:
            for i in range(self.num_models):
                q.end_count(i)

        tally: dict[Hashable, _SignTally] = {}

        def refine(inputs: TensorInputs) -> None:
            tvs = self.task_vectors(inputs)
            mags = tvs.abs()
            kept, unsure = [], []
            for i in range(len(tvs)):
                key = self._key(inputs.name, i)
                sure, maybe = q.classify(key, mags[i])
                q.refine(key, mags[i])
                kept.append(sure)
                unsure.append(maybe)
                if per_tensor and inputs.is_last_slice:
                    q.end_refine(key)
            tally.setdefault(self._sign_key(inputs.name), _SignTally()).add(tvs, torch.stack(kept), torch.stack(unsure))

        scan(refine)
        if not per_tensor:
            for i in range(self.num_models):
                q.end_refine(i)

        open_keys = set()
        for key, t in tally.items():
            if t.zero_sums == 0 and t.maybe_zero_sums == 0:
                self._zero_sign[key] = 0.0  # no position needs the fallback sign
            elif abs(t.votes) > t.undecided:
                self._zero_sign[key] = _vote_sign(t.votes)
            else:
                open_keys.add(key)
        if open_keys:
            exact: dict[Hashable, int] = {k: 0 for k in open_keys}

            def vote(inputs: TensorInputs) -> None:
                skey = self._sign_key(inputs.name)
                if skey in exact:
                    trimmed = magnitude_trim(self.task_vectors(inputs), self._threshold_tensor(inputs))
                    exact[skey] += int(torch.sign(trimmed.sum(dim=0)).sum())

            scan(vote)
            for key, total in exact.items():
                self._zero_sign[key] = _vote_sign(total)

    def _threshold_tensor(self, inputs: TensorInputs) -> torch.Tensor:
        """Per-model thresholds shaped ``(n, 1, ..., 1)`` to broadcast against the stacked task vectors."""
        key = (self._sign_key(inputs.name), len(inputs.full_shape))
        cached = self._thresholds.get(key)
        if cached is None:
            values = [self._quantile.threshold(self._key(inputs.name, i)) for i in range(len(inputs.experts))]
            shape = (len(values),) + (1,) * len(inputs.full_shape)
            cached = torch.tensor(values, dtype=torch.float32).view(shape).to(inputs.experts[0].device)
            self._thresholds[key] = cached
        return cached

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        merged = ties_merge(
            self.task_vectors(inputs),
            self._threshold_tensor(inputs),
            self.params.merge_func,
            self._zero_sign[self._sign_key(inputs.name)],
        )
        return torch.add(inputs.base, merged, alpha=self.params.scaling_factor)


SPEC = register(
    MethodSpec(
        name="ties_merging",
        summary="Trim each task vector to its largest values, elect a sign per weight, merge the agreeing values.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=TiesMerging,
        params_model=TiesParams,
        aliases=("ties", "ties_merge"),
        paper=Paper(
            "TIES-Merging: resolving interference when merging models (Yadav et al., 2023)",
            "https://arxiv.org/abs/2306.01708",
        ),
    )
)
