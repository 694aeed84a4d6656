"""The contract of a model-wise method and the context it runs in: the pool's models as loadable modules, and,
for methods that need data, each expert's task with its inputs and its head.

Experts are loaded one at a time where the algorithm allows (:meth:`ModelwiseContext.load_expert`), so memory stays
at a few models whatever the pool size.

Under several processes each process holds the models and runs the method; methods that read data take this
process's share of it (:attr:`ModelwiseContext.runtime`) and add up what every process computed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pydantic
import torch
from torch import nn

from hf_fusion.catalog import TaskSpec
from hf_fusion.errors import FusionError, RecipeError
from hf_fusion.modelwise.streamed import StreamedModel
from hf_fusion.runtime import LOCAL, Runtime
from hf_fusion.tasks.weights import ModelUnderTest, build_model, read_state, without_heads

P = TypeVar("P", bound=pydantic.BaseModel)

PROBED_KINDS = ("classification", "clip_zero_shot", "text_to_text", "causal_lm")
"""Task kinds whose evaluators can give logits for a backbone, as data-driven methods need."""


@dataclass
class ModelwiseContext:
    """The models of one fusion as modules of one architecture (``member_config``), and their tasks."""

    experts: list[ModelUnderTest]
    member_config: dict[str, Any]
    base: ModelUnderTest | None = None
    heads: tuple[str, ...] = ()
    tasks: list[TaskSpec] | None = None
    device: str = "cpu"
    show_progress: bool = True
    reference_folder: Path | None = None
    """Where config, tokenizer and processor files of the output come from."""
    runtime: Runtime = LOCAL
    """The processes that run the method together, each on its share of the data."""
    mixed_precision: str = "no"
    """Autocast dtype of test-time adaptation's forward passes (``no``, ``fp16``, ``bf16``)."""

    @property
    def num_models(self) -> int:
        return len(self.experts)

    def _load(self, model: ModelUnderTest) -> nn.Module:
        from hf_fusion.models.members import member_class

        state = without_heads(read_state(model.checkpoint()), self.heads)
        module = build_model(member_class(self.member_config), self.member_config, state, model.label, "cpu")
        return module.float().eval()

    def load_base(self) -> nn.Module:
        if self.base is None:
            raise RecipeError("this method needs the base (pretrained) model: pass --base.")
        return self._load(self.base)

    def load_expert(self, index: int) -> nn.Module:
        return self._load(self.experts[index])

    def upscaled_model(
        self, routed: list[dict[str, Any]], routers: dict[str, dict[str, Any]] | None = None
    ) -> nn.Module:
        """An (unfilled) ``FusedUpscaledModel`` of this fusion's architecture with the ``routed`` modules in place;
        the hf-fusion architectures (and transformers) load here, not when the method registry does."""
        from hf_fusion.models.upscaled import FusedUpscaledConfig, FusedUpscaledModel

        return FusedUpscaledModel(
            FusedUpscaledConfig(backbone_config=self.member_config, routed_modules=routed, routers=routers)
        )

    def iter_experts(self) -> Iterator[tuple[int, nn.Module]]:
        """Each expert in turn, loaded when asked for and released after."""
        for i in range(self.num_models):
            yield i, self.load_expert(i)

    def evaluator(self, index: int, *, calibration: bool, limit: int | None, batch_size: int) -> Any:
        """Expert ``index``'s task evaluator over its calibration split, or its evaluation split (test-time
        adaptation), cut to ``limit`` examples; the main process loads (downloads) the task's data first."""
        from hf_fusion.tasks.base import EvalSettings, TaskContext
        from hf_fusion.tasks.evaluate import EVALUATORS

        if self.tasks is None:
            raise RecipeError("this method needs data: pass --pool so each model's task (and its data) is known.")
        spec = self.tasks[index]
        if spec.kind not in PROBED_KINDS:
            raise FusionError(
                f"task {spec.name}: data-driven methods support {', '.join(PROBED_KINDS)} tasks, not {spec.kind}."
            )
        if calibration:
            spec = spec.model_copy(update={"split": spec.calibration_split})
        base_folder = self.base.folder if self.base is not None else self.experts[index].folder
        settings = EvalSettings(batch_size=batch_size, device=self.device, limit=limit)
        task = TaskContext(base_folder, self.experts[index], self.heads)
        return self.runtime.main_first(lambda: EVALUATORS[spec.kind](spec, task, settings))


class ModelFusion(ABC, Generic[P]):
    """A configured model-wise method: :meth:`fuse` returns the fused model (a ``PreTrainedModel``), which the
    pipeline saves with ``save_pretrained``, beside :attr:`extra_files`, or a :class:`StreamedModel`, which the
    pipeline writes tensor by tensor."""

    extra_files: dict[str, str] = {}
    """Files written next to the saved model (name -> text), set by :meth:`fuse` when the output needs them."""

    def __init__(self, params: P, *, num_models: int, has_base: bool) -> None:
        self.params = params
        self.num_models = num_models
        self.has_base = has_base

    def check_configs(
        self, experts: list[tuple[str, dict[str, Any] | None]], base: tuple[str, dict[str, Any] | None] | None
    ) -> None:
        """Refuses inputs the method cannot fuse from their (label, config) alone, before any weight is fetched."""

    @abstractmethod
    def fuse(self, context: ModelwiseContext) -> nn.Module | StreamedModel:
        """The fused model, on the CPU, in float32; or a stock model the pipeline writes tensor by tensor."""


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_names(module: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` submodules (transformers' GPT-2 ``Conv1D`` counts too, as a transposed linear)."""
    return [name for name, m in module.named_modules() if is_linear(m)]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear layer (``Conv1D`` stores it transposed)."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the longest ``ModuleList`` of modules of one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise FusionError(f"{type(model).__name__} has no list of transformer blocks to work on.")
    return best
