"""Materialise the models a task scores: read any checkpoint (dense, sharded, or a LoRA adapter over its base)
through the engine's readers, and load it into a transformers module built from a config, matching names across
the prefixes task models and bare models use."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_fusion.engine.checkpoint import Checkpoint, open_checkpoint
from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH
from hf_fusion.engine.lora import LoraCheckpoint, is_lora_adapter
from hf_fusion.engine.plan import align_names
from hf_fusion.errors import FusionError

if TYPE_CHECKING:
    from hf_fusion.tasks.base import EvalSettings


@dataclass(frozen=True)
class ModelUnderTest:
    """A model to score: a dense folder, or a LoRA adapter folder over ``base``."""

    label: str
    folder: Path
    base: Path | None = None

    def checkpoint(self) -> Checkpoint:
        if is_lora_adapter(self.folder):
            if self.base is None:
                raise FusionError(f"{self.label}: {self.folder} is a LoRA adapter and no base was given.")
            return LoraCheckpoint(self.label, self.folder, open_checkpoint(self.base, "base"))
        return open_checkpoint(self.folder, self.label)

    def config(self) -> dict[str, Any] | None:
        for folder in (self.folder, self.base):
            if folder is not None and (folder / "config.json").is_file():
                return json.loads((folder / "config.json").read_text())
        return None


def read_state(ckpt: Checkpoint, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Whole tensors of a checkpoint (all, or ``names``), as torch tensors."""
    state = {}
    for name in names if names is not None else list(ckpt.entries):
        entry = ckpt.entries[name]
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        ckpt.read_rows(name, 0, entry.rows, buffer)
        state[name] = buffer.view(SAFETENSORS_TO_TORCH[entry.dtype]).view(entry.shape).clone()
    return state


def without_heads(state: dict[str, torch.Tensor], heads: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``state`` minus the per-task head tensors (another task's head, or the base's own classifier)."""
    return {k: v for k, v in state.items() if not any(fnmatch.fnmatchcase(k, p) for p in heads)}


def replace_part(state: dict[str, torch.Tensor], part: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``state`` with its tensors under ``prefix`` taken from ``part`` (names aligned across prefixes)."""
    targets = [k for k in state if k.startswith(prefix)]
    mapping = align_names(targets, part)
    missing = [k for k in targets if k not in mapping]
    if missing:
        raise FusionError(f"the model under test has no tensor for {missing[0]!r} ({len(missing)} missing).")
    return {**state, **{k: part[mapping[k]] for k in targets}}


def build_model(
    auto_class: Any, config: dict[str, Any], state: dict[str, torch.Tensor], label: str, device: str
) -> torch.nn.Module:
    """A transformers model of ``config``'s architecture with ``state`` (checkpoint naming) loaded through
    ``from_pretrained``, so transformers' own key conversions and prefix handling apply; a weight left at its
    random initialisation is an error, since it would give a meaningless score."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    model_class = _concrete_class(auto_class, cfg)
    with quiet_transformers():
        model, info = model_class.from_pretrained(None, config=cfg, state_dict=state, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise FusionError(
            f"{label}: no weights for {len(missing)} tensor(s) of {type(model).__name__}, e.g. {missing[0]!r}."
        )
    return model.to(device).eval()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without its warnings and per-load progress bars (hf-fusion reports its own progress)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_network(auto_class: Any, model: ModelUnderTest, base: Path, device: str) -> torch.nn.Module:
    """A whole model under test (its config, else the base's) for tasks that use the model as it is; a fused module
    (ensemble, routed mixture, depth up-scaled model) loads as it was saved."""
    fused = load_fused_module(model, device)
    if fused is not None:
        return fused
    config = model.config() or ModelUnderTest("base", base).config()
    if config is None:
        raise FusionError(f"{model.label}: neither {model.folder} nor the base {base} has a config.json.")
    return build_model(auto_class, config, read_state(model.checkpoint()), model.label, device)


def _concrete_class(auto_class: Any, config: Any) -> Any:
    """The model class an Auto class picks for ``config`` (Auto classes cannot load from a state dict alone)."""
    mapping = getattr(auto_class, "_model_mapping", None)
    if mapping is None:
        return auto_class
    try:
        return mapping[type(config)]
    except KeyError:
        raise FusionError(f"{auto_class.__name__} has no model for {config.model_type!r} configs.") from None


DEPTH_UPSCALED_KEY = "hf_fusion_layer_indices"
"""Config key of depth up-scaled models: which base layer each layer copies (the task configs keep the old depth)."""


def load_fused_module(model: ModelUnderTest, device: str) -> torch.nn.Module | None:
    """The model as a loaded module when it cannot be rebuilt from the task's own config: an hf-fusion architecture
    (ensemble, routed mixture) or a depth up-scaled stock model."""
    if is_lora_adapter(model.folder) or not (model.folder / "config.json").is_file():
        return None
    config = json.loads((model.folder / "config.json").read_text())
    from hf_fusion.models import CUSTOM_MODEL_TYPES
    from hf_fusion.models.members import member_class

    if config.get("model_type") in CUSTOM_MODEL_TYPES:
        from transformers import AutoModel

        with quiet_transformers():
            return AutoModel.from_pretrained(model.folder).to(device).eval()
    if DEPTH_UPSCALED_KEY in config:
        with quiet_transformers():
            return member_class(config).from_pretrained(model.folder).to(device).eval()
    return None


def place(module: torch.nn.Module, settings: EvalSettings) -> torch.nn.Module:
    """``module`` where ``settings`` put it: whole on ``settings.device``, or, with ``settings.device_map``, spread
    by accelerate over the GPUs, the CPU and a temporary offload folder within ``settings.max_memory``, so a model
    larger than one GPU is still scored (its layers run where they live; accelerate moves the activations)."""
    if settings.device_map is None:
        return module.to(settings.device).eval()
    import tempfile

    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    # every transformers model inside (a task network wraps one; a fused architecture holds several) names the blocks
    # whose residual stream must stay on one device
    no_split = sorted({n for m in module.modules() for n in getattr(m, "_no_split_modules", None) or []})
    limits = dict(settings.max_memory) if settings.max_memory else None
    if settings.device_map.startswith("balanced"):
        limits = get_balanced_memory(
            module, max_memory=limits, no_split_module_classes=no_split, low_zero=settings.device_map.endswith("_0")
        )
    device_map = infer_auto_device_map(module, max_memory=limits, no_split_module_classes=no_split)
    offload = None
    on_disk = [name for name, where in device_map.items() if where == "disk"]
    if on_disk:  # accelerate reads offloaded weights back from files it wrote itself
        from accelerate.utils import offload_state_dict

        offload = tempfile.TemporaryDirectory(prefix="hf-fusion-offload-")  # under $TMPDIR: point it at a disk
        state = module.state_dict()
        offload_state_dict(
            offload.name,
            {k: v for k, v in state.items() if any(k == n or k.startswith(f"{n}.") or n == "" for n in on_disk)},
        )
    placed = dispatch_model(module.eval(), device_map, offload_dir=offload.name if offload else None)
    placed._hf_fusion_offload = offload  # removed by release() once the model is scored
    return placed


def release(module: Any) -> None:
    """Removes the offload folder of a model placed with part of it on disk (a no-op otherwise)."""
    offload = getattr(module, "_hf_fusion_offload", None)
    if offload is not None:
        offload.cleanup()
