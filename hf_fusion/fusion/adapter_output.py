"""A pool of LoRA adapters fused into one peft LoRA adapter on their base (``--output-format adapter``).

Two routes, chosen by the method:

- *Exact*: a method that returns ``theta_0 + sum_t w_t (theta_t - theta_0)`` (task arithmetic, averaging, weighted
  averaging; see :meth:`~hf_fusion.engine.contract.TensorMerge.task_vector_weights`) is applied to the factors
  themselves: each module's adapters are concatenated (rank ``sum r_t``) with ``w_t`` times their scale folded into
  ``B``, so the adapter equals the dense merge up to float rounding. With ``rank`` the concatenation is truncated
  through QR of its thin factors (:mod:`hf_fusion.adapters.combine`), never forming the ``[out, in]`` delta.
- *Factorised*: every other tensor-wise method runs on the streaming engine over the adapted weights only, in
  float32 (a 16-bit base is upcast before the update is added, so subtracting it again recovers the update itself),
  into a scratch file; each module's fused delta is then read back, one module at a time, and factorised to
  ``rank`` by truncated SVD (:func:`~hf_fusion.adapters.extract.factorise`), the energy kept reported per module.

Either way, tensors the adapters store whole (``modules_to_save`` other than per-task heads, trained biases) are
fused by the method on the engine and saved whole where they differ from the base; per-task heads (``heads``) are
left out as in a dense output. The adapter's module names are the base's, so ``PeftModel.from_pretrained(base, ...)``
loads it on the base's own class.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hf_fusion.adapters.combine import concatenate, truncate
from hf_fusion.adapters.extract import factorise
from hf_fusion.adapters.extract_folder import (
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    ModuleExtraction,
    TensorSpool,
    architecture_of,
    describe_modules,
    read_tensor,
    task_type_of,
    write_adapter_config,
)
from hf_fusion.engine.checkpoint import Checkpoint, open_checkpoint
from hf_fusion.engine.contract import TensorMerge
from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH
from hf_fusion.engine.lora import LoraCheckpoint, LoraFactorPair
from hf_fusion.engine.plan import FusionPlan, build_plan
from hf_fusion.engine.writer import OutputTensor, ShardedSafetensorsWriter
from hf_fusion.errors import IncompatibleModelsError, ParameterError, RecipeError
from hf_fusion.fusion.inputs import Inputs, fetch_inputs, pin, resolve_inputs
from hf_fusion.fusion.options import FusionOptions
from hf_fusion.fusion.output_folder import seal
from hf_fusion.fusion.result import MergeResult
from hf_fusion.fusion.tensor_wise import check_memory, make_engine
from hf_fusion.fusion.validate import ValidatedRecipe
from hf_fusion.output import AtomicFolder, check_free_space
from hf_fusion.progress import progress_bar
from hf_fusion.recipe import OUTPUT_DTYPES
from hf_fusion.sources import Source, open_source

log = logging.getLogger(__name__)

REPORT_FILENAME = "adapter_fusion.json"
_SCRATCH = ".adapter-fusion"


@dataclass(frozen=True)
class _Pool:
    """The opened pool: the base, the adapters as dense float32 views, and each adapted weight's factors."""

    base: Checkpoint
    experts: list[LoraCheckpoint]
    factors: list[dict[str, LoraFactorPair]]

    @property
    def targets(self) -> list[str]:
        """The adapted weights, by the base's names, in the base's order."""
        return [n for n in self.base.entries if n in self.factors[0]]


def fuse_to_adapter(
    checked: ValidatedRecipe, target: Path, options: FusionOptions, *, repo_id: str | None
) -> MergeResult:
    """Checks the pool from its adapter configs and the base's headers, downloads it, and writes the adapter folder
    (with its card) atomically."""
    recipe = checked.recipe
    method = checked.spec.implementation(checked.params, num_models=len(recipe.models), has_base=checked.uses_base)
    if not method.keeps_shared_values(checked.params):
        raise RecipeError(
            f"{checked.spec.name} with these parameters also changes the tensors no adapter trains (weights that do "
            "not sum to 1 scale the whole base), which no adapter on the base can carry: normalise the weights, or "
            "write the merge dense."
        )
    inputs, headers = resolve_inputs(checked, options)
    configs = check_lora_pool(inputs)
    weights = None if checked.schedule.varies else method.task_vector_weights(checked.params)
    rank = recipe.rank if (recipe.rank is not None or weights is not None) else _largest_rank(configs)
    if rank is not None and headers[0] is not None:
        check_rank_fits(headers[0], configs[0].get("target_modules"), rank)
    check_memory(headers, method.elementwise, options.budget_elements)
    inputs = fetch_inputs(inputs, options)
    recipe = pin(recipe, inputs)
    pool = _open_pool(inputs, options)
    try:
        if rank is not None:
            _check_rank_exactly(pool, rank)
        full = _full_plan(checked, inputs, pool)
        fused_targets = _fused_by_base_name(full, pool, fused_only=True)
        left_out = [n for n in pool.targets if n not in fused_targets]
        for name in left_out:
            log.info("%s matches exclude/heads: left out of the adapter (the base's weight)", name)
        plan = _kept_plan(full, inputs, pool, with_targets=weights is None)
        scratch_bytes = sum(t.output.nbytes for t in plan.tensors) if plan is not None else 0
        check_free_space(target, scratch_bytes + _adapter_bytes(pool, rank))
        atomic = AtomicFolder(target, overwrite=options.overwrite)
        with atomic as temp:
            fused = None
            if plan is not None:
                _fuse_kept(full, plan, method, checked, inputs, temp / _SCRATCH, options)
                fused = open_checkpoint(temp / _SCRATCH, "fused")
            try:
                written = _write_adapter(
                    temp,
                    pool,
                    plan,
                    fused,
                    weights=weights,
                    rank=rank,
                    dtype=OUTPUT_DTYPES[recipe.dtype],
                    show=options.show_progress,
                    device=recipe.device,
                    left_out=set(left_out),
                )
            finally:
                if fused is not None:
                    fused.close()
                shutil.rmtree(temp / _SCRATCH, ignore_errors=True)
            base_folder = inputs.sources[0].folder
            assert base_folder is not None
            architecture = architecture_of(base_folder)
            write_adapter_config(
                temp,
                written.modules,
                written.saved_whole,
                rank=_common_rank(written.modules, rank),
                base=recipe.base.path if recipe.base and not recipe.base.is_local else str(base_folder),
                task_type=task_type_of(architecture),
                bias="lora_only" if written.biases else "none",
                fan_in_fan_out=written.fan_in_fan_out,
            )
            _write_report(
                temp,
                written,
                method=checked.spec.name,
                exact=weights is not None,
                rank=rank,
                architecture=architecture,
            )
            notes = [written.summary(exact=weights is not None)]
            log.info("%s: %s", checked.spec.name, notes[0])
            files = seal(atomic, temp, recipe, target=target, repo_id=repo_id, notes=notes)
    finally:
        pool.base.close()
        for expert in pool.experts:
            expert.close()
    return MergeResult(
        output=target,
        recipe=recipe,
        files=files,
        seconds=0.0,
        fused_tensors=len(written.modules) + len(written.saved_whole),
        copied_tensors=0,
        statistics_passes=0,
        output_bytes=(target / ADAPTER_WEIGHTS).stat().st_size,
    )


def check_lora_pool(inputs: Inputs) -> list[dict[str, Any]]:
    """The experts' adapter configs; refuses, before any download, experts that are not all LoRA adapters, adapters
    naming different bases, and adapters targeting different modules."""
    experts = [inputs.sources[i] for i in inputs.experts]
    configs = [s.adapter_config for s in experts]
    full = [s.label for s, c in zip(experts, configs) if c is None]
    if full and len(full) == len(experts):
        raise RecipeError(
            "--output-format adapter fuses LoRA adapters, and these models are full fine-tunes: fuse them dense "
            "(the default) and turn the result into an adapter with `hf-fusion extract-lora FOLDER --base BASE "
            "--rank R`."
        )
    if full:
        lora = next(s.label for s, c in zip(experts, configs) if c is not None)
        raise RecipeError(
            f"--output-format adapter needs every model to be a LoRA adapter, but {full[0]} is a full model while "
            f"{lora} is an adapter: fuse them dense (the default), or give only adapters."
        )
    checked: list[dict[str, Any]] = [c for c in configs if c is not None]
    for source, config in zip(experts, checked):
        kind = "DoRA" if config.get("use_dora") else config.get("peft_type", "LORA")
        if kind != "LORA":
            raise RecipeError(
                f"{source.label} is a {kind} adapter; adapter outputs fuse plain LoRA adapters (merge it into its "
                "base with peft's merge_and_unload and fuse the dense models)."
            )
    _check_same(
        "base models", [(s.label, _model_name(c.get("base_model_name_or_path"))) for s, c in zip(experts, checked)]
    )
    _check_same("target modules", [(s.label, _targets_key(c.get("target_modules"))) for s, c in zip(experts, checked)])
    return checked


def _check_same(what: str, values: Sequence[tuple[str, Any]]) -> None:
    known = [(label, value) for label, value in values if value]
    for label, value in known[1:]:
        if value != known[0][1]:
            raise IncompatibleModelsError(
                f"the adapters name different {what}: {known[0][0]} has {_shown(known[0][1])} but {label} has "
                f"{_shown(value)}; one adapter output needs adapters trained on one base with the same targets "
                "(fuse them dense instead)."
            )


def _model_name(path: Any) -> str | None:
    """A base as an adapter config names it, compared by its last path part (a local copy and its repo id agree)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1].lower() if path else None


def _shown(value: Any) -> str:
    return json.dumps(sorted(value) if isinstance(value, (frozenset, set)) else value)


def _targets_key(targets: Any) -> Any:
    return frozenset(targets) if isinstance(targets, list) else targets


def _largest_rank(configs: Sequence[Mapping[str, Any]]) -> int:
    """peft's default rank for SVD combinations: the largest among the adapters (per-module patterns included)."""
    ranks = [int(c.get("r", 8)) for c in configs]
    ranks += [int(r) for c in configs for r in (c.get("rank_pattern") or {}).values()]
    return max(ranks)


def _targeted(module: str, targets: Any) -> bool:
    """peft's rule: a list names module-name suffixes, a string is a regex the whole name must match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets or ())


def check_rank_fits(base: Checkpoint, targets: Any, rank: int) -> None:
    """Refuses, from the base's headers, a rank larger than a targeted weight's ``min(out, in)``."""
    for name, entry in base.entries.items():
        module, _, param = name.rpartition(".")
        if param == "weight" and len(entry.shape) == 2 and _targeted(module, targets):
            _check_rank(module, entry.shape, rank)


def _check_rank_exactly(pool: _Pool, rank: int) -> None:
    """The same check on the weights the adapters turned out to adapt (a regex target may name none up front)."""
    for name in pool.targets:
        _check_rank(name.rpartition(".")[0], pool.base.entries[name].shape, rank)


def _check_rank(module: str, shape: tuple[int, ...], rank: int) -> None:
    if rank > min(shape):
        raise ParameterError(
            f"--rank {rank} is larger than module {module!r} allows (weight {list(shape)}, so at most "
            f"{min(shape)}): choose a smaller rank."
        )


def _open_pool(inputs: Inputs, options: FusionOptions) -> _Pool:
    """Opens the base and the adapters; refuses adapters whose adapted weights or layouts differ."""
    sources: list[Source] = inputs.sources
    base = open_source(sources[0], allow_pickle=options.allow_pickle, lora_base=None)
    experts: list[LoraCheckpoint] = []
    try:
        for index in inputs.experts:
            source = sources[index]
            assert source.folder is not None
            experts.append(LoraCheckpoint(source.label, source.folder, base, float32=True))
        factors = [e.factor_pairs() for e in experts]
        for expert, pairs in zip(experts[1:], factors[1:]):
            extra = sorted(set(pairs) ^ set(factors[0]))
            if extra:
                owner = expert.label if extra[0] in pairs else experts[0].label
                raise IncompatibleModelsError(
                    f"the adapters adapt different modules: only {owner} adapts {extra[0]!r} ({len(extra)} such "
                    "weight(s)); one adapter output needs every adapter on the same modules (fuse them dense instead)."
                )
            for name, pair in pairs.items():
                first = factors[0][name]
                if (pair.transposed, pair.embedding) != (first.transposed, first.embedding):
                    raise IncompatibleModelsError(
                        f"{expert.label} and {experts[0].label} store the LoRA factors of {name!r} in different "
                        "layouts (fan_in_fan_out or embedding factors differ)."
                    )
    except BaseException:
        base.close()
        for expert in experts:
            expert.close()
        raise
    return _Pool(base, experts, factors)


def _full_plan(checked: ValidatedRecipe, inputs: Inputs, pool: _Pool) -> FusionPlan:
    """The dense merge's plan over the base and the adapters' float32 views, fused in float32, base names out."""
    return build_plan(
        [pool.base, *pool.experts],
        base=0 if inputs.base_is_input else None,
        experts=inputs.experts,
        uses_base=inputs.base_is_input,
        reference=0,
        exclude=checked.recipe.exclude,
        heads=checked.recipe.heads,
        out_dtype="F32",
    )


def _kept_plan(plan: FusionPlan, inputs: Inputs, pool: _Pool, *, with_targets: bool) -> FusionPlan | None:
    """``plan`` restricted to what the adapters change: tensors they save whole and, for the factorised route, the
    adapted weights. None when nothing of it is left to fuse."""
    first = inputs.experts[0]
    wanted = {name for expert in pool.experts for name in expert.saved_whole}
    targets = set(pool.targets) if with_targets else set()
    kept = [
        t
        for t in plan.tensors
        if t.fuse and (t.reads.get(first) in wanted or pool.experts[0].base_name(t.reads.get(first, "")) in targets)
    ]
    if not kept:
        return None
    names = {t.name for t in kept}
    return replace(plan, tensors=kept, aliases={k: v for k, v in plan.aliases.items() if k in names})


def _fuse_kept(
    full: FusionPlan,
    kept: FusionPlan,
    method: TensorMerge,
    checked: ValidatedRecipe,
    inputs: Inputs,
    folder: Path,
    options: FusionOptions,
) -> None:
    """Runs the method on the engine and writes the kept tensors into ``folder``. A method with a model-wide
    statistic (TIES' threshold, a revisit pass) runs over every tensor of the model, as a dense merge does, so its
    statistic is the same; the tensors outside ``kept`` are computed and dropped. Other methods run on ``kept``."""
    plan = full if method.reads_whole_model() else kept
    engine = make_engine(plan, method, checked, inputs, checked.recipe, options)
    folder.mkdir()
    writer = _KeptTensorsWriter(folder, kept.output_tensors(), plan.output_tensors())
    try:
        engine.run([writer])
        writer.close()
    except BaseException:
        writer.abort()
        raise


class _KeptTensorsWriter(ShardedSafetensorsWriter):
    """A single-file writer of ``kept`` tensors that takes the engine's whole stream (``planned``) and drops the
    tensors it does not keep."""

    def __init__(self, folder: Path, kept: Sequence[OutputTensor], planned: Sequence[OutputTensor]) -> None:
        super().__init__(folder, kept, stem="fused", max_shard_bytes=1 << 62)
        self._kept = {t.name for t in kept}
        self._planned = {t.name: t for t in planned}
        self._dropping = False

    def begin(self, name: str) -> OutputTensor:
        self._dropping = name not in self._kept
        return self._planned[name] if self._dropping else super().begin(name)

    def write(self, data: torch.Tensor) -> None:
        if not self._dropping:
            super().write(data)

    def overwrite(self, name: str, byte_offset: int, data: torch.Tensor) -> None:
        if name in self._kept:
            super().overwrite(name, byte_offset, data)


@dataclass
class _Written:
    modules: list[ModuleExtraction]
    saved_whole: list[str]
    unchanged: list[str]
    biases: bool = False
    fan_in_fan_out: bool = False
    excluded: list[str] = field(default_factory=list)

    def summary(self, *, exact: bool) -> str:
        rank_text, energy = describe_modules(self.modules) if self.modules else ("-", "no module changed")
        how = "exact concatenation" if exact else "factorised fused deltas"
        return (
            f"LoRA adapter of rank {rank_text} ({how}; {energy}); {len(self.saved_whole)} module(s) saved whole, "
            f"{len(self.unchanged)} adapted module(s) left unchanged"
        )


def _write_adapter(
    folder: Path,
    pool: _Pool,
    plan: FusionPlan | None,
    fused: Checkpoint | None,
    *,
    weights: list[float] | None,
    rank: int | None,
    dtype: str | None,
    show: bool,
    device: str = "cpu",
    left_out: set[str] = frozenset(),  # type: ignore[assignment]
) -> _Written:
    """Writes ``adapter_model.safetensors``: one module at a time, factors (exact or factorised) for the adapted
    weights, then the tensors saved whole."""
    out_dtype = SAFETENSORS_TO_TORCH[dtype] if dtype else torch.float32
    by_base = _fused_by_base_name(plan, pool) if plan is not None else {}
    written = _Written([], [], [], excluded=sorted(n.rpartition(".")[0] for n in left_out))
    targets = [n for n in pool.targets if n not in left_out]
    spool = TensorSpool(folder)
    bar = progress_bar(total=len(targets), desc="writing adapter", unit="module", disable=not show)
    try:
        for name in targets:
            bar.update(1)
            module = name.rpartition(".")[0]
            first = pool.factors[0][name]
            if weights is not None:
                parts = [(f[name].a, f[name].b, w * f[name].scale) for f, w in zip(pool.factors, weights)]
                a, b = concatenate(parts)
                energy = 1.0
                limit = rank if rank is not None else min(pool.base.entries[name].shape)  # beyond it: no loss
                if limit < a.shape[0]:
                    factors = truncate(a, b, limit)
                    a, b, energy = factors.a, factors.b, factors.energy
            else:
                assert fused is not None and rank is not None
                delta = read_tensor(fused, by_base[name]).to(device, torch.float32)
                delta -= read_tensor(pool.base, name).to(device, torch.float32)
                if not torch.any(delta):
                    written.unchanged.append(module)
                    continue
                factors = factorise(delta.T if first.transposed else delta, rank)
                a, b, energy = factors.a, factors.b, factors.energy
                del delta
            keys = ("lora_embedding_A", "lora_embedding_B") if first.embedding else ("lora_A.weight", "lora_B.weight")
            spool.add(f"{PEFT_PREFIX}{module}.{keys[0]}", a.to(out_dtype))
            spool.add(f"{PEFT_PREFIX}{module}.{keys[1]}", b.to(out_dtype))
            written.modules.append(ModuleExtraction(module, pool.base.entries[name].shape, a.shape[0], energy))
            written.fan_in_fan_out |= first.transposed and not first.embedding
        _write_whole(spool, pool, fused, by_base, written)
        spool.finish(ADAPTER_WEIGHTS)
    finally:
        bar.close()
        spool.discard()
    return written


def _fused_by_base_name(plan: FusionPlan, pool: _Pool, *, fused_only: bool = False) -> dict[str, str]:
    """Base tensor name -> the planned tensor's name (in the scratch file); ``fused_only`` leaves out tensors the
    plan copies (``exclude``)."""
    first = plan.experts[0]
    mapped: dict[str, str] = {}
    for t in plan.tensors:
        if fused_only and not t.fuse:
            continue
        read = t.reads.get(first, t.name)
        base_name = read if read in pool.base.entries else pool.experts[0].base_name(read)
        mapped[base_name or t.name] = t.name
    return mapped


def _write_whole(
    spool: TensorSpool, pool: _Pool, fused: Checkpoint | None, by_base: Mapping[str, str], written: _Written
) -> None:
    """Fused tensors the adapters saved whole: a target's bias beside its factors (``bias="lora_only"``), every
    other changed module whole (``modules_to_save``, all of its tensors); those equal to the base are skipped."""
    if fused is None:
        return
    targets = {n.rpartition(".")[0] for n in pool.targets}
    changed: dict[str, dict[str, torch.Tensor]] = {}
    for name, fused_name in by_base.items():
        if name in pool.factors[0]:
            continue
        value = read_tensor(fused, fused_name)
        stored = pool.base.entries.get(name)
        if stored is not None:
            original = read_tensor(pool.base, name)
            value = value.to(original.dtype)
            if torch.equal(value, original):
                continue
        module, _, param = name.rpartition(".")
        if module in targets and param == "bias":
            spool.add(f"{PEFT_PREFIX}{module}.base_layer.bias", value)
            written.biases = True
            continue
        changed.setdefault(module, {})[param] = value
    for module, params in changed.items():
        for name in pool.base.entries:
            owner, _, param = name.rpartition(".")
            if owner == module and param not in params:
                params[param] = read_tensor(pool.base, name).clone()
        for param, value in params.items():
            spool.add(f"{PEFT_PREFIX}{module}.{param}", value)
        written.saved_whole.append(module)


def _common_rank(modules: Sequence[ModuleExtraction], rank: int | None) -> int:
    """The config's ``r``: the most common rank among the modules (the others go to ``rank_pattern``)."""
    if not modules:
        return rank or 8
    counts = Counter(m.rank for m in modules)
    return max(counts, key=lambda r: (counts[r], r))


def _adapter_bytes(pool: _Pool, rank: int | None) -> int:
    """Size of the adapter's factors, for the disk check: ``(out + in)`` float32 values per rank of each adapted
    weight (the adapters' summed ranks when the exact concatenation is not truncated)."""
    total = 0
    for name in pool.targets:
        shape = pool.base.entries[name].shape
        r = rank if rank is not None else sum(f[name].rank for f in pool.factors)
        total += 4 * (shape[0] + shape[-1]) * r
    return total


def _write_report(
    folder: Path, written: _Written, *, method: str, exact: bool, rank: int | None, architecture: str | None
) -> None:
    report = {
        "method": method,
        "route": "exact" if exact else "factorised",
        "rank": rank,
        "modules": {m.name: {"shape": list(m.shape), "rank": m.rank, "energy": m.energy} for m in written.modules},
        "modules_to_save": written.saved_whole,
        "unchanged": written.unchanged,
        "excluded": written.excluded,
        "base_architecture": architecture,
    }
    (folder / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
