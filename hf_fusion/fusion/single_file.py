"""Single-file checkpoints (the ``.safetensors`` files A1111 and ComfyUI users share) as pipeline inputs.

The layout is recognised from the file's header alone (names and shapes, read remotely for a Hub file) with
diffusers' own classifier, and refused before any download when it is not a Stable Diffusion / SDXL / SD3 / Flux
checkpoint or does not belong to the base pipeline's class. After the checks, the file is converted once by
diffusers' single-file loader (``from_single_file``, configured from the base pipeline's folder, so nothing is
fetched) and saved in diffusers layout under the Hugging Face home, where later fusions find it again; from there it
is a pipeline like any other. The conversion holds the whole checkpoint in memory (about twice the file's size at
its peak), the one step of a pipeline fusion that is not streamed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants

from hf_fusion.engine.checkpoint import read_safetensors_entries
from hf_fusion.errors import CheckpointError, IncompatibleModelsError, RecipeError
from hf_fusion.hub.errors import hub_errors
from hf_fusion.hub.resolve import HubListing, download_file
from hf_fusion.recipe import ModelRef
from hf_fusion.sources import check_cache_space

log = logging.getLogger(__name__)

# Key prefixes of the original layouts diffusers converts: LDM/SGM (SD 1.x, 2.x, SDXL, SD3) and Black Forest Labs'.
_KNOWN_PREFIXES = ("model.diffusion_model.", "double_blocks.", "single_blocks.")
# The pipeline classes a checkpoint type can be fused with, by diffusers' model type families.
_FAMILIES = (
    (("v1", "v2", "inpainting", "inpainting_v2"), ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline")),
    (("xl_base", "xl_refiner", "xl_inpaint", "playground-v2-5"), ("StableDiffusionXLPipeline",)),
    (("sd3", "sd35_large", "sd35_medium"), ("StableDiffusion3Pipeline",)),
    (("flux-dev", "flux-schnell", "flux-fill", "flux-depth"), ("FluxPipeline",)),
)


@dataclass(frozen=True)
class SingleFileInput:
    """A single-file checkpoint: where it is (a local file, or a file of a Hub repo), and its diffusers type."""

    ref: ModelRef
    label: str
    model_type: str
    file: Path | None
    repo_file: str | None = None
    size: int = 0
    listing: HubListing | None = None


def single_file_type(shapes: dict[str, tuple[int, ...]], label: str) -> str:
    """diffusers' model type for a checkpoint's names and shapes; refuses layouts diffusers cannot convert."""
    if not any(name.startswith(_KNOWN_PREFIXES) for name in shapes):
        sample = ", ".join(sorted(shapes)[:3])
        raise CheckpointError(
            f"{label}: a single-file checkpoint of an unknown layout (its tensors are named like {sample}); "
            "Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux checkpoints are read."
        )
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    try:
        return str(infer_diffusers_model_type(meta))
    except Exception as err:  # noqa: BLE001 - a classifier that needs values cannot run on headers
        raise CheckpointError(f"{label}: diffusers cannot tell which model this checkpoint is ({err}).") from None


_UNET_SIGNATURES = {
    "v1": {"cross_attention_dim": 768, "in_channels": 4},
    "v2": {"cross_attention_dim": 1024, "in_channels": 4},
    "inpainting": {"cross_attention_dim": 768, "in_channels": 9},
    "inpainting_v2": {"cross_attention_dim": 1024, "in_channels": 9},
    "xl_base": {"in_channels": 4},
    "xl_inpaint": {"in_channels": 9},
}
"""UNet config values that tell Stable Diffusion checkpoint types apart, for refusing one that does not fit the base
from headers (the base's UNet config), before its download and conversion."""


def check_fits_unet(item: SingleFileInput, unet_config: dict | None, base_label: str) -> None:
    """Refuses a checkpoint whose type needs another UNet than the base's (SD 2 text width, inpainting inputs)."""
    expected = _UNET_SIGNATURES.get(item.model_type)
    if not expected or not unet_config:
        return
    for key, value in expected.items():
        known = {signature[key] for signature in _UNET_SIGNATURES.values() if key in signature}
        if unet_config.get(key) in known and unet_config.get(key) != value:  # a base of another known type
            raise IncompatibleModelsError(
                f"{item.label} is a single-file {item.model_type!r} checkpoint ({key} {value}), but the UNet of "
                f"{base_label} has {key} {unet_config.get(key)}: give the base it belongs to."
            )


def check_fits_base(item: SingleFileInput, pipeline_class: str, base_label: str) -> None:
    """Refuses a checkpoint whose type does not belong to the base pipeline's class."""
    for types, classes in _FAMILIES:
        if item.model_type in types:
            if pipeline_class not in classes:
                raise IncompatibleModelsError(
                    f"{item.label} is a single-file {item.model_type!r} checkpoint, which does not fit the "
                    f"{pipeline_class} {base_label}."
                )
            return
    raise CheckpointError(
        f"{item.label} is a single-file {item.model_type!r} checkpoint; only Stable Diffusion 1.x/2.x, SDXL, SD3 and "
        "Flux checkpoints are fused."
    )


def local_single_file(ref: ModelRef, path: Path) -> SingleFileInput | None:
    """A local ``.safetensors`` file as a single-file checkpoint, or None when it is not a file of that kind."""
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    shapes = {e.name: e.shape for e in read_safetensors_entries(path)}
    return SingleFileInput(ref, str(ref), single_file_type(shapes, str(ref)), path, size=path.stat().st_size)


def hub_header_shapes(ref: ModelRef, listing: HubListing, repo_file: str, *, token: str | None) -> dict[str, tuple]:
    """Names and shapes of a Hub safetensors file, from its header (a Range request, no download)."""
    with hub_errors(ref.path, listing.ref.commit, "read"):
        meta = HfApi().parse_safetensors_file_metadata(ref.path, repo_file, revision=listing.ref.commit, token=token)
    return {name: tuple(t.shape) for name, t in meta.tensors.items()}


def hub_single_file(
    ref: ModelRef, listing: HubListing, repo_file: str, shapes: dict[str, tuple[int, ...]]
) -> SingleFileInput:
    """A Hub repo's one top-level ``.safetensors`` file as a single-file checkpoint, typed from its header."""
    label = str(ref)
    return SingleFileInput(
        listing.ref, label, single_file_type(shapes, label), None, repo_file, listing.sizes[repo_file], listing
    )


def converted_folder(item: SingleFileInput, pipeline_class: str, config_folder: Path, *, token: str | None) -> Path:
    """The checkpoint in diffusers layout, converted once (by diffusers, configured from ``config_folder``) into
    the Hugging Face home and found there again by the file's identity."""
    file = item.file
    if file is None:
        assert item.repo_file is not None and item.listing is not None
        check_cache_space(item.size, item.label)
        file = download_file(item.listing, item.repo_file, token=token)
    destination = _cache_root() / _identity(item, file, pipeline_class, config_folder)
    if (destination / "model_index.json").is_file():
        log.info("%s: using its diffusers-layout copy at %s", item.label, destination)
        return destination
    log.info("%s: converting the single-file checkpoint to diffusers layout (held in memory once)", item.label)
    destination.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_conversions(destination.parent)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=destination.parent))
    try:
        _convert(file, pipeline_class, config_folder, scratch, item.label)
        try:
            os.replace(scratch, destination)
        except OSError:  # another run converted the same file meanwhile: its copy is as good
            if not (destination / "model_index.json").is_file():
                raise
            shutil.rmtree(scratch, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return destination


STALE_SECONDS = 24 * 3600
"""A conversion folder untouched this long was left by a run that was killed; it is removed."""


def _remove_stale_conversions(root: Path) -> None:
    now = time.time()
    for stale in root.glob(".converting-*"):
        try:
            if now - stale.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


def _convert(file: Path, pipeline_class: str, config_folder: Path, dest: Path, label: str) -> None:
    import diffusers

    from hf_fusion.images.render import diffusers_dtype_keyword

    loader = getattr(diffusers, pipeline_class, None)
    if loader is None or not hasattr(loader, "from_single_file"):
        raise RecipeError(f"{label}: diffusers cannot load single-file checkpoints into a {pipeline_class}.")
    dtype = _stored_dtype(file)
    try:
        pipe = loader.from_single_file(
            str(file),
            config=str(config_folder),
            local_files_only=True,
            use_safetensors=True,
            **{diffusers_dtype_keyword(): dtype},
        )
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{label}: diffusers could not convert this checkpoint ({err}).") from None
    pipe.save_pretrained(dest, safe_serialization=True)


def _stored_dtype(file: Path):  # type: ignore[no-untyped-def]
    """The checkpoint's most common floating dtype, so conversion keeps its precision (fp16 files stay fp16)."""
    from collections import Counter

    from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH

    counts = Counter(e.dtype for e in read_safetensors_entries(file) if e.dtype in ("F16", "BF16", "F32"))
    return SAFETENSORS_TO_TORCH[counts.most_common(1)[0][0]] if counts else SAFETENSORS_TO_TORCH["F32"]


def _cache_root() -> Path:
    return Path(constants.HF_HOME) / "hf-fusion" / "single-file"


def _identity(item: SingleFileInput, file: Path, pipeline_class: str, config_folder: Path) -> str:
    """What names a conversion: the Hub commit and file (or a local file's path, size, time and first MB), the base
    whose configs (and, for parts the file lacks, weights) complete it, and the diffusers that converts it."""
    import diffusers

    digest = hashlib.sha256(f"{pipeline_class}:{diffusers.__version__}".encode())
    for config in sorted(config_folder.glob("*.json")) + sorted(config_folder.glob("*/*.json")):
        digest.update(config.relative_to(config_folder).as_posix().encode() + config.read_bytes())
    digest.update(str(config_folder.resolve()).encode())
    if item.file is None:
        digest.update(f"{item.ref.path}@{item.ref.commit}:{item.repo_file}".encode())
    else:
        stat = file.stat()
        digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:32]
