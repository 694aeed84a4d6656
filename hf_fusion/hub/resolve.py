"""Resolve a Hub model before downloading it: commit, files, config and safetensors headers.

A few KB per model (repo info, ``config.json``, each weight file's header via a Range request) are enough to check
architectures, tensor names and shapes, and the download size, so a bad recipe fails before gigabytes move.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import HfApi, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import SafetensorsParsingError

from hf_fusion.engine.checkpoint import Checkpoint, HeaderEntry, TensorEntry, check_layout, choose_weight_files
from hf_fusion.errors import CheckpointError, PickleCheckpointError
from hf_fusion.hub.errors import TRANSPORT_ERRORS, HubAccessError, hub_errors
from hf_fusion.model_files import is_side_file, is_tokenizer_file
from hf_fusion.recipe import ModelRef

T = TypeVar("T")


class HeaderCheckpoint(Checkpoint):
    """Names, dtypes and shapes from remote headers, for validation only: it holds no data."""

    def read_rows(self, name: str, row_start: int, row_stop: int, out: Any) -> None:
        raise RuntimeError(f"{self.label}: header-only checkpoint cannot read tensor data")


@dataclass(frozen=True)
class HubModel:
    """A Hub model pinned to a commit, with what validation and download need."""

    ref: ModelRef
    sizes: dict[str, int]
    weight_kind: str
    weight_files: list[str]
    index_file: str | None
    config: dict[str, Any] | None
    headers: HeaderCheckpoint | None
    adapter_config: dict[str, Any] | None = None
    fetch_revision: str = "main"
    """What to download by: the user's branch or tag (so the cache learns the ref, for offline use), or the commit
    when the recipe pinned one."""
    subfolder: str = ""
    """The pipeline component this model is (``unet``), whose files live in that folder of the repo."""

    @property
    def download_files(self) -> list[str]:
        """Weights, their index, config/tokenizer files and the card (read for the license, never copied); paths
        in the repo."""
        wanted = set(self.weight_files) | {n for n in self.sizes if is_side_file(n)}
        if self.index_file:
            wanted.add(self.index_file)
        if "README.md" in self.sizes and not self.subfolder:
            wanted.add("README.md")
        prefix = f"{self.subfolder}/" if self.subfolder else ""
        return sorted(prefix + n for n in wanted)

    def missing_bytes(self) -> int:
        """Bytes still to download: files of this commit that the cache does not hold yet."""
        total = 0
        for name in self.download_files:
            cached = try_to_load_from_cache(self.ref.path, name, revision=self.ref.commit)
            if not isinstance(cached, str):
                total += self.sizes.get(name[len(self.subfolder) + 1 :] if self.subfolder else name) or 0
        return total


def _with_retries(call: Callable[[], T], attempts: int = 4, first_wait: float = 0.5) -> T:
    """Retries a small request on connection drops (downloads have their own resuming retries)."""
    for attempt in range(attempts):
        try:
            return call()
        except TRANSPORT_ERRORS:
            if attempt == attempts - 1:
                raise
            time.sleep(first_wait * 2**attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class HubListing:
    """A Hub repo pinned to a commit, with the size of every file: what one ``model_info`` call says."""

    ref: ModelRef
    sizes: dict[str, int]


def list_hub_repo(ref: ModelRef, *, token: str | None) -> HubListing:
    """Pins ``ref`` to a commit and lists its files (no file is read)."""
    with hub_errors(ref.path, ref.pinned, "read"):
        info = HfApi().model_info(ref.path, revision=ref.pinned, files_metadata=True, token=token)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    return HubListing(ref.model_copy(update={"commit": info.sha}), sizes)


def download_file(listing: HubListing, filename: str, *, token: str | None) -> Path:
    """One file of a listed repo, fetched by the revision the user named (so the cache learns it, for offline use)
    and checked to come from the listed commit."""
    ref = listing.ref
    with hub_errors(ref.path, ref.commit, "download"):
        path = Path(hf_hub_download(ref.path, filename, revision=ref.revision or "main", token=token))
    snapshot = path.parents[len(Path(filename).parts) - 1]
    if snapshot.name != ref.commit:
        raise HubAccessError(
            f"{ref}: the revision moved from {ref.commit} to {snapshot.name} while the fusion was being prepared; "
            "rerun, or pin the commit with @<commit id>."
        )
    return path


def resolve_hub_model(
    ref: ModelRef,
    *,
    token: str | None,
    allow_pickle: bool,
    listing: HubListing | None = None,
    subfolder: str = "",
    variant: str | None = None,
) -> HubModel:
    """Pins ``ref`` to a commit and reads its config and weight headers; raises before any weight is downloaded.

    ``subfolder`` reads one component of a diffusers pipeline (``unet``) as a model of its own, from the
    ``listing`` of the whole repo when the caller has it already; ``variant`` (``fp16``) reads that variant's weights
    where the component has them.
    """
    listing = listing or list_hub_repo(ref, token=token)
    prefix = f"{subfolder}/" if subfolder else ""
    label = f"{ref}:{subfolder}" if subfolder else str(ref)
    with hub_errors(ref.path, ref.pinned, "read"):
        api = HfApi()
        sizes = {n[len(prefix) :]: size for n, size in listing.sizes.items() if n.startswith(prefix)}
        pinned = listing.ref
        commit = pinned.commit
        try:
            kind, files, index = choose_weight_files(list(sizes), variant)
        except CheckpointError as err:
            raise CheckpointError(f"{label}: {err}") from None
        if kind == "pickle" and not allow_pickle:
            raise PickleCheckpointError(
                f"{label}: weights are a pickle ({(files or [index])[0]}), which can run arbitrary code when loaded. "
                "Use a safetensors revision of the model, or pass --allow-pickle (allow_pickle=True) if you trust it."
            )
        config = _json_file(ref.path, prefix + "config.json", commit, token) if "config.json" in sizes else None
        adapter = (
            _json_file(ref.path, prefix + "adapter_config.json", commit, token)
            if "adapter_config.json" in sizes
            else None
        )
        weight_map: dict[str, str] | None = None
        if index is not None:
            index_path = hf_hub_download(ref.path, prefix + index, revision=commit, token=token)
            weight_map = json.loads(Path(index_path).read_text()).get("weight_map") or {}
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if f not in sizes]
            if missing:
                raise CheckpointError(f"{label}: {index} names shard {missing[0]!r}, which the repo does not have.")
        headers = None
        if kind == "safetensors" and adapter is None:  # an adapter's dense shapes are known only with its base
            entries: dict[str, TensorEntry] = {}
            for name in files:
                try:
                    meta = _with_retries(
                        lambda: api.parse_safetensors_file_metadata(
                            ref.path, prefix + name, revision=commit, token=token
                        )
                    )
                except SafetensorsParsingError as err:
                    raise CheckpointError(f"{label}: {name} is not a valid safetensors file ({err}).") from None
                declared = [HeaderEntry(n, t.dtype, list(t.shape), *t.data_offsets) for n, t in meta.tensors.items()]
                for t in check_layout(f"{label}: {name}", declared, None):
                    if weight_map is not None and weight_map.get(t.name, name) != name:
                        continue
                    entries[t.name] = TensorEntry(
                        t.name,
                        t.dtype,
                        tuple(t.shape),
                        Path(name),
                        t.begin,  # type: ignore[arg-type]
                        t.end - t.begin,
                    )  # type: ignore[operator]
            headers = HeaderCheckpoint(label, entries, [Path(f) for f in files])
    fetch_revision = ref.commit or ref.revision or "main"
    return HubModel(pinned, sizes, kind, files, index, config, headers, adapter, fetch_revision, subfolder)


def _json_file(repo_id: str, filename: str, commit: str, token: str | None) -> dict[str, Any]:
    return json.loads(Path(hf_hub_download(repo_id, filename, revision=commit, token=token)).read_text())


def download_tokenizer(model: HubModel, *, token: str | None) -> Path | None:
    """Fetches only the config and tokenizer files (a few MB at most) at the pinned commit, ahead of the weights, so
    vocabularies and chat templates are checked before any weight moves; ``None`` when the repo has no tokenizer."""
    names = [n for n in model.sizes if is_tokenizer_file(n)]
    if not names:
        return None
    names += [n for n in ("config.json",) if n in model.sizes]
    with hub_errors(model.ref.path, model.ref.commit, "download"):
        return Path(snapshot_download(model.ref.path, revision=model.ref.commit, allow_patterns=names, token=token))


def download(model: HubModel, *, token: str | None, show_progress: bool, extra_files: tuple[str, ...] = ()) -> Path:
    """Fetches exactly the files the fusion needs (and ``extra_files``, repo paths), at the pinned commit, into
    the shared Hugging Face cache; returns the snapshot folder (the repo's root, also for a component)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not show_progress and not are_progress_bars_disabled()
    with hub_errors(model.ref.path, model.ref.commit, "download"):
        if silence:
            disable_progress_bars()
        try:
            folder = Path(
                snapshot_download(
                    model.ref.path,
                    revision=model.fetch_revision,
                    allow_patterns=[*model.download_files, *extra_files],
                    token=token,
                )
            )
        finally:
            if silence:
                enable_progress_bars()
    if folder.name != model.ref.commit:
        raise HubAccessError(
            f"{model.ref}: the revision moved from {model.ref.commit} to {folder.name} while the fusion was being "
            "prepared; rerun, or pin the commit with @<commit id>."
        )
    return folder


def cached_model(ref: ModelRef, pattern: str = "config.json") -> tuple[ModelRef, Path]:
    """Offline mode: the cached snapshot of ``ref`` (its revision, or ``main``) and the commit it holds, looked up by
    ``pattern`` (``model_index.json`` for a pipeline, ``*.safetensors`` for a LoRA or single file)."""
    with hub_errors(ref.path, ref.pinned, "find in the cache"):
        # A narrow pattern: fusions download a subset of each repo, which a full offline lookup calls incomplete.
        folder = Path(
            snapshot_download(ref.path, revision=ref.pinned or "main", local_files_only=True, allow_patterns=[pattern])
        )
    return ref.model_copy(update={"commit": folder.name}), folder
