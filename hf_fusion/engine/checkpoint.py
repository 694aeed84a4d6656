"""Lazy, bounded-memory access to the tensors of a checkpoint folder.

A safetensors file is an 8-byte header length, a JSON header and raw little-endian data. Reading the header gives
names, dtypes, shapes and offsets for a few KB; tensor data is then read with ``pread`` straight into the engine's
reusable buffers, row range by row range. (``safetensors.safe_open`` memory-maps the file instead, which makes the
resident set grow with every byte touched; the engine's peak memory must not grow with model size.)

Pickle checkpoints (``.bin``/``.pt``) can run code when loaded, so they are refused unless the caller opts in; even
then they are loaded with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, itemsize
from hf_fusion.errors import CheckpointError, PickleCheckpointError

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``start`` is its absolute byte offset in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return self.numel // self.rows if self.rows else 0


class Checkpoint(ABC):
    """The tensors of one model, by name, in storage order."""

    def __init__(self, label: str, entries: dict[str, TensorEntry], weight_files: list[Path]) -> None:
        self.label = label
        self.entries = entries
        self.weight_files = weight_files

    @property
    def weights_stem(self) -> str:
        """``model`` for ``model.safetensors`` / ``model.safetensors.index.json``; used to name the output."""
        first = self.weight_files[0].name
        stem = first.split(".safetensors")[0].split(".bin")[0]
        if "-of-" in stem:
            stem = stem.rsplit("-", 3)[0]
        return stem

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @abstractmethod
    def read_rows(self, name: str, row_start: int, row_stop: int, out: torch.Tensor) -> None:
        """Copies rows ``[row_start, row_stop)`` of tensor ``name`` as raw bytes into the uint8 tensor ``out``."""

    def close(self) -> None:  # noqa: B027 - a checkpoint without open files has nothing to release
        """Releases open files."""


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, label: str, files: list[Path], weight_map: dict[str, str] | None = None) -> None:
        entries: dict[str, TensorEntry] = {}
        for path in files:
            for entry in read_safetensors_entries(path):
                if weight_map is not None and weight_map.get(entry.name, path.name) != path.name:
                    continue
                if entry.name in entries:
                    raise CheckpointError(f"{label}: tensor {entry.name!r} is stored in two shards of the checkpoint.")
                entries[entry.name] = entry
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(entries))
            if missing:
                raise CheckpointError(
                    f"{label}: the index names {len(missing)} tensor(s) that its shards do not hold, "
                    f"e.g. {missing[0]!r} in {weight_map[missing[0]]!r}."
                )
        super().__init__(label, entries, files)
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_rows(self, name: str, row_start: int, row_stop: int, out: torch.Tensor) -> None:
        entry = self.entries[name]
        row_bytes = entry.nbytes // entry.rows if entry.rows else 0
        offset = entry.start + row_start * row_bytes
        view = memoryview(out.numpy()).cast("B")[: (row_stop - row_start) * row_bytes]
        fd = self._fd(entry.file)
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.label}: {entry.file.name} ended while reading tensor {name!r}.")
            done += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class PickleCheckpoint(Checkpoint):
    """A ``torch.save`` checkpoint, loaded with ``weights_only=True`` and memory-mapped (opt-in only)."""

    def __init__(self, label: str, files: list[Path]) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, TensorEntry] = {}
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises many types for a corrupt pickle
                raise CheckpointError(f"{label}: cannot load {path.name} as a weights-only checkpoint: {err}") from err
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise CheckpointError(f"{label}: {path.name} does not hold a state dict.")
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor):
                    continue
                code = TORCH_TO_SAFETENSORS.get(tensor.dtype)
                if code is None:
                    raise CheckpointError(f"{label}: tensor {name!r} has unsupported dtype {tensor.dtype}.")
                self._tensors[name] = tensor
                entries[name] = TensorEntry(
                    name, code, tuple(tensor.shape), path, 0, tensor.numel() * tensor.element_size()
                )
        super().__init__(label, entries, files)

    def read_rows(self, name: str, row_start: int, row_stop: int, out: torch.Tensor) -> None:
        tensor = self._tensors[name]
        rows = tensor.reshape(1) if tensor.dim() == 0 else tensor[row_start:row_stop]
        raw = rows.contiguous().reshape(-1).view(torch.uint8)
        out[: raw.numel()].copy_(raw)


def read_safetensors_entries(path: Path) -> Iterator[TensorEntry]:
    """Parses and checks a safetensors header; raises :class:`CheckpointError` for a malformed or truncated file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is truncated (shorter than a safetensors header).")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header of {header_len} bytes in a {size}-byte file); "
                    "it may be truncated or not safetensors at all."
                )
            raw = f.read(header_len)
    except PermissionError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror}).") from err
    except IsADirectoryError as err:
        raise CheckpointError(f"{path}: is a folder, expected a safetensors file.") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({err}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object.")
    data_start = 8 + header_len
    data_size = size - data_start
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry for {name!r} is malformed.") from None
        entries.append(HeaderEntry(name, dtype, shape, begin, end))
    for entry in check_layout(str(path), entries, data_size):
        yield TensorEntry(
            entry.name, entry.dtype, tuple(entry.shape), path, data_start + entry.begin, entry.end - entry.begin
        )


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as a safetensors header declares it, before any check."""

    name: str
    dtype: object
    shape: object
    begin: object
    end: object


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_layout(label: str, entries: list[HeaderEntry], data_size: int | None) -> list[HeaderEntry]:
    """Checks a header as the safetensors library does; returns the entries in data order.

    Dimensions and offsets are non-negative integers, each tensor's byte range matches its shape and dtype, and
    the ranges tile the data section exactly: no two tensors share bytes, no gaps, and (when the data size is
    known) nothing past its end or left over.
    """
    for e in entries:
        if e.dtype not in SAFETENSORS_TO_TORCH:
            raise CheckpointError(f"{label}: tensor {e.name!r} has unsupported dtype {e.dtype!r}.")
        if not isinstance(e.shape, list) or not all(_is_index(d) for d in e.shape):
            raise CheckpointError(
                f"{label}: tensor {e.name!r} has an invalid shape {e.shape!r} "
                "(dimensions must be non-negative integers)."
            )
        if not (_is_index(e.begin) and _is_index(e.end)) or e.end < e.begin:  # type: ignore[operator]
            raise CheckpointError(f"{label}: tensor {e.name!r} has invalid data offsets [{e.begin!r}, {e.end!r}].")
        numel = 1
        for d in e.shape:
            numel *= d
        if e.end - e.begin != numel * itemsize(e.dtype):  # type: ignore[operator]
            raise CheckpointError(
                f"{label}: tensor {e.name!r} declares shape {e.shape} {e.dtype} but {e.end - e.begin} bytes of data."
            )  # type: ignore[operator]
    ordered = sorted(entries, key=lambda e: (e.begin, e.end))  # type: ignore[arg-type, return-value]
    position = 0
    for e in ordered:
        if e.begin != position:
            problem = "overlaps the tensor before it" if e.begin < position else "leaves a gap before it"  # type: ignore[operator]
            raise CheckpointError(
                f"{label}: tensor {e.name!r} {problem} (data offsets [{e.begin}, {e.end}]); "
                "not a valid safetensors file."
            )
        position = e.end  # type: ignore[assignment]
    if data_size is not None and position > data_size:
        raise CheckpointError(
            f"{label}: file is truncated: tensor {ordered[-1].name!r} ends at data byte "
            f"{position}, the file holds {data_size} bytes of data."
        )
    if data_size is not None and position < data_size:
        raise CheckpointError(
            f"{label}: {data_size - position} bytes after the last tensor; not a valid safetensors file."
        )
    return ordered


def choose_weight_files(names: list[str], variant: str | None = None) -> tuple[str, list[str], str | None]:
    """Picks a model's weights from its file names: ``("safetensors" | "pickle", files, index or None)``.

    Prefers ``model.safetensors[.index.json]``, then any single safetensors index or file (diffusers and peft name
    theirs differently), then pickles. With an index, ``files`` is empty: the index lists the shards. Only top-level
    files count. ``variant`` (``fp16``) picks that variant's files where there are some, as diffusers does; else,
    and without it, the plain files (or the only variant present).
    """
    top = sorted(n for n in names if "/" not in n)
    if variant is not None and any(weight_variant(n) == variant for n in top):  # as diffusers: else the plain files
        top = [n for n in top if weight_variant(n) == variant or not _is_weight_name(n)]
    else:
        top = _without_variants(top)
    for kind, suffix, preferred_index, preferred in (
        ("safetensors", ".safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("pickle", ".bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if preferred_index in top:
            return kind, [], preferred_index
        if preferred in top:
            return kind, [preferred], None
        indexes = [n for n in top if n.endswith(f"{suffix}.index.json") or f"{suffix}.index." in n]
        if len(indexes) == 1:
            return kind, [], indexes[0]
        suffixes = (suffix,) if kind == "safetensors" else PICKLE_SUFFIXES
        files = [n for n in top if n.endswith(suffixes) and n not in NOT_WEIGHTS]
        if len(files) == 1:
            return kind, files, None
        if len(files) > 1 or len(indexes) > 1:
            raise CheckpointError(
                f"several {kind} weight files and no index to tell them apart ({', '.join(indexes or files)})."
            )
    raise CheckpointError("no weights found (looked for *.safetensors and *.bin).")


_VARIANT_FILE = re.compile(r"^[^.]+\.(?P<variant>[A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")
_VARIANT_INDEX = re.compile(r"^[^.]+\.(?:safetensors|bin)\.index\.(?P<variant>[A-Za-z0-9_]+)\.json$")


def weight_variant(name: str) -> str | None:
    """The variant a weight file belongs to (``fp16`` for ``diffusion_pytorch_model.fp16.safetensors`` and
    ``...safetensors.index.fp16.json``), or None for plain weights."""
    match = _VARIANT_FILE.match(name) or _VARIANT_INDEX.match(name)
    return match.group("variant") if match else None


def _is_weight_name(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or (".index" in name and name.endswith(".json"))


def _without_variants(names: list[str]) -> list[str]:
    """The plain weights when a folder also holds variants (``fp16`` copies beside full precision, as diffusers
    saves them); a folder holding only one variant is read from it."""
    weights = [n for n in names if n.endswith((".safetensors", ".bin", ".json")) and weight_variant(n) is not None]
    if not weights:
        return names
    plain = [n for n in names if weight_variant(n) is None and n.endswith((".safetensors", ".bin"))]
    if plain or len({weight_variant(n) for n in weights}) > 1:
        return [n for n in names if n not in weights]
    return names


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index file."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a valid weights index ({err}).") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid weights index (weight_map is not a mapping).")
    return weight_map


def find_weight_files(folder: Path, variant: str | None = None) -> tuple[str, list[Path], dict[str, str] | None]:
    """A folder's weights (``variant``'s when it has them): ``("safetensors" | "pickle", files, weight_map or
    None)``."""
    try:
        kind, files, index = choose_weight_files([p.name for p in folder.iterdir() if p.is_file()], variant)
    except CheckpointError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    if index is None:
        return kind, [folder / f for f in files], None
    weight_map = read_weight_map(folder / index)
    shards = []
    for shard in dict.fromkeys(weight_map.values()):
        path = folder / shard
        if not path.is_file():
            raise CheckpointError(f"{folder / index}: names shard {shard!r}, which is missing from {folder}.")
        shards.append(path)
    return kind, shards, weight_map


def open_checkpoint(path: Path, label: str, *, allow_pickle: bool = False, variant: str | None = None) -> Checkpoint:
    """Opens a model folder (or a single weights file) for lazy reading; only headers are read here."""
    if not path.exists():
        raise CheckpointError(f"{label}: {path} does not exist.")
    if path.is_file():
        kind, files, weight_map = ("safetensors" if path.suffix == ".safetensors" else "pickle"), [path], None
    else:
        kind, files, weight_map = find_weight_files(path, variant)
    if kind == "pickle":
        if not allow_pickle:
            raise PickleCheckpointError(
                f"{label}: weights are a pickle ({files[0].name}), which can run arbitrary code when loaded. "
                "Convert the model to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it."
            )
        log.warning("%s: loading pickle checkpoint %s (weights only)", label, files[0].name)
        return PickleCheckpoint(label, files)
    return SafetensorsCheckpoint(label, files, weight_map)
