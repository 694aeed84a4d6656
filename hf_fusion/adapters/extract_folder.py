"""``extract-lora``: a model folder minus its base, written as a peft LoRA adapter folder, one module at a time.

Which tensor goes where:

- The 2-D ``weight`` of a linear layer (``Linear``, GPT-2's ``Conv1D``; ``Embedding`` too with ``embeddings``) is
  factorised: ``delta = model - base`` in float32, truncated SVD (:func:`~hf_fusion.adapters.extract.factorise`),
  written as ``lora_A``/``lora_B`` (``lora_embedding_A``/``_B`` for embeddings). A zero delta is skipped.
- The ``bias`` of a factorised layer that changed is written under ``<module>.base_layer.bias`` with
  ``bias="lora_only"``, which peft loads into the base layer.
- Any other module with a changed tensor (norms, classification heads, embeddings without ``embeddings``, a linear
  layer whose weight is equal but whose bias changed) is saved whole: named in ``modules_to_save`` with all of its
  tensors from the model, as peft saves such modules. Heads that peft always saves whole for the task type
  (``classifier``/``score``, ``qa_outputs``) are never factorised.

Every factorised module gets ``lora_alpha`` equal to its rank (``alpha_pattern`` beside ``rank_pattern``), so peft's
scale ``lora_alpha / r`` is 1 and ``base + B @ A`` is the extraction exactly. Memory holds one module's tensors
(model and base) at a time; the factors are spooled to a scratch file until the adapter file is written.

Not handled: a changed embedding tied to the output head (GPT-2's ``wte``/``lm_head``) gets LoRA or is saved whole
on the embedding only, so peft's head keeps the base weights; other tensors of a factorised module (beyond weight
and bias) are left as in the base, with a warning and a line in ``extraction.json``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_fusion.adapters.extract import factorise
from hf_fusion.architecture import parameter_module_types
from hf_fusion.cards import adapter_usage
from hf_fusion.engine.checkpoint import Checkpoint, open_checkpoint
from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, is_floating
from hf_fusion.engine.writer import OutputTensor, ShardedSafetensorsWriter
from hf_fusion.errors import IncompatibleModelsError, ParameterError
from hf_fusion.output import AtomicFolder, check_output_folder
from hf_fusion.progress import progress_bar
from hf_fusion.runtime import LOCAL

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
REPORT_FILENAME = "extraction.json"
CARD_FILENAME = "README.md"
PEFT_PREFIX = "base_model.model."

LINEAR_TYPES = frozenset({"Linear", "Conv1D"})
EMBEDDING_TYPES = frozenset({"Embedding"})
STORED_TRANSPOSED = frozenset({"Conv1D", "Embedding"})
"""Module types whose weight is stored ``[in, out]`` (``[num_embeddings, dim]``): peft applies ``(B @ A).T``."""

_TASK_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("Model", "FEATURE_EXTRACTION"),
)
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
_FACTOR_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})


@dataclass(frozen=True)
class ModuleExtraction:
    """One factorised module: its weight's shape as stored, the rank kept and the share of ``||delta||_F^2`` kept."""

    name: str
    shape: tuple[int, ...]
    rank: int
    energy: float


@dataclass(frozen=True)
class ExtractionResult:
    """What :func:`extract_lora` wrote: factorised modules, modules saved whole (``modules_to_save``), modules
    equal to the base, tensors excluded by pattern and changed tensors the adapter cannot carry."""

    output: Path
    rank: int
    modules: list[ModuleExtraction]
    saved_whole: list[str]
    unchanged: list[str]
    excluded: list[str]
    left_out: list[str]
    seconds: float
    adapter_bytes: int = 0

    def summary(self) -> str:
        """One line: modules factorised, energy kept (mean and lowest), modules saved whole, modules unchanged."""
        if self.modules:
            rank_text, energy = describe_modules(self.modules)
            head = f"Extracted {len(self.modules)} LoRA module(s) at rank {rank_text} ({energy})"
        else:
            head = "Extracted no LoRA module"
        return (
            f"{head}; {len(self.saved_whole)} module(s) saved whole, {len(self.unchanged)} unchanged; "
            f"{self.adapter_bytes / 1e6:.1f} MB in {self.output} ({self.seconds:.1f} s)"
        )


def describe_modules(modules: Sequence[ModuleExtraction]) -> tuple[str, str]:
    """Factorised modules in words: their rank (or range of ranks) and the energy kept, mean and lowest (with the
    module). ``modules`` is not empty."""
    ranks = sorted({m.rank for m in modules})
    worst = min(modules, key=lambda m: m.energy)
    mean = sum(m.energy for m in modules) / len(modules)
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    return rank_text, f"energy kept: mean {mean:.4f}, lowest {worst.energy:.4f} ({worst.name})"


@dataclass
class _Module:
    """A module's tensors, by parameter name, and what becomes of them."""

    name: str
    params: dict[str, str] = field(default_factory=dict)
    factorise: bool = False


def extract_lora(
    model: str | Path,
    base: str | Path,
    *,
    rank: int,
    output: str | Path,
    rank_threshold: float | None = None,
    device: str = "cpu",
    exclude: Sequence[str] = (),
    embeddings: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    module_types: Mapping[str, str] | None = None,
    card_load_path: str | None = None,
    base_name: str | None = None,
    model_name: str | None = None,
) -> ExtractionResult:
    """Writes the LoRA adapter of rank ``rank`` (at most) that turns ``base`` into ``model`` into ``output``.

    ``model`` and ``base`` are local folders of the same transformers architecture; which tensors are linear layers
    is read from the base's ``config.json`` (``module_types``, tensor name to module class such as ``Linear``,
    ``Conv1D``, ``Embedding``, ``LayerNorm``, overrides that). ``rank_threshold`` keeps,
    per module, the smallest rank whose share of the squared singular values reaches it (capped at ``rank``).
    ``exclude`` globs (tensor or module names) leave tensors as the base has them. Refused before any tensor data is
    read: mismatched tensor names or shapes, a rank above a factorised module's ``min(out, in)``, an output folder
    that exists without ``overwrite``. The card's snippet loads ``card_load_path`` (a repo id the adapter is pushed
    to), else ``output``; ``device`` (``cuda:N``) runs the SVDs there; ``base_name`` and ``model_name`` (Hub ids the folders were downloaded from) name them in
    the config, report and card.
    """
    started = time.perf_counter()
    if rank < 1:
        raise ParameterError(f"--rank must be at least 1, got {rank}.")
    device = LOCAL.device(device)  # a GPU that is not there is refused before anything is read
    if rank_threshold is not None and not 0.0 < rank_threshold <= 1.0:
        raise ParameterError(f"--rank-threshold must be in (0, 1], got {rank_threshold}.")
    model_path, base_path, output = Path(model), Path(base), Path(output)
    check_output_folder(output, overwrite=overwrite)
    architecture = architecture_of(base_path)
    task_type = task_type_of(architecture)
    heads = _TASK_HEADS.get(task_type or "", ())
    tuned = open_checkpoint(model_path, "model")
    original = open_checkpoint(base_path, "base")
    try:
        check_same_tensors(tuned, original)
        if module_types is None:
            module_types = parameter_module_types(base_path, list(original.entries))
        modules, excluded = _plan(tuned, module_types, exclude=exclude, embeddings=embeddings, heads=heads)
        _check_rank(tuned, modules, rank)
        atomic = AtomicFolder(output, overwrite=overwrite)
        with atomic as temp:
            report = _extract(
                tuned,
                original,
                modules,
                module_types,
                temp,
                rank=rank,
                threshold=rank_threshold,
                show=show_progress,
                device=device,
            )
            modules_done, saved_whole, bias_written, unchanged, left_out = report
            conv1d = any(module_types.get(f"{m.name}.weight") == "Conv1D" for m in modules_done)
            write_adapter_config(
                temp,
                modules_done,
                saved_whole,
                rank=rank,
                base=base_name or str(base),
                task_type=task_type,
                bias="lora_only" if bias_written else "none",
                fan_in_fan_out=conv1d,
            )
            result = ExtractionResult(
                output=output,
                rank=rank,
                modules=modules_done,
                saved_whole=saved_whole,
                unchanged=unchanged,
                excluded=excluded,
                left_out=left_out,
                seconds=time.perf_counter() - started,
                adapter_bytes=(temp / ADAPTER_WEIGHTS).stat().st_size,
            )
            _write_report(
                temp, result, model=model_name or str(model), base=base_name or str(base), threshold=rank_threshold
            )
            (temp / CARD_FILENAME).write_text(
                adapter_card(
                    base_name or str(base),
                    model_name or str(model),
                    result,
                    threshold=rank_threshold,
                    task_type=task_type,
                    load_path=card_load_path,
                    architecture=architecture,
                )
            )
            atomic.commit()
    finally:
        tuned.close()
        original.close()
    return result


def check_same_tensors(model: Checkpoint, base: Checkpoint) -> None:
    """Refuses a model and base whose tensor names or shapes differ, naming the first tensor that does."""
    for name, entry in model.entries.items():
        other = base.entries.get(name)
        if other is None:
            raise IncompatibleModelsError(
                f"the model has tensor {name!r}, which the base lacks; extract-lora needs the model's own base "
                "(same architecture, same tensor names)."
            )
        if other.shape != entry.shape:
            raise IncompatibleModelsError(
                f"tensor {name!r} is {list(entry.shape)} in the model but {list(other.shape)} in the base; "
                "extract-lora needs the model's own base (same architecture, same shapes)."
            )
    extra = [n for n in base.entries if n not in model.entries]
    if extra:
        raise IncompatibleModelsError(
            f"the base has tensor {extra[0]!r}, which the model lacks ({len(extra)} such tensor(s)); extract-lora "
            "needs the model's own base (same architecture, same tensor names)."
        )


def task_type_of(architecture: str | None) -> str | None:
    """peft's task type implied by a transformers class name (``LlamaForCausalLM`` -> ``CAUSAL_LM``), or None."""
    if not architecture:
        return None
    for suffix, task in _TASK_SUFFIXES:
        if architecture.endswith(suffix):
            return task
    return None


def architecture_of(folder: Path) -> str | None:
    """The first class named in a model folder's ``config.json`` ``architectures``, or None."""
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return architectures[0] if architectures and isinstance(architectures[0], str) else None


def _matches(patterns: Sequence[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _plan(
    model: Checkpoint,
    module_types: Mapping[str, str],
    *,
    exclude: Sequence[str],
    embeddings: bool,
    heads: Sequence[str],
) -> tuple[list[_Module], list[str]]:
    """Groups the model's floating-point tensors by module and marks the modules whose weight is factorised."""
    modules: dict[str, _Module] = {}
    excluded: list[str] = []
    for name, entry in model.entries.items():
        if not is_floating(entry.dtype):
            continue
        module_name, _, param = name.rpartition(".")
        if _matches(exclude, name) or (module_name and _matches(exclude, module_name)):
            excluded.append(name)
            continue
        module = modules.setdefault(module_name, _Module(module_name))
        module.params[param] = name
        kind = module_types.get(name)
        factorable = kind in LINEAR_TYPES or (embeddings and kind in EMBEDDING_TYPES)
        is_head = module_name.rpartition(".")[2] in heads
        if param == "weight" and len(entry.shape) == 2 and factorable and not is_head:
            module.factorise = True
    return list(modules.values()), excluded


def _check_rank(model: Checkpoint, modules: Sequence[_Module], rank: int) -> None:
    for module in modules:
        if module.factorise:
            shape = model.entries[module.params["weight"]].shape
            if rank > min(shape):
                raise ParameterError(
                    f"--rank {rank} is larger than module {module.name!r} allows (weight {list(shape)}, so at most "
                    f"{min(shape)}); choose a smaller rank or leave the module out with --exclude '{module.name}'."
                )


def read_tensor(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    """One whole tensor in its stored dtype (the only tensor-sized allocation of a read)."""
    entry = checkpoint.entries[name]
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    if entry.nbytes:
        checkpoint.read_rows(name, 0, entry.rows, raw)
    return raw.view(SAFETENSORS_TO_TORCH[entry.dtype]).reshape(entry.shape)


def _factor_dtype(code: str) -> torch.dtype:
    return SAFETENSORS_TO_TORCH[code] if code in _FACTOR_DTYPES else torch.float32


def _extract(
    model: Checkpoint,
    base: Checkpoint,
    modules: Sequence[_Module],
    module_types: Mapping[str, str],
    folder: Path,
    *,
    rank: int,
    threshold: float | None,
    show: bool,
    device: str = "cpu",
) -> tuple[list[ModuleExtraction], list[str], bool, list[str], list[str]]:
    done: list[ModuleExtraction] = []
    saved_whole: list[str] = []
    unchanged: list[str] = []
    left_out: list[str] = []
    bias_written = False
    spool = TensorSpool(folder)
    bar = progress_bar(total=len(modules), desc="extracting LoRA", unit="module", disable=not show)
    try:
        for module in modules:
            bar.update(1)
            pairs = {param: _pair(model, base, name) for param, name in module.params.items()}  # this module only
            changed = [param for param, (tuned, original) in pairs.items() if not torch.equal(tuned, original)]
            if not changed:
                unchanged.append(module.name)
                continue
            if not (module.factorise and "weight" in changed):
                saved_whole.append(module.name)
                for param, name in module.params.items():
                    spool.add(PEFT_PREFIX + name, pairs[param][0])
                continue
            weight = module.params["weight"]
            tuned, original = pairs.pop("weight")
            delta = tuned.to(device, torch.float32) - original.to(device, torch.float32)
            del tuned, original
            kind = module_types[weight]
            factors = factorise(delta.T if kind in STORED_TRANSPOSED else delta, rank, threshold)
            del delta
            dtype = _factor_dtype(model.entries[weight].dtype)
            names = (
                ("lora_embedding_A", "lora_embedding_B")
                if kind in EMBEDDING_TYPES
                else ("lora_A.weight", "lora_B.weight")
            )
            spool.add(f"{PEFT_PREFIX}{module.name}.{names[0]}", factors.a.to(dtype))
            spool.add(f"{PEFT_PREFIX}{module.name}.{names[1]}", factors.b.to(dtype))
            done.append(ModuleExtraction(module.name, model.entries[weight].shape, factors.rank, factors.energy))
            for param in changed:
                if param == "bias":
                    spool.add(f"{PEFT_PREFIX}{module.name}.base_layer.bias", pairs[param][0])
                    bias_written = True
                elif param != "weight":
                    left_out.append(module.params[param])
                    log.warning(
                        "%s changed but cannot be saved beside a LoRA layer; left as in the base",
                        module.params[param],
                    )
        spool.finish(ADAPTER_WEIGHTS)
    finally:
        bar.close()
        spool.discard()
    return done, saved_whole, bias_written, unchanged, left_out


def _pair(model: Checkpoint, base: Checkpoint, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return read_tensor(model, name), read_tensor(base, name)


class TensorSpool:
    """Tensors appended to a scratch file as they are made; :meth:`finish` writes them as one safetensors file.

    Ranks chosen by energy and modules skipped as unchanged are only known once each delta is read, so the header
    of the output cannot be written first; the scratch file keeps memory bounded by the largest single tensor.
    """

    CHUNK = 64 << 20

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / ".extract-lora.spool"
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by finish or discard)
        self.tensors: list[OutputTensor] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        code = TORCH_TO_SAFETENSORS[tensor.dtype]
        self.tensors.append(OutputTensor(name, code, tuple(tensor.shape)))
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(raw.numpy()))

    def finish(self, file_name: str) -> None:
        self._file.close()
        stem = file_name.removesuffix(".safetensors")
        writer = ShardedSafetensorsWriter(self.folder, self.tensors, stem=stem, max_shard_bytes=1 << 62)
        try:
            with open(self.path, "rb") as spooled:
                for tensor in self.tensors:
                    writer.begin(tensor.name)
                    for chunk in _chunks(spooled, tensor.nbytes, self.CHUNK):
                        writer.write(torch.frombuffer(chunk, dtype=torch.uint8))
            writer.close()
        except BaseException:
            writer.abort()
            raise

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _chunks(file: object, size: int, chunk: int) -> Iterator[bytearray]:
    left = size
    while left > 0:
        data = bytearray(file.read(min(chunk, left)))  # type: ignore[attr-defined]
        if not data:
            raise OSError(f"scratch file ended {left} bytes early")
        left -= len(data)
        yield data


def write_adapter_config(
    folder: Path,
    modules: Sequence[ModuleExtraction],
    saved_whole: Sequence[str],
    *,
    rank: int,
    base: str,
    task_type: str | None,
    bias: str,
    fan_in_fan_out: bool,
) -> None:
    """``adapter_config.json`` through peft's own :class:`~peft.LoraConfig`, so every field is one peft reads."""
    from peft import LoraConfig

    ranks = {m.name: m.rank for m in modules if m.rank != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=[m.name for m in modules],
        rank_pattern=ranks,
        alpha_pattern=dict(ranks),
        modules_to_save=list(saved_whole) or None,
        bias=bias,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        task_type=task_type,
        base_model_name_or_path=base,
        inference_mode=True,
    )
    config.save_pretrained(str(folder))


def _write_report(folder: Path, result: ExtractionResult, *, model: str, base: str, threshold: float | None) -> None:
    report = {
        "model": model,
        "base": base,
        "rank": result.rank,
        "rank_threshold": threshold,
        "modules": {m.name: {"shape": list(m.shape), "rank": m.rank, "energy": m.energy} for m in result.modules},
        "modules_to_save": result.saved_whole,
        "unchanged": result.unchanged,
        "excluded": result.excluded,
        "left_out": result.left_out,
    }
    (folder / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")


def adapter_card(
    base: str,
    model: str,
    result: ExtractionResult,
    *,
    threshold: float | None,
    task_type: str | None,
    load_path: str | None = None,
    architecture: str | None = None,
) -> str:
    """A short model card: peft metadata, how the adapter was made and how to load it."""
    energies = [m.energy for m in result.modules]
    mean = sum(energies) / len(energies) if energies else 1.0
    rank_text = f"at most {result.rank}" + (f", the smallest keeping {threshold:g} of the energy" if threshold else "")
    usage = adapter_usage(load_path or str(result.output), base, task_type, architecture)
    return f"""---
library_name: peft
base_model: {json.dumps(base)}
base_model_relation: adapter
tags:
- lora
- hf-fusion
---

# LoRA adapter extracted from {model}

The difference between `{model}` and its base `{base}`, factorised into a LoRA adapter (rank {rank_text}) with
`hf-fusion extract-lora`. {len(result.modules)} module(s) carry LoRA factors and keep {mean:.4f} of the squared
Frobenius norm of their weight difference on average; {len(result.saved_whole)} module(s) are saved whole.
`{REPORT_FILENAME}` lists the rank and energy kept per module.

{usage["install"]}

```python
{usage["code"]}
```
"""
