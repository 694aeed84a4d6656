"""Model folders: locating them, reading their config, and carrying config and tokenizer files to the output."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from hf_fusion.errors import CheckpointError, IncompatibleModelsError, RecipeError
from hf_fusion.recipe import ModelRef

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
SKIPPED_FILES = {"README.md", ".gitattributes", "fusion_recipe.yaml", "adapter_config.json", "evaluation.json"}
TOKENIZER_HINTS = ("tokenizer", "vocab", "merges.txt", "spiece.model", "special_tokens_map", ".tiktoken",
                   "preprocessor_config", "processor_config", "chat_template")


def local_folder(ref: ModelRef) -> Path:
    """The local folder (or weights file) of ``ref``; raises when it does not exist."""
    path = Path(ref.path).expanduser()
    if not path.exists():
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


def is_side_file(name: str) -> bool:
    """Config, generation config, tokenizer and processor files: what travels with fused weights."""
    return (
        "/" not in name
        and not name.startswith(".")
        and name not in SKIPPED_FILES
        and not name.endswith(WEIGHT_SUFFIXES)
        and not name.endswith(".index.json")
        and not name.endswith(".py")
    )


def _is_side_file(path: Path) -> bool:
    return path.is_file() and is_side_file(path.name)


def _is_config_folder(path: Path, limit: int = 1 << 20) -> bool:
    """A small subfolder holding only configuration files (no weights, no code)."""
    if not path.is_dir() or path.name.startswith("."):
        return False
    files = [p for p in path.rglob("*") if p.is_file()]
    return bool(files) and all(is_side_file(p.name) for p in files) and sum(p.stat().st_size for p in files) < limit


def copy_side_files(reference: Path, others: Sequence[Path], dest: Path) -> list[str]:
    """Copies config, generation config and tokenizer/processor files from the reference model.

    What the reference lacks (``config.json`` of a LoRA adapter folder; the processor a fine-tuned vision tower was
    saved without) is taken from the first other model that has it. Python files are never copied: remote code
    must come from its author, not ride along with a fused model.
    """
    copied: list[str] = []
    if reference.is_dir():
        for path in sorted(reference.iterdir()):
            if _is_side_file(path):
                shutil.copy2(path, dest / path.name)
                copied.append(path.name)
            elif _is_config_folder(path):  # sentence-transformers modules (1_Pooling/config.json ...)
                shutil.copytree(path, dest / path.name)
                copied.append(path.name + "/")
    wanted = [("config", lambda name: name == "config.json"),
              ("tokenizer", lambda name: any(h in name for h in TOKENIZER_HINTS))]
    for kind, matches in wanted:
        if any(matches(name) for name in copied):
            continue
        for other in others:
            extra = [p for p in sorted(other.iterdir()) if _is_side_file(p) and matches(p.name)] if other.is_dir() else []
            if extra:
                for path in extra:
                    shutil.copy2(path, dest / path.name)
                    copied.append(path.name)
                log.info("%s files taken from %s", kind, other)
                break
    return copied


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
