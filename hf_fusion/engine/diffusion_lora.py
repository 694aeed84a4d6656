"""A diffusion LoRA (diffusers/peft or kohya/A1111 format) seen as the dense pipeline components it makes with its base.

Each format is read with the pipeline class's own ``lora_state_dict`` (so every family's converter applies: SD 1.x,
SDXL with its SGM block renumbering, SD3, Flux with kohya's fused projections split, ...). Ranks and alphas then
follow what ``load_lora_weights`` does, step by step, with diffusers' own helpers: the file's adapter metadata when
it has some, else ``get_peft_kwargs`` over per-module ranks and kohya alphas, resolved per module by peft's pattern
matching. The scale of each module is peft's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), so the dense weights
equal diffusers' ``fuse_lora(lora_scale=1.0)``, computed lazily row slice by row slice.

diffusers is imported inside the functions that need it: importing it takes seconds.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_fusion.engine.checkpoint import PICKLE_SUFFIXES, Checkpoint, read_safetensors_entries
from hf_fusion.engine.lora import add_scaled, rows_view
from hf_fusion.engine.plan import align_names
from hf_fusion.errors import CheckpointError, PickleCheckpointError

log = logging.getLogger(__name__)

_MODEL_FILES = ("model_index.json", "config.json", "adapter_config.json")
_DORA_MARKERS = ("dora_scale", "lora_magnitude_vector")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# diffusers reads text-encoder ranks only from modules with these names (``_load_lora_into_text_encoder``).
_TEXT_ENCODER_RANKED = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """One adapted weight's update ``scale * up @ down``: ``down`` [r, in, (k, k)], ``up`` [out, r, (1, 1)]."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def find_lora_file(path: Path) -> Path | None:
    """The safetensors file of a diffusion LoRA given as a file or a folder; ``None`` if ``path`` is not one.

    A folder holding a model (``model_index.json``, ``config.json``) or a peft adapter (``adapter_config.json``) is
    not a diffusion LoRA. Pickled LoRAs (``pytorch_lora_weights.bin``) are refused: loading them can run code.
    """
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_error(path)
        return (
            path
            if path.suffix == ".safetensors" and holds_lora_keys(e.name for e in read_safetensors_entries(path))
            else None
        )
    if not path.is_dir() or any((path / name).is_file() for name in _MODEL_FILES):
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if not files:
        pickles = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_error(pickles[0])
        return None
    if len(files) > 1:
        raise CheckpointError(
            f"{path}: holds {len(files)} safetensors files ({', '.join(p.name for p in files)}); "
            "a LoRA folder must hold exactly one. Give the LoRA file itself."
        )
    return files[0] if holds_lora_keys(e.name for e in read_safetensors_entries(files[0])) else None


def read_pipeline_lora(
    path: Path, pipeline_class: str, label: str, *, base_folder: Path | None = None
) -> dict[str, dict[str, LoraFactors]]:
    """Component name -> weight tensor name -> factors, as diffusers' ``load_lora_weights`` would apply them.

    ``pipeline_class`` is the ``_class_name`` of the base's ``model_index.json``. ``base_folder`` is that base
    pipeline: with it, components are checked against its ``model_index.json``, SDXL LoRAs in the original SGM block
    numbering are renumbered from its UNet config (as SDXL's ``load_lora_weights`` does), and text-encoder names
    follow its text encoder classes rather than the ones the pipeline class declares.
    """
    lora_file = find_lora_file(path)
    if lora_file is None:
        raise CheckpointError(f"{label}: {path} is not a diffusion LoRA (no safetensors file with LoRA weights).")
    stored = [e.name for e in read_safetensors_entries(lora_file)]
    _refuse_dora(label, stored)
    loader = _loader_class(pipeline_class, label)
    index = _model_index(base_folder) if base_folder is not None else None
    state_dict, alphas, metadata = _converted_state_dict(label, loader, lora_file, stored, base_folder)
    by_component = _split_components(label, loader, state_dict, index, pipeline_class)
    result: dict[str, dict[str, LoraFactors]] = {}
    for component, component_state in by_component.items():
        component_meta = _with_prefix(metadata, component)
        component_alphas = _with_prefix(alphas, component) if alphas else alphas
        if component.startswith("text_encoder"):
            has_text_model = _has_text_model(loader, index, component, component_state)
            result[component] = _text_encoder_factors(
                label, component, component_state, component_alphas, component_meta, has_text_model
            )
        else:
            result[component] = _model_factors(label, component, component_state, component_alphas, component_meta)
    return result


class LoraDeltaCheckpoint(Checkpoint):
    """A base pipeline component with a diffusion LoRA fused in, computed lazily row slice by row slice.

    Entries are the base's (same names, dtypes, shapes); adapted weights read as ``W + scale * up @ down`` computed
    in float32 and cast back to the stored dtype, every other tensor as the base stores it.
    """

    def __init__(self, label: str, base: Checkpoint, factors: Mapping[str, LoraFactors]) -> None:
        matched = align_names(sorted(factors), base.entries)
        missing = sorted(set(factors) - set(matched))
        if missing:
            raise CheckpointError(
                f"{label}: the LoRA adapts {missing[0]!r}"
                + (f" and {len(missing) - 1} more tensor(s)" if len(missing) > 1 else "")
                + f", which the base {base.label} lacks; is it a LoRA for this base?"
            )
        self._base = base
        self._deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for lora_name, base_name in matched.items():
            f = factors[lora_name]
            shape = base.entries[base_name].shape
            _check_fit(label, base.label, base_name, shape, f)
            up = f.up.float().flatten(1)
            down = f.down.float().flatten(1)
            self._deltas[base_name] = (up, down, f.scale)
        super().__init__(label, dict(base.entries), list(base.weight_files))

    def read_rows(self, name: str, row_start: int, row_stop: int, out: torch.Tensor) -> None:
        self._base.read_rows(name, row_start, row_stop, out)
        delta = self._deltas.get(name)
        if delta is None:
            return
        weight = rows_view(out, self.entries[name], row_stop - row_start)
        up, down, scale = delta
        add_scaled(weight, up[row_start:row_stop] @ down, scale)


def _check_fit(label: str, base_label: str, name: str, shape: tuple[int, ...], f: LoraFactors) -> None:
    """The factors multiply out to the base weight's shape (a 1x1 ``up`` for convolutions, as peft's Conv layers)."""
    rank_ok = f.down.dim() >= 2 and f.up.dim() >= 2 and f.up.shape[1] == f.down.shape[0]
    kernel_ok = all(k == 1 for k in f.up.shape[2:]) and f.up.dim() == f.down.dim()
    expected = (f.up.shape[0], *f.down.shape[1:]) if rank_ok else None
    if not (rank_ok and kernel_ok and expected == tuple(shape)):
        raise CheckpointError(
            f"{label}: LoRA factors of {name!r} (up {list(f.up.shape)}, down {list(f.down.shape)}) do not fit "
            f"the base {base_label} weight {list(shape)}; is it a LoRA for this base?"
        )


def _pickle_error(path: Path) -> PickleCheckpointError:
    return PickleCheckpointError(
        f"{path}: a pickle ({path.suffix}), which can run arbitrary code when loaded, so it is not read as a LoRA "
        "or a checkpoint; use its safetensors version (most checkpoints and LoRAs are published as .safetensors)."
    )


def holds_lora_keys(names: Iterable[str]) -> bool:
    """Whether tensor names are a LoRA's (every format names its factors ``lora_...``): the rule that tells a LoRA
    file from a checkpoint, for local files and Hub headers alike."""
    return any("lora" in name for name in names)


def _refuse_dora(label: str, keys: list[str]) -> None:
    """diffusers drops DoRA magnitudes with a warning and loads the rest as plain LoRA; that is not the model."""
    dora = next((k for k in keys if any(m in k for m in _DORA_MARKERS)), None)
    if dora is not None:
        raise CheckpointError(
            f"{label}: DoRA LoRAs are not supported (tensor {dora!r}); only plain LoRA factors can be fused."
        )


def _loader_class(pipeline_class: str, label: str) -> type:
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    if cls is None:
        raise CheckpointError(f"{label}: diffusers {diffusers.__version__} has no pipeline class {pipeline_class!r}.")
    if not hasattr(cls, "lora_state_dict") or not getattr(cls, "_lora_loadable_modules", None):
        raise CheckpointError(
            f"{label}: diffusers' {pipeline_class} does not load LoRAs, so a LoRA cannot be fused into its base."
        )
    return cls


def _model_index(base_folder: Path) -> dict[str, Any]:
    try:
        return json.loads((base_folder / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{base_folder}: model_index.json cannot be read ({err}).") from None


def _converted_state_dict(
    label: str, loader: type, lora_file: Path, stored: list[str], base_folder: Path | None
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict[str, Any] | None]:
    """``lora_state_dict`` of the pipeline class with the arguments its ``load_lora_weights`` passes."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    kwargs: dict[str, Any] = {
        "weight_name": lora_file.name,
        "use_safetensors": True,
        "local_files_only": True,
        "return_lora_metadata": True,
    }
    if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:
        kwargs["return_alphas"] = True  # Flux returns its alphas only when asked, as its load_lora_weights does
    sgm = any(k.startswith("lora_unet_") and any(b in k for b in _SGM_BLOCKS) for k in stored)
    if issubclass(loader, StableDiffusionXLLoraLoaderMixin):
        if base_folder is not None:
            kwargs["unet_config"] = _unet_config(base_folder)
        elif sgm:
            raise CheckpointError(
                f"{label}: the LoRA numbers UNet blocks as the original SDXL code does (input_blocks, ...); "
                "renumbering them needs the base pipeline's unet/config.json: give the base folder."
            )
    try:
        out = loader.lora_state_dict(str(lora_file.parent), **kwargs)
    except CheckpointError:
        raise
    except Exception as err:  # diffusers' converters raise many types for keys they do not know
        raise CheckpointError(
            f"{label}: diffusers cannot read {lora_file.name} as a {loader.__name__} LoRA: {_brief(err)}"
        ) from err
    if len(out) == 3:
        state_dict, alphas, metadata = out
    else:
        (state_dict, metadata), alphas = out, None
    return dict(state_dict), alphas, metadata


def _unet_config(base_folder: Path) -> Any:
    """The base UNet's config with attribute access, as ``lora_state_dict`` reads ``unet_config.layers_per_block``."""
    from diffusers.configuration_utils import FrozenDict

    path = base_folder / "unet" / "config.json"
    try:
        return FrozenDict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read ({err}).") from None


def _brief(err: BaseException) -> str:
    """An exception's message on one line, cut to a readable length (diffusers lists every unknown key)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:400] + "..."


def _components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The loaded components of a ``model_index.json``: name -> (library, class); options and empty slots left out."""
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] and value[1]
    }


def _split_components(
    label: str,
    loader: type,
    state_dict: dict[str, torch.Tensor],
    index: dict[str, Any] | None,
    pipeline_class: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """The converted keys by component (their first dotted part); keys of components the pipeline lacks refused."""
    loadable = list(loader._lora_loadable_modules)
    present = None if index is None else set(_components(index))
    unplaced = [k for k in state_dict if k.partition(".")[0] not in loadable or "." not in k]
    if unplaced:
        kohya = [k for k in unplaced if k.startswith(_KOHYA_PREFIXES)]
        odd = [k for k in unplaced if not k.startswith(_KOHYA_PREFIXES)]
        if kohya and odd:
            raise CheckpointError(
                f"{label}: a kohya-format LoRA whose key {odd[0]!r} starts with none of "
                f"{', '.join(_KOHYA_PREFIXES)}; diffusers converts kohya keys only when all of them do. "
                "Is it a LoRA for this kind of pipeline?"
            )
        raise CheckpointError(
            f"{label}: LoRA key {unplaced[0]!r} belongs to no component {pipeline_class} loads LoRAs into "
            f"({', '.join(loadable)}); is it a LoRA for this kind of pipeline?"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        if present is not None and component not in present:
            raise CheckpointError(
                f"{label}: the LoRA adapts a {component} (key {key!r}), which the base pipeline does not have; "
                "is it a LoRA for this base?"
            )
        parts.setdefault(component, {})[rest] = value
    if not parts:
        raise CheckpointError(f"{label}: the LoRA holds no weights.")
    return parts


def _with_prefix(values: dict[str, Any] | None, component: str) -> dict[str, Any] | None:
    """The entries of ``component`` with its prefix removed (``None`` stays ``None``), as diffusers filters them."""
    if values is None:
        return None
    prefix = f"{component}."
    return {k.removeprefix(prefix): v for k, v in values.items() if k.startswith(prefix)}


def _has_text_model(loader: type, index: dict[str, Any] | None, component: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether the loaded text encoder has a ``text_model`` submodule (transformers 5 flattened CLIPTextModel).

    diffusers strips ``text_model.`` from LoRA keys when it has none, and module names follow. The class is the
    base's (``model_index.json``) or the one the pipeline declares, built on the meta device (nothing allocated);
    when it cannot be built, the LoRA's own names are kept.
    """
    model_class = None
    if index is not None:
        library, class_name = _components(index)[component]
        if library in ("transformers", "diffusers"):  # the index is input data: no other module is imported
            model_class = getattr(importlib.import_module(library), class_name, None)
    else:
        parameter = inspect.signature(loader.__init__).parameters.get(component)
        model_class = parameter.annotation if parameter is not None else None
    if isinstance(model_class, type) and hasattr(model_class, "config_class"):
        try:
            with torch.device("meta"):
                return hasattr(model_class(model_class.config_class()), "text_model")
        except Exception as err:  # transformers raises many types for a model it cannot build
            log.debug("cannot build %s to read its module names (%s)", model_class.__name__, _brief(err))
    return any(k.startswith("text_model.") for k in state)


def _model_factors(
    label: str,
    component: str,
    state: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
) -> dict[str, LoraFactors]:
    """A UNet or transformer's factors, as ``ModelMixin.load_lora_adapter`` (loaders/peft.py) configures them."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    if any(".lokr_" in k for k in state) or "lora_controlnet" in state:
        raise CheckpointError(f"{label}: LoKr and Control LoRAs are not supported for {component}, only LoRA.")
    if "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    ranks = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    return _factors(label, component, state, ranks, alphas, metadata, is_unet=True)


def _text_encoder_factors(
    label: str,
    component: str,
    state: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    has_text_model: bool,
) -> dict[str, LoraFactors]:
    """A text encoder's factors, as diffusers' ``_load_lora_into_text_encoder`` (loaders/lora_base.py) does."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    try:
        state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    except ValueError as err:
        raise CheckpointError(
            f"{label}: diffusers cannot read the {component} part of the LoRA ({err}); "
            "its keys are in no format diffusers knows for text encoders."
        ) from None
    if not has_text_model:
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    ranks = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match and match.group("part") == "B" and match.group("module").endswith(_TEXT_ENCODER_RANKED):
            ranks[key] = value.shape[1]
    return _factors(label, component, state, ranks, alphas, metadata, is_unet=False)


def _factors(
    label: str,
    component: str,
    state: dict[str, torch.Tensor],
    ranks: dict[str, int],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    *,
    is_unet: bool,
) -> dict[str, LoraFactors]:
    """Pairs ``lora_A``/``lora_B`` by module and gives each peft's scale under diffusers' ``LoraConfig``."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise CheckpointError(
                f"{label}: LoRA key {component}.{key} is not a LoRA factor diffusers can load "
                "(expected <module>.lora_A.weight / lora_B.weight after conversion; LoRA biases, LyCORIS and "
                "other adapter types are not supported)."
            )
        pairs.setdefault(match.group("module"), {})[match.group("part")] = value
    for module, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"{label}: LoRA module {component}.{module} lacks its down or up matrix.")
    if not ranks:
        raise CheckpointError(
            f"{label}: diffusers finds no rank for the {component} part of the LoRA "
            "(it adapts no module diffusers reads ranks from)."
        )
    config = _lora_config(label, component, state, ranks, alphas, metadata, is_unet)
    if config.use_dora or config.lora_bias:
        raise CheckpointError(f"{label}: DoRA and LoRA biases are not supported ({component}).")
    _warn_unused_alphas(label, component, config, pairs, alphas)
    factors: dict[str, LoraFactors] = {}
    for module, parts in pairs.items():
        if not check_target_module_exists(config, module):
            raise CheckpointError(
                f"{label}: the LoRA holds factors for {component}.{module}, which its own adapter config does not "
                "target; diffusers would skip them."
            )
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        if rank != parts["A"].shape[0]:
            raise CheckpointError(
                f"{label}: {component}.{module} has rank {parts['A'].shape[0]} but diffusers configures rank "
                f"{rank} for it, so diffusers cannot load this LoRA."
            )
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        factors[f"{module}.weight"] = LoraFactors(down=parts["A"], up=parts["B"], scale=float(scale))
    return factors


def _lora_config(
    label: str,
    component: str,
    state: dict[str, torch.Tensor],
    ranks: dict[str, int],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    is_unet: bool,
) -> Any:
    """The ``LoraConfig`` diffusers builds: the saved adapter metadata, else ``get_peft_kwargs`` (ranks, alphas)."""
    from diffusers.utils import get_peft_kwargs
    from peft import LoraConfig

    if alphas and metadata:
        raise CheckpointError(f"{label}: the LoRA has both kohya alphas and adapter metadata for {component}.")
    if metadata is not None and not metadata.get("target_modules"):
        raise CheckpointError(
            f"{label}: the LoRA's adapter metadata names no target modules for {component} (it was saved for the "
            "other components only), so diffusers cannot load it; save it again with metadata for every component."
        )
    kwargs = metadata if metadata is not None else get_peft_kwargs(ranks, alphas, state, is_unet=is_unet)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{label}: the {component} adapter metadata is not a valid LoRA config ({err})."
        ) from None


def _warn_unused_alphas(
    label: str, component: str, config: Any, pairs: dict[str, Any], alphas: dict[str, float] | None
) -> None:
    """Says when diffusers keys per-module alphas by names no module has, so they are not applied (as here)."""
    if not alphas or not config.alpha_pattern:
        return
    from peft.utils.other import get_pattern_key

    used = {get_pattern_key(config.alpha_pattern.keys(), m) for m in pairs}
    unused = [k for k in config.alpha_pattern if k not in used]
    if unused:
        log.warning(
            "%s: diffusers applies the default alpha %s instead of the LoRA's own alpha for %d %s module(s) "
            "(e.g. %s); the dense weights follow diffusers.",
            label,
            config.lora_alpha,
            len(unused),
            component,
            unused[0],
        )
