"""The TIES passes over task vectors that a subclass supplies: trim, elect sign, disjoint merge (Yadav et al. 2023).

TIES-Merging feeds them the plain task vectors and DARE-TIES the dropped ones, so the passes live here, in neither
method file.

Trimming keeps the top ``threshold`` percent of each task vector by magnitude. The paper's code (and FusionBench)
ranks over the whole flattened model (``threshold_scope="model"``, the default here); mergekit and peft rank within
each tensor (``threshold_scope="tensor"``). Either way the engine never holds the model: the threshold comes from
two streaming passes (:mod:`hf_fusion.methods.quantile`). Where the elected sign sum is exactly zero with non-zero
values, the paper's code falls back to the sign of the sum of all elected signs (over the model, or the tensor for
tensor scope), which is only known once everything is merged: the merge pass assumes +1, counts the votes, and the
engine re-fuses just the slices that held such positions when the vote says otherwise. mergekit takes + there
(``zero_sign: positive``), which needs no vote.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable
from typing import Any, Literal

import pydantic
import torch

from hf_fusion.engine.contract import Scan, TensorInputs, TensorMerge
from hf_fusion.methods.common import (
    FROZEN,
    check_per_model,
    model_weights_field,
    per_model,
    per_model_field,
    scaling_factor_field,
)
from hf_fusion.methods.operations import (
    MergeFunc,
    at_least,
    disjoint_merge,
    drop_ties,
    elected_sign,
    fill_zero_sign,
    signed_sums,
)
from hf_fusion.methods.quantile import MagnitudeQuantile


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
    thresholds: list[float] | None = per_model_field("threshold (percent kept)")
    keep_count: Literal["paper", "exact"] = pydantic.Field(
        "paper",
        description="paper: keep one value more than the percentage, as the TIES code's kthvalue does; exact: keep "
        "floor(percentage x count) values, at least one, ties at the cut-off first in flat order (mergekit)",
    )
    weights: list[float] | None = model_weights_field()
    merge_func: MergeFunc = pydantic.Field("sum", description="how the sign-agreeing values are combined")
    zero_sign: Literal["vote", "positive"] = pydantic.Field(
        "vote",
        description="sign where the elected sum is exactly zero: the majority of all elected signs (paper, "
        "FusionBench) or + (mergekit)",
    )
    threshold_scope: Literal["model", "tensor"] = pydantic.Field(
        "model",
        description="rank magnitudes over the whole model (paper, FusionBench) or within each tensor (mergekit)",
    )


def check_ties_pool(params: Any, num_models: int, has_base: bool) -> None:
    check_per_model("TIES", params, ("thresholds", "weights", "sparsity_ratios"), num_models)


_PROVISIONAL_SIGN = 1.0


def _vote_sign(votes: int) -> float:
    return float((votes > 0) - (votes < 0))


class TiesCore(TensorMerge[TiesParams]):
    """Runs the statistics passes in :meth:`prepare`, then merges any slice independently.

    Subclasses say what the task vectors are (:meth:`task_vectors`); everything after that is TIES.
    """

    def __init__(self, params: TiesParams, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self._quantile = MagnitudeQuantile(params.threshold / 100.0, exact=params.keep_count == "exact")
        self._zero_sign: dict[Hashable, float] = {}
        self._votes: dict[Hashable, int] = {}
        self._voted: set[tuple[str, int]] = set()
        self._needs_fallback: dict[Hashable, set[tuple[str, int]]] = {}
        self._thresholds: dict[tuple[Hashable, int], torch.Tensor] = {}
        self._ties_seen: dict[Hashable, int] = {}
        self._ties_before: dict[tuple[str, int, int], int] = {}

    @abstractmethod
    def task_vectors(self, inputs: TensorInputs) -> torch.Tensor:
        """Stacked task vectors ``(n, ...)`` of one tensor (slice), a new tensor: trimming writes into it."""

    fixed_parameters = frozenset({"threshold_scope", "keep_count", "zero_sign"})

    @classmethod
    def fixed_for(cls, params: TiesParams) -> frozenset[str]:
        """A model-wide threshold ranks every tensor together: its keep fraction is one number then."""
        return cls.fixed_parameters | ({"threshold", "thresholds"} if params.threshold_scope == "model" else set())

    def _keep_fractions(self, params: TiesParams) -> list[float]:
        return [t / 100.0 for t in per_model(params.thresholds, params.threshold, self.num_models)]

    def _keeps_all(self, params: TiesParams) -> bool:
        """Whether every model keeps all of its task vector (a threshold of 100%): nothing to rank or trim."""
        return all(f >= 1.0 for f in self._keep_fractions(params))

    def _key(self, name: str, model: int) -> Hashable:
        return model if self.params.threshold_scope == "model" else (name, model)

    def _sign_key(self, name: str) -> Hashable:
        return None if self.params.threshold_scope == "model" else name

    def reads_whole_model(self) -> bool:
        """Within each tensor, thresholds and fallback signs are the tensor's own; over the model, they are not."""
        return self.params.threshold_scope == "model"

    def prepare(self, scan: Scan) -> None:
        """Two read-only passes give each group's exact magnitude threshold."""
        q, per_tensor = self._quantile, self.params.threshold_scope == "tensor"
        if not per_tensor and self._keeps_all(self.params):
            return  # the thresholds are the model's own and keep everything: no pass is needed

        def count(inputs: TensorInputs) -> None:
            if per_tensor and self._keeps_all(self.params_for(inputs)):
                return
            mags = self.task_vectors(inputs).abs_()
            for i in range(len(mags)):
                q.count(self._key(inputs.name, i), mags[i])
                if per_tensor and inputs.is_last_slice:
                    q.end_count(self._key(inputs.name, i), self._keep_fractions(self.params_for(inputs))[i])

        def refine(inputs: TensorInputs) -> None:
            if per_tensor and self._keeps_all(self.params_for(inputs)):
                return
            mags = self.task_vectors(inputs).abs_()
            for i in range(len(mags)):
                q.refine(self._key(inputs.name, i), mags[i])
                if per_tensor and inputs.is_last_slice:
                    q.end_refine(self._key(inputs.name, i))

        scan(count)
        if not per_tensor:
            for i, fraction in enumerate(self._keep_fractions(self.params)):
                q.end_count(i, fraction)
        scan(refine)
        if not per_tensor:
            for i in range(self.num_models):
                q.end_refine(i)

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

    def _trim_(self, vectors: torch.Tensor, inputs: TensorInputs) -> torch.Tensor:
        """Zeroes what the thresholds drop; with an exact count, also the ties at a threshold beyond the count.

        Thresholds are float32 (:mod:`hf_fusion.methods.quantile` ranks float32 magnitudes), so float64 task vectors
        are compared through their float32 magnitudes too: the statistics passes and the trim see the same values."""
        if self._keeps_all(self.params_for(inputs)):
            return vectors
        magnitudes = vectors.abs()
        if magnitudes.dtype != torch.float32:
            magnitudes = magnitudes.float()
        trimmed = vectors.mul_(at_least(magnitudes, self._threshold_tensor(inputs)))
        if not self._quantile.exact:
            return trimmed
        for i in range(len(trimmed)):
            key = self._key(inputs.name, i)
            limit = self._quantile.ties_kept(key)
            if limit is None:
                continue
            ties = magnitudes[i] == self._quantile.threshold(key)
            slice_id = (inputs.name, inputs.flat_offset, i)
            before = self._ties_before.get(slice_id)
            if before is None:  # first visit in engine order; tied copies and revisits reuse it
                before = self._ties_before[slice_id] = self._ties_seen.get(key, 0)
                self._ties_seen[key] = before + int(torch.count_nonzero(ties))
            drop_ties(trimmed[i], ties, keep=limit - before)
        return trimmed

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        params = self.params_for(inputs)
        trimmed = self._trim_(self.task_vectors(inputs), inputs)
        weights = None
        if params.weights is not None:
            shape = (len(params.weights),) + (1,) * (trimmed.dim() - 1)
            weights = torch.tensor(params.weights, dtype=trimmed.dtype, device=trimmed.device).view(shape)
            trimmed.mul_(weights)
        elected = elected_sign(trimmed)
        sums = signed_sums(trimmed)
        sign_key = self._sign_key(inputs.name)
        slice_id = (inputs.name, inputs.flat_offset)
        if self.params.zero_sign == "positive":
            sign = fill_zero_sign(elected, 1.0)
            return torch.add(
                inputs.base,
                disjoint_merge(trimmed, sign, params.merge_func, sums, weights),
                alpha=params.scaling_factor,
            )
        if slice_id not in self._voted:  # tied copies and revisits must not vote twice
            self._voted.add(slice_id)
            self._votes[sign_key] = self._votes.get(sign_key, 0) + int(elected.sum())
            if bool(((elected == 0) & ((sums[0] > 0) | (sums[1] < 0))).any()):  # exact cancellation of values
                self._needs_fallback.setdefault(sign_key, set()).add(slice_id)
        sign = fill_zero_sign(elected, self._zero_sign.get(sign_key, _PROVISIONAL_SIGN))
        merged = disjoint_merge(trimmed, sign, params.merge_func, sums, weights)
        return torch.add(inputs.base, merged, alpha=params.scaling_factor)

    def revisit(self) -> set[tuple[str, int]]:
        """Settles the fallback sign from the exact votes; returns the slices merged with the wrong provisional one."""
        stale: set[tuple[str, int]] = set()
        for sign_key, votes in self._votes.items():
            final = _vote_sign(votes)
            self._zero_sign[sign_key] = final
            if final != _PROVISIONAL_SIGN:
                stale |= self._needs_fallback.get(sign_key, set())
        return stale
