"""Input models, wherever they live: a local folder, a Hub repo pinned to a commit, or the cache when offline.

Resolution reads only metadata (repo info, config, safetensors headers); :func:`fetch` then downloads exactly the
files the fusion needs. Local folders pass through unchanged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import constants

from hf_fusion.catalog import BUILTIN_PREFIX, resolve_builtin
from hf_fusion.engine.checkpoint import Checkpoint, open_checkpoint
from hf_fusion.engine.lora import ADAPTER_CONFIG, LoraCheckpoint, is_lora_adapter
from hf_fusion.errors import InsufficientResourcesError, RecipeError
from hf_fusion.hub.resolve import HubModel, cached_model, download, download_tokenizer, resolve_hub_model
from hf_fusion.model_files import has_tokenizer, local_folder, read_config
from hf_fusion.output import nearest_existing
from hf_fusion.recipe import ModelRef


@dataclass(frozen=True)
class Source:
    """One input: ``ref`` carries the resolved commit for Hub models; ``folder`` is set once it is local."""

    ref: ModelRef
    label: str
    config: dict[str, Any] | None
    folder: Path | None = None
    hub: HubModel | None = None

    @property
    def adapter_config(self) -> dict[str, Any] | None:
        """The peft config when this input is a LoRA adapter rather than a full model."""
        if self.hub is not None and self.hub.adapter_config is not None:
            return self.hub.adapter_config
        if self.folder is not None and is_lora_adapter(self.folder):
            return json.loads((self.folder / ADAPTER_CONFIG).read_text())
        return None

    def adapter_base(self) -> ModelRef | None:
        """The base model a LoRA adapter names (``base_model_name_or_path``), if any."""
        name = (self.adapter_config or {}).get("base_model_name_or_path")
        return ModelRef.parse(name) if name else None


def is_offline() -> bool:
    return bool(constants.is_offline_mode())


def resolve(ref: ModelRef, *, token: str | None, allow_pickle: bool) -> Source:
    """Metadata only: a local folder, the offline cache, or the Hub (commit, config, headers)."""
    label = str(ref)
    if ref.path.startswith(BUILTIN_PREFIX):  # ships with hf-fusion or its demo extra: the reference stays portable
        folder = Path(resolve_builtin(ref.path))
        return Source(ref, label, read_config(folder), folder)
    if ref.is_local:
        folder = local_folder(ref)
        return Source(ref, label, read_config(folder), folder)
    if is_offline():
        pinned, folder = cached_model(ref)
        return Source(pinned, label, read_config(folder), folder)
    hub = resolve_hub_model(ref, token=token, allow_pickle=allow_pickle)
    return Source(hub.ref, label, hub.config, hub=hub)


def header_checkpoint(source: Source, *, allow_pickle: bool) -> Checkpoint | None:
    """Tensor headers without downloading weights; ``None`` for a Hub pickle or an adapter (checked later)."""
    if source.adapter_config is not None:
        return None
    if source.folder is not None:
        return open_checkpoint(source.folder, source.label, allow_pickle=allow_pickle)
    assert source.hub is not None
    return source.hub.headers


def open_source(source: Source, *, allow_pickle: bool, lora_base: Checkpoint | None) -> Checkpoint:
    """The checkpoint of a fetched source; an adapter is read as the dense model it makes with ``lora_base``."""
    assert source.folder is not None
    if source.adapter_config is not None:
        if lora_base is None:
            raise RecipeError(f"{source.label} is a LoRA adapter: give the model it was trained on as --base.")
        return LoraCheckpoint(source.label, source.folder, lora_base)
    return open_checkpoint(source.folder, source.label, allow_pickle=allow_pickle)


def check_download_space(sources: list[Source]) -> int:
    """Refuses early when the Hugging Face cache's disk cannot hold what is still to download; returns the bytes."""
    needed = sum(s.hub.missing_bytes() for s in sources if s.hub is not None and s.folder is None)
    check_cache_space(needed, "the models")
    return needed


def check_cache_space(needed: int, what: str) -> None:
    """Refuses ``needed`` bytes of downloads that the Hugging Face cache's disk cannot hold."""
    if needed:
        cache = Path(constants.HF_HUB_CACHE)
        free = shutil.disk_usage(nearest_existing(cache)).free
        if needed > free:
            raise InsufficientResourcesError(
                f"{what} need {needed / 1e9:.2f} GB of downloads but only {free / 1e9:.2f} GB is free at {cache}."
            )


def fetch(source: Source, *, token: str | None, show_progress: bool) -> Source:
    """Downloads a Hub source's files into the shared cache; local sources are returned as they are."""
    if source.folder is not None:
        return source
    assert source.hub is not None
    return replace(source, folder=download(source.hub, token=token, show_progress=show_progress))


def tokenizer_folder(source: Source, *, token: str | None) -> Path | None:
    """A folder holding the source's tokenizer files, before its weights are downloaded (a Hub model's tokenizer
    files alone are fetched); ``None`` when it has none."""
    if source.folder is not None:
        return source.folder if has_tokenizer(source.folder) else None
    assert source.hub is not None
    return download_tokenizer(source.hub, token=token)
