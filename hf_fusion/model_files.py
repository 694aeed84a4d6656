"""Model folders: locating them, reading their config, and carrying config and tokenizer files to the output."""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_fusion.errors import CheckpointError, IncompatibleModelsError, RecipeError
from hf_fusion.recipe import ModelRef, path_exists

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")

# What travels with fused weights, by file name: an allow-list, so nothing else in an input folder (notes,
# credentials, keys, code, private subfolders) can reach an output or a Hub repo.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "source.spm",
    "target.spm",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
    "feature_extractor_config.json",
)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
SIDE_FILES = CONFIG_FILES + TOKENIZER_FILES + PROCESSOR_FILES + SENTENCE_TRANSFORMERS_FILES
# Files hf-fusion itself writes into an output folder, beside the weights and the side files.
WRITTEN_FILES = (
    "README.md",
    "fusion_recipe.yaml",
    "evaluation.json",
    "merging_weights.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "model_index.json",  # a diffusers pipeline's index, and its scheduler (a component folder)
    "scheduler_config.json",
    "comparison.png",  # what `hf-fusion compare-images` drew for the card, and its scores
    "comparison.json",
    "adapter_config.json",  # an adapter `hf-fusion extract-lora` wrote, and its per-module energy report
    "extraction.json",
    "ensemble.py",  # the modeling code of hf-fusion's own architectures (hf_fusion.fusion.remote_code)
    "upscaled.py",
    "members.py",
    "adapter_fusion.json",  # an adapter output's route and per-module rank and energy
)
MODULE_CONFIG = "config.json"  # the only file copied from a sentence-transformers module folder (1_Pooling/...)


def local_folder(ref: ModelRef) -> Path:
    """The local folder (or weights file) of ``ref``; raises when it does not exist."""
    path = Path(ref.path).expanduser()
    if not path_exists(path):
        raise RecipeError(f"model {ref} not found: no such local folder.")
    if ref.revision:
        raise RecipeError(f"model {ref}: a revision only applies to Hub repo ids, not to the local path {path}.")
    return path


def read_config(folder: Path) -> dict[str, Any] | None:
    """``config.json`` of a model folder, or ``None`` if it has none."""
    path = folder / "config.json" if folder.is_dir() else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read as JSON ({err}).") from None
    return data if isinstance(data, dict) else None


def describe_architecture(config: dict[str, Any] | None) -> str:
    if not config:
        return "unknown architecture"
    archs = config.get("architectures") or []
    model_type = config.get("model_type", "?")
    return f"{archs[0]} ({model_type})" if archs else str(model_type)


def check_same_architecture(labels: Sequence[str], configs: Sequence[dict[str, Any] | None]) -> None:
    """The fused models must share a ``model_type``; a mismatch is named before any weights are read."""
    known = [(label, cfg) for label, cfg in zip(labels, configs) if cfg and cfg.get("model_type")]
    if not known:
        return
    first_label, first = known[0]
    for label, cfg in known[1:]:
        if cfg.get("model_type") != first.get("model_type"):
            raise IncompatibleModelsError(
                f"the models have different architectures: {first_label} is {describe_architecture(first)}, "
                f"{label} is {describe_architecture(cfg)}."
            )


def same_architecture(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if not a or not b:
        return a is None and b is None
    return a.get("model_type") == b.get("model_type") and a.get("architectures") == b.get("architectures")


def is_tokenizer_file(name: str) -> bool:
    """A tokenizer or chat template file, by name (no subfolders)."""
    return "/" not in name and any(fnmatch.fnmatchcase(name, pattern) for pattern in TOKENIZER_FILES)


def has_tokenizer(folder: Path) -> bool:
    """Whether a model folder holds tokenizer files."""
    return folder.is_dir() and any(is_tokenizer_file(p.name) and p.is_file() for p in folder.iterdir())


def remove_tokenizer_files(dest: Path) -> None:
    """Removes the tokenizer files copied into an output folder, before another tokenizer is written there."""
    for path in dest.iterdir():
        if is_tokenizer_file(path.name) and path.is_file():
            path.unlink()


def is_side_file(name: str) -> bool:
    """Config, generation config, tokenizer, processor and sentence-transformers files, by name (no subfolders)."""
    return "/" not in name and any(fnmatch.fnmatchcase(name, pattern) for pattern in SIDE_FILES)


def output_file_patterns() -> list[str]:
    """Patterns of every file an output folder may hold, at its top level or in a per-model or module subfolder;
    pushing uploads only these."""
    names = [*SIDE_FILES, *WRITTEN_FILES]
    return [*names, *(f"*/{name}" for name in names)]


def _module_folders(folder: Path) -> list[str]:
    """The sentence-transformers module folders that ``modules.json`` names (``1_Pooling``...), confined to
    ``folder``: a module path that is absolute, climbs out or is a link is not followed."""
    path = folder / "modules.json"
    if not path.is_file():
        return []
    try:
        modules = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    names = []
    for module in modules if isinstance(modules, list) else []:
        name = module.get("path") if isinstance(module, dict) else None
        if isinstance(name, str) and name and "/" not in name and "\\" not in name and name not in (".", ".."):
            candidate = folder / name
            if candidate.is_dir() and candidate.resolve().is_relative_to(confinement_root(folder)):
                names.append(name)
    return names


def confinement_root(folder: Path) -> Path:
    """What a model folder's files may point into: the folder itself, or for a Hugging Face cache snapshot
    (``snapshots/<commit>/`` whose files link to ``../../blobs/``) the cached repo's own folder."""
    folder = folder.resolve()
    return folder.parent.parent if folder.parent.name == "snapshots" else folder


def _copy_file(path: Path, dest: Path, root: Path) -> bool:
    """Copies a regular file; a link is followed only when it stays inside ``root`` (the cache's blobs), never to
    another file of the machine."""
    if not path.is_file() or (path.is_symlink() and not path.resolve().is_relative_to(root)):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dest)
    return True


def copy_side_files(reference: Path, others: Sequence[Path], dest: Path) -> list[str]:
    """Copies the allow-listed side files (:data:`SIDE_FILES`) of the reference model into ``dest``.

    What the reference lacks (``config.json`` of a LoRA adapter folder; the processor a fine-tuned vision tower was
    saved without) is taken from the first other model that has it. Sentence-transformers module folders named in
    ``modules.json`` bring their ``config.json``. Nothing else is copied: no code (remote code must come from its
    author), no weights of other formats, no notes or credentials that happen to sit in a model folder.
    """
    copied: list[str] = []
    if reference.is_dir():
        root = confinement_root(reference)
        for path in sorted(reference.iterdir()):
            if is_side_file(path.name) and _copy_file(path, dest / path.name, root):
                copied.append(path.name)
        for module in _module_folders(reference):
            if _copy_file(reference / module / MODULE_CONFIG, dest / module / MODULE_CONFIG, root):
                copied.append(f"{module}/{MODULE_CONFIG}")
    wanted = [
        ("config", lambda name: name == "config.json"),
        ("tokenizer", is_tokenizer_file),
    ]
    for kind, matches in wanted:
        if any(matches(name) for name in copied):
            continue
        for other in others:
            extra = (
                [p for p in sorted(other.iterdir()) if is_side_file(p.name) and matches(p.name)]
                if other.is_dir()
                else []
            )
            extra = [p for p in extra if _copy_file(p, dest / p.name, confinement_root(other))]
            if extra:
                copied += [p.name for p in extra]
                log.info("%s files taken from %s", kind, other)
                break
    for name in copied:
        if name.endswith(".json"):
            _drop_code_references(dest / name)
    return copied


# config.json keys that name Python files of the model's repo; those files are never copied, so the keys go.
CODE_KEYS = ("auto_map", "custom_pipelines")


def _drop_code_references(path: Path) -> None:
    """Removes ``auto_map`` (and the like) from a copied config, tokenizer or processor file: it names code the
    output does not have."""
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    dropped = [key for key in CODE_KEYS if key in config]
    if dropped:
        for key in dropped:
            config.pop(key)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        log.info("dropped %s from %s: the code it names is not copied into the output", ", ".join(dropped), path.name)


def set_config_dtype(dest: Path, torch_name: str) -> None:
    """Records the output dtype in ``config.json`` so ``from_pretrained(dtype="auto")`` picks it."""
    path = dest / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = torch_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
"""config.json keys that hold the number of layers, under the names architectures give it."""


def config_layers(config: dict[str, Any] | None) -> int | None:
    """The number of layers a config declares, or None when it names none."""
    for key in LAYER_COUNT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def set_config_layers(dest: Path, origins: Sequence[tuple[dict[str, Any] | None, int]]) -> None:
    """Rewrites ``dest/config.json`` for a stack of ``len(origins)`` layers, the ``k``-th being layer ``j`` of the
    model whose config is ``origins[k] = (config, j)``.

    The layer count is set under every key the config has (:data:`LAYER_COUNT_KEYS`). A list with one entry per
    layer (``layer_types`` of Qwen2, Gemma, Mistral...: any top-level list as long as the config's layer count) is
    rebuilt from each origin's entry, so a layer keeps its own attention type; when an origin lacks that list the
    key is dropped and transformers derives it again from its defaults.
    """
    path = dest / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    before = config_layers(config)
    for key in LAYER_COUNT_KEYS:
        if key in config:
            config[key] = len(origins)
    per_layer = [k for k, v in config.items() if isinstance(v, list) and before is not None and len(v) == before]
    for key in per_layer:
        values = [(cfg or {}).get(key) for cfg, _ in origins]
        if all(isinstance(v, list) and j < len(v) for v, (_, j) in zip(values, origins)):
            config[key] = [v[j] for v, (_, j) in zip(values, origins)]  # type: ignore[index]
        else:
            log.warning("%s: an input's config lacks its per-layer %r; dropped from the output config", path, key)
            config.pop(key)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def set_config_vocab_size(dest: Path, rows: int) -> None:
    """Records the output's embedding rows as ``vocab_size`` in ``config.json`` (and in a nested ``text_config``)."""
    path = dest / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config["vocab_size"] = rows
    if isinstance(config.get("text_config"), dict) and "vocab_size" in config["text_config"]:
        config["text_config"]["vocab_size"] = rows
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def config_vocab_size(config: dict[str, Any] | None) -> int | None:
    """A config's ``vocab_size`` (a nested ``text_config``'s for multimodal models), if it states one."""
    if not config:
        return None
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("vocab_size")
    return size if isinstance(size, int) else None
