"""Output ensembles of models of one architecture: mean, weighted sum or element-wise maximum of their outputs.

The members are stock models of the base's architecture, so the ensemble takes the same inputs and returns the same
output type as one of them, and plugs in wherever that model would (a task head, a generation loop without cache).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .members import build_member, combine_outputs, plain_config

Aggregation = Literal["mean", "weighted", "max"]


class FusedEnsembleConfig(PretrainedConfig):
    model_type = "hf_fusion_ensemble"

    def __init__(
        self,
        member_config: dict[str, Any] | None = None,
        num_members: int = 1,
        weights: list[float] | None = None,
        aggregation: Aggregation = "mean",
        **kwargs: Any,
    ) -> None:
        self.member_config = plain_config(member_config or {})
        self.num_members = num_members
        self.weights = list(weights) if weights is not None else None
        self.aggregation = aggregation
        super().__init__(**kwargs)


class FusedEnsembleModel(PreTrainedModel):
    """``num_members`` copies of the member architecture whose outputs are combined element-wise."""

    config_class = FusedEnsembleConfig
    base_model_prefix = "ensemble"
    main_input_name = "input_ids"

    def __init__(self, config: FusedEnsembleConfig) -> None:
        super().__init__(config)
        self.members = nn.ModuleList(build_member(config.member_config) for _ in range(config.num_members))
        self.main_input_name = getattr(self.members[0], "main_input_name", "input_ids")
        self.post_init()
        # post_init gathers tied weights from PreTrainedModel children only; the members sit in a ModuleList, so
        # their ties (a GPT-2 LM head on its embeddings) are added here, else a reload would leave the heads random.
        for index, member in enumerate(self.members):
            for target, source in (getattr(member, "all_tied_weights_keys", None) or {}).items():
                self.all_tied_weights_keys[f"members.{index}.{target}"] = f"members.{index}.{source}"

    def _init_weights(self, module: nn.Module) -> None:
        """Members keep their own initialisation; a fused checkpoint always provides every weight."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "use_cache" in inspect.signature(self.members[0].forward).parameters:
            kwargs["use_cache"] = False  # caches of different members cannot be combined
        outputs = [member(*args, **kwargs) for member in self.members]
        weights = None
        if self.config.aggregation == "weighted" and self.config.weights is not None:
            weights = torch.tensor(self.config.weights)
        return combine_outputs(outputs, weights, self.config.aggregation)

    @classmethod
    def from_members(
        cls, members: list[nn.Module], *, weights: list[float] | None = None, aggregation: Aggregation = "mean"
    ) -> FusedEnsembleModel:
        """An ensemble holding ``members`` (loaded stock models) as they are. The members' class is recorded in the
        config (``architectures``), so a reload builds the same heads even for models that were never saved."""
        member_config = {**members[0].config.to_dict(), "architectures": [type(members[0]).__name__]}
        config = FusedEnsembleConfig(
            member_config=member_config, num_members=len(members), weights=weights, aggregation=aggregation
        )
        with torch.device("meta"):
            model = cls(config)
        model.members = nn.ModuleList(members)
        return model
