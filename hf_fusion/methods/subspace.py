"""Subspace merging of task matrices: Task Singular Vectors (TSV-M) and isotropic merging (Iso-C, Iso-CTS).

Each works on one weight matrix at a time, so the engine streams the model matrix by matrix. Tensors that are not
matrices (biases, norms, embeddings of other ranks) are averaged, as in the papers' code. SVDs run in float32 or
float64 (the engine's compute dtype) on the recipe's device, whatever the checkpoints' dtype.

A task matrix of low rank (a LoRA update always is) has singular values that are float rounding noise, and their
singular vectors are arbitrary: flattening the spectrum (Iso) or keeping a fixed number of directions (TSV) would
give that noise real weight, so the result would change with a 1e-8 perturbation of the inputs or another BLAS.
Singular values at or below ``rank_tolerance`` times the matrix's largest count as zero here, and their directions
are dropped; by default the tolerance is ``max(rows, cols) * eps`` of the compute dtype (numpy's ``matrix_rank``
rule). Where every task matrix is well above it (full rank), nothing changes.
"""

from __future__ import annotations

import logging
from typing import Any

import pydantic
import torch

from hf_fusion.engine.contract import TensorInputs, TensorMerge
from hf_fusion.methods.common import FROZEN, is_matrix, scaling_factor_field
from hf_fusion.methods.operations import stacked_task_vectors
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodSpec, Paper, register

log = logging.getLogger(__name__)


def orthonormal_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The closest matrix with orthonormal columns (or rows, if wide): ``U V^T`` of ``matrix = U S V^T``.

    This is the orthogonal Procrustes solution both papers use to decorrelate the concatenated singular vectors.
    """
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def _rank_budget(shape: tuple[int, ...], num_models: int) -> int:
    return min(shape) // num_models


def rank_cutoff(
    largest: torch.Tensor | float, shape: tuple[int, ...], dtype: torch.dtype, tolerance: float | None
) -> float:
    """Singular values at or below this are zero: ``tolerance`` (default ``max(shape) * eps``) times ``largest``."""
    relative = max(shape) * torch.finfo(dtype).eps if tolerance is None else tolerance
    return float(largest) * relative


def _live(values: torch.Tensor, cutoff: float) -> torch.Tensor:
    """1.0 for singular values above ``cutoff``, 0.0 for the rest (a mask the vectors and levels are scaled by)."""
    return (values > cutoff).to(values.dtype)


def tsv_merge(
    task_vectors: torch.Tensor, tolerance: float | None = None, kept: list[int] | None = None
) -> torch.Tensor:
    """TSV-M of one task matrix per model, ``(n, out, in) -> (out, in)`` (Gargiulo et al. 2025, Alg. 1).

    Each task keeps its top ``min(out, in) // n`` singular triplets; the concatenated left and right singular
    vectors are orthogonalised and recombined with the kept singular values. Singular values at or below the rank
    cutoff of their task matrix (see the module docstring; exact zeros always) carry no direction, so their vectors
    are dropped before orthogonalising instead of letting an arbitrary basis steer it. When a matrix has fewer
    singular values than tasks, the budget is zero and the task vectors are averaged. ``kept`` receives the number
    of directions kept.
    """
    n = task_vectors.shape[0]
    rank = _rank_budget(tuple(task_vectors.shape[1:]), n)
    if rank == 0:
        return task_vectors.mean(dim=0)
    rows, cols = task_vectors.shape[1:]
    left = task_vectors.new_empty((rows, n * rank))  # [U_1 | U_2 | ...]
    right = task_vectors.new_empty((n * rank, cols))  # [V_1^T; V_2^T; ...]
    values = task_vectors.new_empty(n * rank)
    for i, tau in enumerate(task_vectors):  # one task at a time: a single full set of singular vectors in memory
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        live = _live(s[:rank], rank_cutoff(s[0], (rows, cols), s.dtype, tolerance)) * (s[:rank] > 0)
        left[:, i * rank : (i + 1) * rank] = u[:, :rank] * live
        right[i * rank : (i + 1) * rank] = vh[:rank] * live[:, None]
        values[i * rank : (i + 1) * rank] = s[:rank] * live
        del u, s, vh
    if kept is not None:
        kept.append(int(torch.count_nonzero(values)))
    return (orthonormal_factor(left) * values) @ orthonormal_factor(right)


def iso_c(task_vectors: torch.Tensor, tolerance: float | None = None, kept: list[int] | None = None) -> torch.Tensor:
    """Iso-C: the sum of task matrices with its spectrum flattened to the mean singular value
    (Marczak et al. 2025), ``(n, out, in) -> (out, in)``. Directions at or below the rank cutoff stay zero, and
    the level is the mean over the kept ones, so a low-rank sum keeps its total instead of spreading it over
    directions that are rounding noise."""
    u, s, vh = torch.linalg.svd(task_vectors.sum(dim=0), full_matrices=False)
    live = _live(s, rank_cutoff(s[0], tuple(task_vectors.shape[1:]), s.dtype, tolerance))
    if kept is not None:
        kept.append(int(live.sum()))
    return (u * (_mean_over(s, live) * live)) @ vh


def _mean_over(values: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """The mean singular value over the kept directions: the isotropic level keeps the spectrum's total (for a full
    rank matrix, the mean of all, as in the paper's code)."""
    return (values * live).sum() / live.sum().clamp(min=1.0)


def iso_cts(
    task_vectors: torch.Tensor,
    common_space_fraction: float,
    tolerance: float | None = None,
    kept: list[int] | None = None,
) -> torch.Tensor:
    """Iso-CTS: a common subspace from the sum plus task-specific directions orthogonal to it, with an isotropic
    spectrum (Marczak et al. 2025, Alg. 1), ``(n, out, in) -> (out, in)``.

    The common part keeps the top ``fraction`` of ``min(out, in)`` directions of the summed task matrices, adjusted
    so that the rest splits evenly between tasks; each task adds the top directions of its matrix with the common
    left subspace projected out. Directions whose singular value is at or below the rank cutoff of the summed
    matrix (common or task-specific) are dropped, and the level is the mean over the kept ones (over all of them
    for full-rank matrices, as in the paper's code).
    """
    n = task_vectors.shape[0]
    k = min(task_vectors.shape[1:])
    common = int(k * common_space_fraction)
    common = k - round((k - common) / n) * n
    per_task = (k - common) // n
    u, s, vh = torch.linalg.svd(task_vectors.sum(dim=0), full_matrices=False)
    cutoff = rank_cutoff(s[0], tuple(task_vectors.shape[1:]), s.dtype, tolerance)
    live_common = _live(s[:common], cutoff)
    u_common, s_common, vh_common = u[:, :common] * live_common, s[:common], vh[:common] * live_common[:, None]
    lefts: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    rights: list[torch.Tensor] = []
    lives: list[torch.Tensor] = []
    for tau in task_vectors if per_task > 0 else ():  # one task at a time, to bound memory
        ut, st, vht = torch.linalg.svd(tau - u_common @ (u_common.T @ tau), full_matrices=False)
        live = _live(st[:per_task], cutoff)
        lefts.append(ut[:, :per_task] * live)
        values.append(st[:per_task].clone())
        rights.append(vht[:per_task] * live[:, None])
        lives.append(live)
        del ut, st, vht
    left = orthonormal_factor(torch.cat([*lefts, u_common], dim=1))
    right = orthonormal_factor(torch.cat([*rights, vh_common], dim=0))
    alive = torch.cat([*lives, live_common])
    if kept is not None:
        kept.append(int(alive.sum()))
    return (left * (_mean_over(torch.cat([*values, s_common]), alive) * alive)) @ right


def rank_tolerance_field() -> Any:
    return pydantic.Field(
        None,
        ge=0.0,
        lt=1.0,
        description="singular values at or below this fraction of a matrix's largest count as zero (default: "
        "max(rows, cols) x the compute dtype's machine epsilon)",
    )


class TsvParams(pydantic.BaseModel):
    model_config = FROZEN
    rank_tolerance: float | None = rank_tolerance_field()
    alpha: float = pydantic.Field(
        1.0,
        ge=-10.0,
        le=10.0,
        validation_alias=pydantic.AliasChoices("alpha", "scaling_factor"),
        description="scale of the merged task vector added to the base",
        json_schema_extra={"ui_range": (0.0, 2.0)},
    )


class IsoCParams(pydantic.BaseModel):
    model_config = FROZEN
    scaling_factor: float = scaling_factor_field(1.0)
    rank_tolerance: float | None = rank_tolerance_field()


class IsoCtsParams(IsoCParams):
    common_space_fraction: float = pydantic.Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="share of each matrix's rank given to the subspace common to all tasks",
        json_schema_extra={"ui_range": (0.0, 1.0)},
    )


class _MatrixMerge(TensorMerge):
    """Base + scale * (a merged task matrix for 2-D tensors, the mean task vector otherwise)."""

    elementwise = False

    def __init__(self, params: Any, *, num_models: int, has_base: bool) -> None:
        super().__init__(params, num_models=num_models, has_base=has_base)
        self._kept: dict[str, tuple[int, int]] = {}

    def scale(self, params: Any) -> float:
        return params.scaling_factor

    def merge_matrix(self, task_vectors: torch.Tensor, params: Any, kept: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def notes(self) -> list[str]:
        """How many singular directions each matrix kept above the rank cutoff, summarised."""
        if not self._kept:
            return []
        counts = sorted(k for k, _ in self._kept.values())
        reduced = sorted(name for name, (k, full) in self._kept.items() if k < full)
        line = (
            f"directions kept above the rank cutoff, per matrix: min {counts[0]}, median "
            f"{counts[len(counts) // 2]}, max {counts[-1]} over {len(counts)} matrices"
        )
        if reduced:
            line += f"; {len(reduced)} kept fewer than their full rank (first: {reduced[0]})"
        return [line]

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None
        params = self.params_for(inputs)
        tvs = stacked_task_vectors(inputs)
        if is_matrix(inputs):
            kept: list[int] = []
            merged = self.merge_matrix(tvs, params, kept)
            if kept:
                self._kept[inputs.name] = (kept[0], min(inputs.full_shape))
                log.debug("%s: %d of %d directions kept", inputs.name, kept[0], min(inputs.full_shape))
        else:
            merged = tvs.mean(dim=0)
        return torch.add(inputs.base, merged, alpha=self.scale(params))


class TsvMerging(_MatrixMerge):
    def scale(self, params: Any) -> float:
        return params.alpha

    def merge_matrix(self, task_vectors: torch.Tensor, params: Any, kept: list[int]) -> torch.Tensor:
        return tsv_merge(task_vectors, params.rank_tolerance, kept)


class IsoC(_MatrixMerge):
    def merge_matrix(self, task_vectors: torch.Tensor, params: Any, kept: list[int]) -> torch.Tensor:
        return iso_c(task_vectors, params.rank_tolerance, kept)


class IsoCts(_MatrixMerge):
    def merge_matrix(self, task_vectors: torch.Tensor, params: Any, kept: list[int]) -> torch.Tensor:
        return iso_cts(task_vectors, params.common_space_fraction, params.rank_tolerance, kept)


ISO_PAPER = Paper(
    "No task left behind: isotropic model merging with common and task-specific subspaces (Marczak et al., 2025)",
    "https://arxiv.org/abs/2502.04959",
)

register(
    MethodSpec(
        name="tsv_merging",
        summary="Task Singular Vectors: keep each task matrix's top singular directions, decorrelate them, recombine.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=TsvMerging,
        params_model=TsvParams,
        aliases=("tsv_m", "tsvm", "task_singular_vectors", "task_singular_vector_merging"),
        paper=Paper(
            "Task Singular Vectors: reducing task interference in model merging (Gargiulo et al., 2025)",
            "https://arxiv.org/abs/2412.00081",
        ),
    )
)
register(
    MethodSpec(
        name="iso_c",
        summary="Isotropic merging: the summed task matrix with all its singular values set to their mean.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=IsoC,
        params_model=IsoCParams,
        aliases=("iso_c_merge", "isotropic_merging"),
        paper=ISO_PAPER,
    )
)
register(
    MethodSpec(
        name="iso_cts",
        summary="Isotropic merging with a common subspace plus task-specific directions, flat spectrum.",
        family=Family.MERGE,
        data=DataNeed.NONE,
        base=BaseUse.REQUIRED,
        implementation=IsoCts,
        params_model=IsoCtsParams,
        aliases=("iso_cts_merge",),
        paper=ISO_PAPER,
    )
)
