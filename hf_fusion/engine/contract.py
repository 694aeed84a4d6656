"""The contract between the streaming engine and a tensor-wise fusion method.

The engine hands a method one tensor (or, for element-wise methods, one slice of a tensor) at a time, already
upcast to the compute dtype on the compute device; the method returns the fused values. A method that needs a
model-wide statistic (TIES' global magnitude threshold) computes it in :meth:`TensorMerge.prepare` by asking the
engine for extra read-only passes over the same inputs.

The contract lives with the engine because the engine drives it: methods implement it, the engine never needs
to know a method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import pydantic
import torch

P = TypeVar("P", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class TensorInputs:
    """One tensor (or a row slice of it) from every model, ready for the math.

    ``base`` is ``None`` when the recipe has no base. ``experts`` follow the recipe's model order. For a slice,
    ``flat_offset`` is the index of its first element in the flattened full tensor, so element-keyed randomness
    (DARE) and statistics do not depend on how the engine slices.
    """

    name: str
    base: torch.Tensor | None
    experts: Sequence[torch.Tensor]
    full_shape: tuple[int, ...]
    flat_offset: int = 0
    module_type: str | None = None
    """Class name of the module owning the tensor (``Linear``, ``LayerNorm``...), for methods that ask for it."""
    params: pydantic.BaseModel | None = None
    """This tensor's own parameters when the recipe varies them by tensor (gradients, filters); else None."""

    @property
    def is_whole(self) -> bool:
        return tuple(self.experts[0].shape) == self.full_shape

    @property
    def is_last_slice(self) -> bool:
        return self.flat_offset + self.experts[0].numel() == _numel(self.full_shape)


Visitor = Callable[[TensorInputs], None]
Scan = Callable[[Visitor], None]
"""Runs one read-only pass over every fused tensor, calling the visitor on each tensor or slice."""


class TensorMerge(ABC, Generic[P]):
    """A configured tensor-wise method: ``merge`` is called once per tensor (or slice) by the engine.

    ``elementwise`` methods compute each output element from the same element of the inputs (given the statistics
    from :meth:`prepare`), so the engine may feed them row slices and keep memory flat in tensor size.
    ``row_local`` methods are not element-wise but only look within a row (DELLA ranks each row): the engine may
    then feed them whole rows of matrices, and 1-D tensors whole. ``needs_module_types`` asks the pipeline to look up
    which module type owns each tensor. ``outputs_per_model`` methods (TALL masks, EMR-Merging) fuse one model per
    input model: :meth:`merge` returns the fused tensors stacked, ``(num_models, ...)``.
    """

    elementwise: bool = True
    row_local: bool = False
    outputs_per_model: bool = False
    needs_module_types: bool = False
    """Set by methods that act on a kind of layer only; the pipeline then fills ``TensorInputs.module_type``."""
    fixed_parameters: frozenset[str] = frozenset()
    """Parameters that must take one value for every tensor: they feed a model-wide statistic or decide how the
    engine runs the method (slicing, module types). Every other parameter may vary by tensor."""

    def __init__(self, params: P, *, num_models: int, has_base: bool) -> None:
        self.params = params
        self.num_models = num_models
        self.has_base = has_base

    @classmethod
    def fixed_for(cls, params: P) -> frozenset[str]:
        """:attr:`fixed_parameters`, for methods where which parameters are fixed depends on the others."""
        return cls.fixed_parameters

    def params_for(self, inputs: TensorInputs) -> P:
        """The parameters of the tensor being fused: its own when they vary by tensor, else the method's."""
        return inputs.params if inputs.params is not None else self.params  # type: ignore[return-value]

    def task_vector_weights(self, params: P) -> list[float] | None:
        """``w_t`` such that, under ``params``, the method returns exactly ``theta_0 + sum_t w_t (theta_t - theta_0)``
        for models that share the base ``theta_0``; None when it is not of that form (the default). LoRA pools fused
        into an adapter combine their factors exactly with these weights instead of factorising a dense delta."""
        return None

    def keeps_shared_values(self, params: P) -> bool:
        """Whether, under ``params``, a tensor every model holds unchanged from the base stays the base's value (True
        for methods on task vectors and for averages). An adapter on the base can only carry fusions that do."""
        return True

    def reads_whole_model(self) -> bool:
        """Whether a tensor's result depends on other tensors (a statistic over the model, a revisit pass), so that
        fusing part of a model must still scan all of it. By default: when the method prepares or revisits."""
        return type(self).prepare is not TensorMerge.prepare or type(self).revisit is not TensorMerge.revisit

    def prepare(self, scan: Scan) -> None:
        """Computes model-wide statistics before the merge pass; the default needs none."""

    @abstractmethod
    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        """Returns the fused tensor for ``inputs`` (same shape as each expert, compute dtype); methods with
        ``outputs_per_model`` return one per model, stacked on a new first dimension."""

    def notes(self) -> list[str]:
        """What the method reports about the finished run (one line each), written under the recipe it fused."""
        return []

    def revisit(self) -> set[tuple[str, int]]:
        """Slices, as (tensor name, flat offset), to fuse again once every tensor has been fused.

        For statistics only known at the end of the merge pass (TIES' fallback sign); the engine calls this once,
        re-fuses the listed slices and overwrites their output in place. The default revisits nothing.
        """
        return set()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
