"""RegMean (Jin et al., 2023) and RegMean++ (Nguyen et al., 2025): each linear layer becomes the least-squares
merge of the experts' layers on their own inputs, ``W^T = (sum_i G_i)^-1 sum_i G_i W_i^T`` with ``G_i = X_i^T X_i``
(off-diagonal entries scaled by ``reduce_non_diagonal_ratio``); other parameters are averaged. RegMean++ takes the
inputs of each block from the partly merged model instead of from each expert.

Under several processes each process runs its share of every expert's calibration batches; the Gram sums and their
row counts are added over the processes (:meth:`InputGrams.grams`), so the merged model is one process's up to float
rounding."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pydantic
import torch
from torch import nn

from hf_fusion.errors import FusionError
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext, is_linear, layer_stack, linear_weight
from hf_fusion.modelwise.data import CalibrationParams, calibration_batches, token_mask
from hf_fusion.progress import progress_bar
from hf_fusion.registry import BaseUse, DataNeed, Family, MethodKind, MethodSpec, Paper, register
from hf_fusion.runtime import LOCAL, Runtime

DEFAULT_RATIOS = {"gpt2": 0.6}
"""FusionBench's per-pool ratios: 0.6 for GPT-2, 0.95 for CLIP (and everything else here)."""


class RegMeanParams(CalibrationParams):
    reduce_non_diagonal_ratio: float | None = pydantic.Field(
        None, ge=0, le=1, description="scale of the Grams' off-diagonal entries (default 0.95; 0.6 for GPT-2)"
    )


def ratio_for(params: RegMeanParams, config: dict[str, Any]) -> float:
    if params.reduce_non_diagonal_ratio is not None:
        return params.reduce_non_diagonal_ratio
    return DEFAULT_RATIOS.get(str(config.get("model_type")), 0.95)


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """``gram`` with its off-diagonal entries multiplied by ``ratio``."""
    reduced = gram * ratio
    reduced.diagonal().copy_(gram.diagonal())
    return reduced


RIDGE = 1e-8
"""Relative ridge added to singular Gram matrices (see :meth:`GramStore.solve`)."""


class GramStore:
    """Running ``sum_i G_i`` and ``sum_i G_i W_i^T`` per linear layer, so memory does not grow with the models."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.grams: dict[str, torch.Tensor] = {}
        self.products: dict[str, torch.Tensor] = {}

    def add(self, name: str, gram: torch.Tensor, weight: torch.Tensor) -> None:
        g = reduce_non_diagonal(gram.double(), self.ratio)
        gw = g @ weight.detach().double().T.cpu()
        if name in self.grams:
            self.grams[name] += g
            self.products[name] += gw
        else:
            self.grams[name], self.products[name] = g, gw

    def solve(self, name: str, mean_weight: torch.Tensor) -> torch.Tensor:
        """The merged (out, in) weight. Where the summed Gram is singular (an input unit no calibration example
        activates, such as a dead ReLU unit), a tiny ridge pulls the solution towards ``mean_weight``, the models'
        mean (out, in) weight: unchanged elsewhere, and the weights of such inputs, which the data leaves free,
        become the models' mean."""
        gram, product = self.grams[name], self.products[name]
        try:
            return torch.linalg.solve(gram, product).T.float()
        except torch.linalg.LinAlgError:
            eps = RIDGE * float(gram.diagonal().abs().mean().clamp_min(1e-12))
            ridge = torch.eye(gram.shape[0], dtype=gram.dtype) * eps
            return torch.linalg.solve(gram + ridge, product + eps * mean_weight.detach().double().T.cpu()).T.float()


def load_solved(module: nn.Module, store: GramStore, key: str, mean_weight: torch.Tensor) -> None:
    """Copies the RegMean weight of linear ``key`` into ``module``; ``mean_weight`` (in the module's own layout) is
    the fallback for inputs no example activates."""
    conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)
    merged = store.solve(key, mean_weight.T if conv1d else mean_weight)
    module.weight.copy_(merged.T if conv1d else merged)


class InputGrams:
    """Forward hooks that accumulate ``X^T X / rows`` of each linear's input, padding tokens left out."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.mask: torch.Tensor | None = None

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach()
            if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask]
            x = x.reshape(-1, x.shape[-1]).double()
            gram = x.T @ x
            self.sums[name] = self.sums[name] + gram if name in self.sums else gram
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]

        return hook

    @contextmanager
    def attached(self) -> Iterator[InputGrams]:
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def grams(self, runtime: Runtime = LOCAL) -> dict[str, torch.Tensor]:
        """Each linear's ``X^T X / rows`` over the inputs of every process of ``runtime`` (its sums and rows added
        over the processes, in float64); linears no process saw an input of are left out."""
        if not runtime.distributed:
            return {name: (s / self.rows[name]).cpu() for name, s in self.sums.items()}
        grams = {}
        for name, module in self.modules.items():  # the same names in the same order on every process
            weight = linear_weight(module)
            width = weight.shape[1]
            local = self.sums.get(name)
            total = local if local is not None else torch.zeros(width, width, dtype=torch.float64, device=weight.device)
            rows = torch.tensor([self.rows.get(name, 0)], dtype=torch.float64, device=total.device)
            runtime.sum_(total)
            runtime.sum_(rows)
            if rows.item() > 0:
                grams[name] = (total / rows.item()).cpu()
        return grams


def merge_with_grams(target: nn.Module, states: list[dict[str, torch.Tensor]], store: GramStore) -> None:
    """Loads into ``target`` the RegMean weight of every linear with Grams, and the mean of everything else."""
    with torch.no_grad():
        for name, param in target.named_parameters():
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            mean = torch.stack([s[name].float() for s in states]).mean(dim=0)
            if name.endswith("weight") and module_name in store.grams:
                load_solved(target.get_submodule(module_name), store, module_name, mean)
            else:
                param.copy_(mean)


class RegMean(ModelFusion[RegMeanParams]):
    def fuse(self, context: ModelwiseContext) -> nn.Module:
        p = self.params
        store = GramStore(ratio_for(p, context.member_config))
        sums: dict[str, torch.Tensor] = {}
        model: nn.Module | None = None
        with (
            progress_bar(
                total=context.num_models, desc="RegMean statistics", unit="model", disable=not context.show_progress
            ) as bar,
            torch.no_grad(),
        ):
            for i, model in context.iter_experts():
                evaluator = context.evaluator(i, calibration=True, limit=p.calibration_samples, batch_size=p.batch_size)
                network = evaluator.task_network(model)
                hooks = InputGrams({n: m for n, m in model.named_modules() if is_linear(m)})
                with hooks.attached():
                    for inputs in calibration_batches(evaluator, context.runtime):
                        hooks.mask = token_mask(inputs)
                        evaluator.logits(network, inputs)
                for name, gram in hooks.grams(context.runtime).items():
                    store.add(name, gram, linear_weight(model.get_submodule(name)))
                for name, param in model.named_parameters():
                    sums[name] = sums[name] + param.detach().cpu() if name in sums else param.detach().cpu().clone()
                bar.update(1)
        assert model is not None
        model = model.cpu()
        merge_with_grams(model, [{k: v / self.num_models for k, v in sums.items()}], store)
        return model


class _StopForward(Exception):
    pass


class RegMeanPlusPlus(ModelFusion[RegMeanParams]):
    """Block by block: the inputs of block ``l`` come from the merged blocks ``< l``; each expert's block ``l`` sees
    them, its linears' Grams are collected, the block is merged, and the merged block computes the next inputs.
    Parameters outside the blocks are averaged; linears outside the blocks (a pooler) use Grams of the merged model.
    All experts are held in memory (every block needs every expert)."""

    def fuse(self, context: ModelwiseContext) -> nn.Module:
        if context.member_config.get("is_encoder_decoder"):
            raise FusionError(
                "RegMean++ feeds one stack of blocks its merged inputs; encoder-decoder models (T5) have "
                "two, with state passed between blocks: use regmean."
            )
        p = self.params
        ratio = ratio_for(p, context.member_config)
        experts = [m for _, m in context.iter_experts()]
        # loaded again rather than deep-copied: on minilm-text3 a copy raised the peak by 100 MB (a load can keep
        # weights as views of the memory-mapped checkpoint)
        merged = context.load_expert(0)
        stack_name, merged_stack = layer_stack(merged)
        stacks = [layer_stack(m)[1] for m in experts]
        outside = [{k: v for k, v in m.state_dict().items() if not k.startswith(stack_name + ".")} for m in experts]
        with torch.no_grad():
            for name, tensor in merged.state_dict().items():
                if not name.startswith(stack_name + ".") and tensor.is_floating_point():
                    tensor.copy_(torch.stack([o[name].float() for o in outside]).mean(dim=0))
        evaluators = [
            context.evaluator(i, calibration=True, limit=p.calibration_samples, batch_size=p.batch_size)
            for i in range(context.num_models)
        ]
        networks = [ev.task_network(merged) for ev in evaluators]
        with torch.no_grad():
            block_inputs = [
                self._first_inputs(ev, net, merged_stack[0], context.runtime) for ev, net in zip(evaluators, networks)
            ]
            with progress_bar(
                total=len(merged_stack), desc="RegMean++ blocks", unit="block", disable=not context.show_progress
            ) as bar:
                for layer in range(len(merged_stack)):
                    store = GramStore(ratio)
                    for i, stack in enumerate(stacks):
                        block = stack[layer].to(context.device)
                        hooks = InputGrams({n: m for n, m in block.named_modules() if is_linear(m)})
                        with hooks.attached():
                            for args, kwargs, mask in block_inputs[i]:
                                hooks.mask = mask
                                block(*args, **kwargs)
                        for name, gram in hooks.grams(context.runtime).items():
                            store.add(name, gram, linear_weight(block.get_submodule(name)))
                        stack[layer].cpu()
                    merge_with_grams(merged_stack[layer], [s[layer].state_dict() for s in stacks], store)
                    merged_stack[layer].to(context.device)
                    block_inputs = [
                        [(*_next_inputs(merged_stack[layer](*a, **k), a, k), m) for a, k, m in batches]
                        for batches in block_inputs
                    ]
                    bar.update(1)
            self._merge_outside_linears(merged, stack_name, experts, evaluators, networks, ratio, context.runtime)
        return merged.cpu()

    @staticmethod
    def _first_inputs(
        evaluator: Any, network: nn.Module, first_block: nn.Module, runtime: Runtime
    ) -> list[tuple[Any, Any, Any]]:
        """The (args, kwargs) the first block receives for each of this process's calibration batches, through the
        merged embeddings."""
        captured: list[tuple[Any, Any, Any]] = []
        mask: list[torch.Tensor | None] = [None]

        def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # a key/value cache would grow with every replay of these inputs; the blocks run without one
            args = tuple(None if _is_cache(a) else a for a in args)
            kwargs = {k: v for k, v in kwargs.items() if not _is_cache(v)}
            captured.append((args, kwargs, mask[0]))
            raise _StopForward

        handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for inputs in calibration_batches(evaluator, runtime):
                mask[0] = token_mask(inputs)
                try:
                    evaluator.logits(network, inputs)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return captured

    @staticmethod
    def _merge_outside_linears(
        merged: nn.Module,
        stack_name: str,
        experts: list[nn.Module],
        evaluators: list[Any],
        networks: list[nn.Module],
        ratio: float,
        runtime: Runtime,
    ) -> None:
        names = [n for n, m in merged.named_modules() if is_linear(m) and not n.startswith(stack_name + ".")]
        if not names:
            return
        store = GramStore(ratio)
        hooks_per_model = []
        for evaluator, network in zip(evaluators, networks):
            hooks = InputGrams({n: merged.get_submodule(n) for n in names})
            with hooks.attached():
                for inputs in calibration_batches(evaluator, runtime):
                    hooks.mask = token_mask(inputs)
                    evaluator.logits(network, inputs)
            hooks_per_model.append(hooks.grams(runtime))
        for grams, expert in zip(hooks_per_model, experts):
            for name, gram in grams.items():
                store.add(name, gram, linear_weight(expert.get_submodule(name)))
        for name in store.grams:
            mean = torch.stack([expert.get_submodule(name).weight.float() for expert in experts]).mean(dim=0)
            load_solved(merged.get_submodule(name), store, name, mean)


def _is_cache(value: Any) -> bool:
    """A transformers key/value cache (``DynamicCache`` and friends), passed to blocks as a keyword."""
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


def _next_inputs(output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The next block's (args, kwargs): this block's, with its hidden states replaced by this block's output, where
    they were passed (first positional argument, or the ``hidden_states`` keyword)."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise FusionError(
        "RegMean++ cannot find the hidden states among a block's inputs: they are neither its first "
        f"positional argument nor a 'hidden_states' keyword (keywords: {sorted(kwargs)})."
    )


REGMEAN_PAPER = Paper(
    "Dataless knowledge fusion by merging weights of language models (Jin et al., 2023)",
    "https://arxiv.org/abs/2212.09849",
)

register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="regmean",
        summary="Least-squares merge of each linear layer on the experts' own layer inputs.",
        family=Family.MERGE,
        data=DataNeed.UNLABELLED,
        base=BaseUse.UNUSED,
        implementation=RegMean,
        params_model=RegMeanParams,
        aliases=("clip_regmean", "gpt2_regmean"),
        paper=REGMEAN_PAPER,
    )
)
register(
    MethodSpec(
        kind=MethodKind.MODEL_WISE,
        name="regmean_plusplus",
        summary="RegMean with each block's inputs taken from the merged blocks before it.",
        family=Family.MERGE,
        data=DataNeed.UNLABELLED,
        base=BaseUse.UNUSED,
        implementation=RegMeanPlusPlus,
        params_model=RegMeanParams,
        aliases=("regmean++", "clip_regmean_plusplus"),
        paper=Paper(
            "RegMean++: enhancing effectiveness and generalization of regression mean for model merging "
            "(Nguyen et al., 2025)",
            "https://arxiv.org/abs/2508.03121",
        ),
    )
)
