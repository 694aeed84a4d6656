"""The pipeline's path for model-wise methods: the same checks and downloads as the streaming path, then the
models as modules, the method, and ``save_pretrained`` into an atomic output folder with config, tokenizer, recipe
and card."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hf_fusion.cards import write_card
from hf_fusion.engine.dtypes import OUTPUT_DTYPES, TORCH_NAMES
from hf_fusion.errors import RecipeError
from hf_fusion.model_files import copy_side_files, same_architecture
from hf_fusion.modelwise.base import ModelFusion, ModelwiseContext
from hf_fusion.output import AtomicFolder, check_free_space
from hf_fusion.sources import Source, check_download_space, fetch, resolve
from hf_fusion.tasks.weights import ModelUnderTest, quiet_transformers

log = logging.getLogger(__name__)


def fuse_modules(checked: Any, method: ModelFusion[Any], target: Path, push: Any, *, token: str | None,
                 overwrite: bool, allow_pickle: bool, show_progress: bool, max_shard_bytes: int) -> Any:
    from hf_fusion.pipeline import MergeResult, _pin, _resolve_and_check, _write_recipe

    if allow_pickle:
        raise RecipeError("model-wise methods load models with transformers from safetensors only; convert "
                          "pickled checkpoints first.")
    inputs, headers = _resolve_and_check(checked, allow_pickle=False, token=token)
    check_download_space(inputs.sources)
    sources = [fetch(s, token=token, show_progress=show_progress) for s in inputs.sources]
    inputs = replace(inputs, sources=sources)
    recipe = _pin(checked.recipe, inputs)
    has_base = inputs.has_base
    if not has_base and checked.recipe.base is not None:
        # not fused, but it names the shared architecture and holds the tokenizer the tasks read
        base = resolve(checked.recipe.base, token=token, allow_pickle=False)
        sources = [fetch(base, token=token, show_progress=show_progress), *sources]
        has_base = True
    context = build_context(checked, sources, has_base, show_progress=show_progress)
    input_bytes = sum(e.nbytes for h in headers if h is not None for e in h.entries.values())
    check_free_space(target, input_bytes)
    model = method.fuse(context)
    code = OUTPUT_DTYPES[recipe.dtype]
    if code is not None:
        model = model.to(getattr(torch, TORCH_NAMES[code]))
    atomic = AtomicFolder(target, overwrite=overwrite)
    folders = [s.folder for s in sources if s.folder is not None]
    with atomic as temp:
        reference = context.reference_folder
        assert reference is not None
        copy_side_files(reference, [f for f in folders if f != reference], temp)
        with quiet_transformers():
            model.save_pretrained(temp, max_shard_size=max_shard_bytes)
        for name, text in method.extra_files.items():
            (temp / name).write_text(text)
        _write_recipe(recipe, temp)
        repo_id = push.repo_id if push else None
        write_card(temp, repo_id=repo_id, load_path=repo_id or str(target))
        files = sorted(os.listdir(temp))
        output_bytes = sum((temp / f).stat().st_size for f in files if (temp / f).is_file())
        atomic.commit()
    return MergeResult(output=target, recipe=recipe, files=files, seconds=0.0, fused_tensors=len(model.state_dict()),
                       copied_tensors=0, statistics_passes=0, output_bytes=output_bytes)


def build_context(checked: Any, sources: list[Source], has_base: bool, *, show_progress: bool) -> ModelwiseContext:
    """The models as loadable modules, the architecture they share, and each model's task when there is a pool."""
    recipe = checked.recipe
    base_source = sources[0] if has_base else None
    expert_sources = sources[1:] if has_base else sources
    base_folder = base_source.folder if base_source is not None else None
    experts = [ModelUnderTest(s.label, s.folder, base_folder if s.adapter_config is not None else None)  # type: ignore[arg-type]
               for s in expert_sources]
    base = ModelUnderTest("base", base_folder) if base_folder is not None else None
    first = expert_sources[0]
    use_base_config = base_source is not None and base_source.config is not None and (
        bool(recipe.heads) or same_architecture(base_source.config, first.config) or first.adapter_config is not None
        or first.config is None)
    member_config = base_source.config if use_base_config else first.config  # type: ignore[union-attr]
    if member_config is None:
        raise RecipeError(f"{first.label} has no config.json, so its architecture is unknown.")
    if recipe.heads and not use_base_config:  # task models with per-task heads: fuse their shared backbone
        member_config = {k: v for k, v in member_config.items() if k != "architectures"}
    tasks = _tasks(recipe) if recipe.pool else None  # validate_recipe refused data methods without a pool
    return ModelwiseContext(experts=experts, member_config=member_config, base=base, heads=tuple(recipe.heads),
                            tasks=tasks, device=recipe.device, show_progress=show_progress,
                            reference_folder=base_folder if use_base_config else first.folder)


def _tasks(recipe: Any) -> list[Any]:
    """Each model's task in its pool (matched by model path); an error when some model is not a pool expert."""
    from hf_fusion.catalog import get_pool

    pool = get_pool(recipe.pool)
    by_path = {path: task for task, path in pool.expert_paths().items()}
    names = [by_path.get(ref.path) for ref in recipe.models]
    if any(n is None for n in names):
        missing = [str(ref) for ref, n in zip(recipe.models, names) if n is None]
        raise RecipeError(f"{missing[0]} is not an expert of pool {pool.name}, so its task data is unknown.")
    return [pool.task(n) for n in names]  # type: ignore[arg-type]
