"""A peft LoRA adapter seen as the dense model it makes with its base, so adapters fuse like full fine-tunes.

For every weight the adapter targets, rows of ``W + s * B @ A`` are computed when the engine reads them (``s`` is
``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA; per-module ranks and alphas honoured); tensors the adapter saves
whole (``modules_to_save`` heads such as ``classifier``, trained biases) replace the base's. Names follow the task
model the adapter was trained on (``bert.encoder...`` for a ``BertForSequenceClassification`` adapter on a
``BertModel`` base), found by aligning the adapter's targets with the base's tensor names.

With ``float32=True`` the adapted weights of a 16-bit base are presented in float32 (``W`` upcast, the update added,
nothing rounded), so a fusion that subtracts the base again recovers the update itself rather than its rounding to
the base's precision: adapter outputs fuse this way.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hf_fusion.engine.checkpoint import Checkpoint, TensorEntry
from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS
from hf_fusion.engine.plan import align_names
from hf_fusion.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>embedding_A|embedding_B|A|B)(?:\.[^.]+)?(?:\.weight)?$")


@dataclass(frozen=True)
class LoraFactorPair:
    """One adapted weight's update ``scale * b @ a`` (``b`` ``[out, r]``, ``a`` ``[r, in]``, float32); the weight
    stores its transpose when ``transposed`` (GPT-2's Conv1D, embeddings); ``embedding`` marks peft's
    ``lora_embedding_A``/``_B`` keys."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool
    embedding: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def is_lora_adapter(folder: Path) -> bool:
    return folder.is_dir() and (folder / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """peft's per-module overrides (``rank_pattern``/``alpha_pattern``): the key matches a suffix of the module."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraCheckpoint(Checkpoint):
    """The dense tensors of ``base`` with a LoRA adapter merged in, computed lazily row slice by row slice."""

    def __init__(self, label: str, folder: Path, base: Checkpoint, *, float32: bool = False) -> None:
        config = _adapter_config(label, folder)
        self.config = config
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{label}: no adapter_model.safetensors (pickled adapters are not read).")
        lora, whole, embeddings = _split_adapter(label, load_file(weights))
        targets = {f"{m}.weight": m for m in lora}
        matched = align_names(sorted(targets), base.entries)
        missing = sorted(set(targets) - set(matched))
        if missing:
            raise CheckpointError(
                f"{label}: the adapter targets {missing[0]!r}, which the base {base.label} lacks; "
                "is it the adapter's base model?"
            )
        to_task = _naming(matched)
        self._base = base
        self._task_to_base: dict[str, str] = {}
        entries: dict[str, TensorEntry] = {}
        for base_name, base_entry in base.entries.items():
            task_name = to_task(base_name)
            if task_name is None:
                continue
            self._task_to_base[task_name] = base_name
            dtype, nbytes = base_entry.dtype, base_entry.nbytes
            if float32 and task_name in targets and dtype in ("F16", "BF16"):
                dtype, nbytes = "F32", base_entry.numel * 4
            entries[task_name] = TensorEntry(task_name, dtype, base_entry.shape, weights, 0, nbytes)
        self._whole = whole
        for name, value in whole.items():
            code = TORCH_TO_SAFETENSORS.get(value.dtype)
            if code is None:
                raise CheckpointError(f"{label}: tensor {name!r} has unsupported dtype {value.dtype}.")
            entries[name] = TensorEntry(
                name, code, tuple(value.shape), weights, 0, value.numel() * value.element_size()
            )
        shapes = {w: base.entries[matched[w]].shape for w in targets}
        self._deltas = _deltas(label, config, lora, targets, shapes, embeddings)
        super().__init__(label, entries, [weights])

    def base_name(self, name: str) -> str | None:
        """The base's name of this checkpoint's tensor ``name`` (None for a tensor only the adapter has)."""
        return self._task_to_base.get(name)

    @property
    def saved_whole(self) -> list[str]:
        """Tensors the adapter stores whole (``modules_to_save``, trained biases), by this checkpoint's names."""
        return list(self._whole)

    def factor_pairs(self) -> dict[str, LoraFactorPair]:
        """The update of every adapted weight, by the base's tensor name."""
        return {self._task_to_base[name]: pair for name, pair in self._deltas.items()}

    def read_rows(self, name: str, row_start: int, row_stop: int, out: torch.Tensor) -> None:
        whole = self._whole.get(name)
        if whole is not None:
            rows = whole.reshape(1) if whole.dim() == 0 else whole[row_start:row_stop]
            raw = rows.contiguous().reshape(-1).view(torch.uint8)
            out[: raw.numel()].copy_(raw)
            return
        base_name = self._task_to_base[name]
        stored = self._base.entries[base_name]
        if stored.dtype != self.entries[name].dtype:  # a 16-bit base weight presented in float32
            raw = torch.empty(stored.nbytes * (row_stop - row_start) // stored.rows, dtype=torch.uint8)
            self._base.read_rows(base_name, row_start, row_stop, raw)
            upcast = rows_view(raw, stored, row_stop - row_start).float()
            rows_view(out, self.entries[name], row_stop - row_start).copy_(upcast)
        else:
            self._base.read_rows(base_name, row_start, row_stop, out)
        pair = self._deltas.get(name)
        if pair is None:
            return
        weight = rows_view(out, self.entries[name], row_stop - row_start)
        a, b = pair.a, pair.b
        update = a[:, row_start:row_stop].T @ b.T if pair.transposed else b[row_start:row_stop] @ a
        add_scaled(weight, update, pair.scale)


def rows_view(out: torch.Tensor, entry: TensorEntry, rows: int) -> torch.Tensor:
    """``rows`` rows of ``entry`` read into the raw byte buffer ``out``, viewed in the stored dtype and shape."""
    dtype = SAFETENSORS_TO_TORCH[entry.dtype]
    return out[: entry.nbytes * rows // entry.rows].view(dtype).view(rows, *entry.shape[1:])


def add_scaled(weight: torch.Tensor, update: torch.Tensor, scale: float) -> None:
    """``weight += scale * update`` computed in float32 and rounded once to the weight's dtype, in place."""
    weight.copy_((weight.float() + update.view(weight.shape) * scale).to(weight.dtype))


def _layout(
    name: str, shape: tuple[int, ...], a: torch.Tensor, b: torch.Tensor, fan_in_fan_out: bool, label: str
) -> bool:
    """Whether the weight stores ``(B @ A).T`` (Conv1D, embeddings) rather than ``B @ A`` (Linear). Embedding
    factors are always transposed (peft's ``lora_embedding_A`` is ``[r, num_embeddings]``), also when the table is
    square; ``fan_in_fan_out`` arrives here as True for them."""
    straight = shape == (b.shape[0], a.shape[1])
    transposed = shape == (a.shape[1], b.shape[0])
    if not straight and not transposed:
        raise CheckpointError(
            f"{label}: LoRA matrices of {name!r} ({list(b.shape)} x {list(a.shape)}) do not fit the base weight "
            f"{list(shape)}."
        )
    return transposed if not straight else (transposed and fan_in_fan_out)


def _naming(matched: dict[str, str]):  # type: ignore[no-untyped-def]
    """How base names become task-model names, from the adapter targets' alignment (one prefix added or removed)."""
    added = {t[: -len(b)] for t, b in matched.items() if t != b and t.endswith(b)}
    removed = {b[: -len(t)] for t, b in matched.items() if t != b and b.endswith(t)}
    if not added and not removed:
        return lambda base_name: base_name
    if len(added) == 1 and not removed:
        prefix = added.pop()
        return lambda base_name: prefix + base_name
    if len(removed) == 1 and not added:
        prefix = removed.pop()
        return lambda base_name: base_name[len(prefix) :] if base_name.startswith(prefix) else None
    raise CheckpointError("the adapter's module names do not map onto the base's tensor names by one prefix.")


def _adapter_config(label: str, folder: Path) -> dict[str, Any]:
    """The adapter's peft config, refused unless it is plain LoRA (DoRA and other peft types are not read)."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{label}: {ADAPTER_CONFIG} cannot be read ({err}).") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{label}: {config.get('peft_type')} adapters are not supported, only LoRA.")
    if config.get("use_dora"):
        raise CheckpointError(
            f"{label}: DoRA adapters are not supported; merge them with peft's merge_and_unload "
            "and fuse the merged model."
        )
    return config


def _split_adapter(
    label: str, stored: dict[str, torch.Tensor]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], set[str]]:
    """The adapter's tensors as LoRA factors per module ({"A", "B"}), whole tensors (saved modules, heads) and the
    modules whose factors are embedding factors."""
    raw = {k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k: v for k, v in stored.items()}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    embeddings: set[str] = set()
    for key, value in raw.items():
        match = _LORA_KEY.match(key)
        if match:
            kind = match.group("kind")
            if kind.startswith("embedding_"):
                embeddings.add(match.group("module"))
            lora.setdefault(match.group("module"), {})[kind.replace("embedding_", "")] = value
        elif "lora_magnitude_vector" in key:
            raise CheckpointError(f"{label}: DoRA magnitude vectors are not supported.")
        else:
            whole[key] = value
    for module, parts in lora.items():
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"{label}: LoRA module {module!r} lacks its A or B matrix.")
    return lora, whole, embeddings


def _deltas(
    label: str,
    config: dict[str, Any],
    lora: dict[str, dict[str, torch.Tensor]],
    targets: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
    embeddings: set[str],
) -> dict[str, LoraFactorPair]:
    """Each adapted weight's factors, scale (alpha / rank, or / sqrt(rank) with rsLoRA, per-module patterns
    applied) and layout."""
    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", r_default)
    deltas: dict[str, LoraFactorPair] = {}
    for weight_name, module in targets.items():
        a, b = lora[module]["A"].float(), lora[module]["B"].float()
        rank = _pattern_value(config.get("rank_pattern") or {}, module, a.shape[0])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha_default)
        scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        fan_in_fan_out = bool(config.get("fan_in_fan_out")) or module in embeddings
        transposed = _layout(weight_name, shapes[weight_name], a, b, fan_in_fan_out, label)
        deltas[weight_name] = LoraFactorPair(a, b, scale, transposed, module in embeddings)
    return deltas
