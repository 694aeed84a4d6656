"""The fusion plan: which tensors are fused, which are copied, in what dtype and order, checked from headers alone.

Rules:
- The models being fused must hold the same tensor names and shapes; the first difference is reported by model and
  tensor name. The base may hold more tensors (a full CLIP model as the base of vision-tower experts); those extra
  tensors are left out of the output.
- Floating-point tensors are fused. Integer and boolean tensors (position ids, masks) and tensors matching an
  ``exclude`` pattern are copied unchanged from the base (or, without one, from the first model).
- Tied tensors: one model may store a tied copy that another omits (``lm_head.weight`` saved next to the
  embeddings). Names whose bytes are identical in every model that stores both are twins: a model lacking one
  reads the other, and twins of such a class fuse under one key, so randomness and statistics agree and the tied
  weights stay identical. Twins that every model stores (or tensors that are merely equal, like untouched
  LayerNorms) stay independent.
- Output order and default dtypes follow the reference model (the base when it is the same architecture as the
  models, otherwise the first model).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from hf_fusion.engine.checkpoint import Checkpoint, TensorEntry
from hf_fusion.engine.dtypes import is_floating
from hf_fusion.engine.writer import OutputTensor
from hf_fusion.errors import IncompatibleModelsError

log = logging.getLogger(__name__)

_FINGERPRINT_BYTES = 64


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor. ``reads`` maps a checkpoint index to the tensor name to read there."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    fuse: bool
    key: str
    reads: dict[int, str] = field(hash=False)

    @property
    def output(self) -> OutputTensor:
        return OutputTensor(self.name, self.out_dtype, self.shape)


@dataclass
class FusionPlan:
    checkpoints: list[Checkpoint]
    base: int | None
    experts: list[int]
    reference: int
    tensors: list[PlannedTensor]
    aliases: dict[str, str]
    dropped_base_tensors: list[str]

    @property
    def fused(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.fuse]

    def output_tensors(self) -> list[OutputTensor]:
        return [t.output for t in self.tensors]

    @property
    def output_bytes(self) -> int:
        return sum(t.output.nbytes for t in self.tensors)

    def input_bytes(self, uses_base: bool) -> int:
        sources = self.experts + ([self.base] if uses_base and self.base is not None else [])
        total = 0
        for t in self.tensors:
            for index in sources if t.fuse else [next(iter(t.reads))]:
                if index in t.reads:
                    total += self.checkpoints[index].entries[t.reads[index]].nbytes
        return total


def _entry_bytes(ckpt: Checkpoint, entry: TensorEntry, start: int, length: int) -> bytes:
    """Raw bytes ``[start, start+length)`` of a tensor, read through the row reader (rows are whole)."""
    out = torch.empty(entry.nbytes, dtype=torch.uint8)
    ckpt.read_rows(entry.name, 0, entry.rows, out)
    return bytes(out[start : start + length].numpy())


def _fingerprint(ckpt: Checkpoint, entry: TensorEntry) -> bytes:
    if entry.nbytes <= 3 * _FINGERPRINT_BYTES:
        return _entry_bytes(ckpt, entry, 0, entry.nbytes)
    row_bytes = entry.nbytes // entry.rows
    picks = sorted({0, entry.rows // 2, entry.rows - 1})
    chunks = []
    for row in picks:
        buf = torch.empty(row_bytes, dtype=torch.uint8)
        ckpt.read_rows(entry.name, row, row + 1, buf)
        chunks.append(bytes(buf[:_FINGERPRINT_BYTES].numpy()))
    return b"".join(chunks)


def _identical(ckpt: Checkpoint, a: str, b: str) -> bool:
    ea, eb = ckpt.entries[a], ckpt.entries[b]
    if ea.dtype != eb.dtype or ea.shape != eb.shape:
        return False
    step = max(1, (16 << 20) // max(1, ea.nbytes // max(1, ea.rows)))
    for row in range(0, ea.rows, step):
        stop = min(ea.rows, row + step)
        size = (stop - row) * (ea.nbytes // max(1, ea.rows))
        ba, bb = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
        ckpt.read_rows(a, row, stop, ba)
        ckpt.read_rows(b, row, stop, bb)
        if not torch.equal(ba, bb):
            return False
    return True


def find_aliases(
    checkpoints: Sequence[Checkpoint], models: Sequence[int], ignore: Collection[str] = ()
) -> dict[str, str]:
    """Maps every tied name to its class's primary: names byte-identical in every model that stores both.

    The primary is the member most models store, so that statistics and random streams key on a stable name.
    Names in ``ignore`` (copied, never fused) are not looked at.
    """
    candidates: list[tuple[str, str]] = []
    for index in models:
        ckpt = checkpoints[index]
        groups: dict[tuple[str, tuple[int, ...]], list[str]] = {}
        for entry in ckpt.entries.values():
            if is_floating(entry.dtype) and entry.numel > 0 and entry.name not in ignore:
                groups.setdefault((entry.dtype, entry.shape), []).append(entry.name)
        for names in groups.values():
            if len(names) < 2:
                continue
            by_print: dict[bytes, list[str]] = {}
            for name in names:
                by_print.setdefault(_fingerprint(ckpt, ckpt.entries[name]), []).append(name)
            for same in by_print.values():
                candidates += [(same[0], other) for other in same[1:]]
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    for a, b in dict.fromkeys(candidates):
        holders = [i for i in models if a in checkpoints[i].entries and b in checkpoints[i].entries]
        if holders and all(_identical(checkpoints[i], a, b) for i in holders):
            parent[find(b)] = find(a)
    classes: dict[str, list[str]] = {}
    for name in parent:
        classes.setdefault(find(name), []).append(name)
    aliases: dict[str, str] = {}
    for root, members in classes.items():
        members = list(dict.fromkeys([root, *members]))
        primary = max(members, key=lambda n: sum(n in checkpoints[i].entries for i in models))
        aliases.update({m: primary for m in members})
    return aliases


def align_names(names: Sequence[str], available: Collection[str]) -> dict[str, str]:
    """Maps ``names`` onto ``available``, allowing one common prefix to be added or removed.

    transformers saves a task model's backbone under a prefix its bare model lacks (``bert.`` in
    ``BertForSequenceClassification`` but not in ``BertModel``; ``vision_model.`` in ``CLIPModel`` but not in a
    transformers-5 ``CLIPVisionModel``). Names found as-is are kept; otherwise the prefix that matches the most
    names wins. Names that match nothing are left out.
    """
    available = set(available)
    direct = {n: n for n in names if n in available}
    missing = [n for n in names if n not in available]
    if not missing:
        return direct
    candidates: set[tuple[str, str]] = set()
    for probe in missing[:20]:  # a few probes: the first missing name may be a head the other side never had
        for other in available:
            if other.endswith("." + probe):
                candidates.add(("add", other[: -len(probe)]))
        parts = probe.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i]) + "."
            if probe[len(prefix) :] in available:
                candidates.add(("strip", prefix))

    def apply(kind: str, prefix: str, name: str) -> str | None:
        if kind == "add":
            return prefix + name if prefix + name in available else None
        return name[len(prefix) :] if name.startswith(prefix) and name[len(prefix) :] in available else None

    best: dict[str, str] = direct
    for kind, prefix in sorted(candidates):
        mapped = {n: m for n in names if (m := direct.get(n) or apply(kind, prefix, n)) is not None}
        if len(mapped) > len(best):
            best = mapped
    if best is not direct:
        log.debug("tensor names differ by a prefix; matched %d of %d", len(best), len(names))
    return best


def _names_differ(a: Checkpoint, b: Checkpoint, missing: list[str], extra: list[str]) -> IncompatibleModelsError:
    if missing:
        first = sorted(missing)[0]
        what = f"{b.label} has no tensor {first!r}, which {a.label} has"
    else:
        first = sorted(extra)[0]
        what = f"{b.label} has tensor {first!r}, which {a.label} lacks"
    more = len(missing) + len(extra) - 1
    return IncompatibleModelsError(
        f"the models do not have the same tensors: {what}"
        + (f" ({more} more difference(s))" if more else "")
        + ". Models fused together must share an architecture."
    )


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _could_be_tied(ckpt: Checkpoint, like: TensorEntry) -> bool:
    """Whether ``ckpt`` holds a tensor that could be a tied twin of ``like`` (same shape and dtype)."""
    return any(e.shape == like.shape and e.dtype == like.dtype and e.name != like.name for e in ckpt.entries.values())


def check_headers(
    checkpoints: Sequence[Checkpoint],
    *,
    base: int | None,
    experts: Sequence[int],
    uses_base: bool,
    exclude: Sequence[str] = (),
    heads: Sequence[str] = (),
) -> None:
    """What headers alone can refute: different shapes, missing tensors, a base that lacks the models' tensors.

    Runs before any weight is downloaded. A name missing from one model passes only when that model holds a tensor
    of the same shape and dtype that may be its tied twin; :func:`build_plan` settles that from the bytes.
    """
    first = checkpoints[experts[0]]
    for index in experts[1:]:
        other = checkpoints[index]
        for name, entry in other.entries.items():
            if _matches(name, heads):
                continue
            theirs = first.entries.get(name)
            if theirs is not None and theirs.shape != entry.shape:
                raise IncompatibleModelsError(
                    f"tensor {name!r} has shape {list(entry.shape)} in {other.label} but {list(theirs.shape)} "
                    f"in {first.label}. Models fused together must share an architecture and sizes.{_head_hint(name)}"
                )
        missing = [
            n
            for n, e in first.entries.items()
            if n not in other.entries and not _matches(n, heads) and not _could_be_tied(other, e)
        ]
        extra = [
            n
            for n, e in other.entries.items()
            if n not in first.entries and not _matches(n, heads) and not _could_be_tied(first, e)
        ]
        if missing or extra:
            raise _names_differ(first, other, missing, extra)
    if not uses_base or base is None:
        return
    base_ckpt = checkpoints[base]
    fused = [
        n
        for n, e in first.entries.items()
        if is_floating(e.dtype) and not _matches(n, exclude) and not _matches(n, heads)
    ]
    matched = align_names(fused, base_ckpt.entries)
    for name in fused:
        entry = first.entries[name]
        if name not in matched:
            if _could_be_tied(base_ckpt, entry):
                continue
            raise IncompatibleModelsError(
                f"the base {base_ckpt.label} has no tensor {name!r}, which the models have; the base must be "
                "the model they were fine-tuned from. To keep such tensors unfused, list them in `exclude`."
            )
        base_entry = base_ckpt.entries[matched[name]]
        if base_entry.shape != entry.shape:
            raise IncompatibleModelsError(
                f"tensor {name!r} has shape {list(base_entry.shape)} in the base {base_ckpt.label} but "
                f"{list(entry.shape)} in {first.label}; the base must be the model they were fine-tuned from."
            )


HEAD_MODULES = ("classifier", "score", "head", "heads", "qa_outputs", "lm_head")


def _head_hint(name: str) -> str:
    """For a tensor of a task head (whose classes differ by task), how to leave the heads out of the fusion."""
    parts = name.split(".")
    module = next((p for p in parts if p in HEAD_MODULES or p.endswith("_head")), None)
    if module is None:
        return ""
    pattern = ".".join(parts[: parts.index(module) + 1]) + ".*"
    return (
        f" It looks like a per-task head: fuse the shared backbone and leave the heads out with "
        f"--heads '{pattern}' (heads=[{pattern!r}] in Python; pools with task heads set this)."
    )


@dataclass
class _Names:
    """How output tensor names map onto each checkpoint: tied twins (one stored tensor under several names), the
    base's own spelling (matched by name alignment), and the names the output takes."""

    ckpts: list[Checkpoint]
    experts: Sequence[int]
    base: int | None
    reference: int
    aliases: dict[str, str]
    members: dict[str, list[str]] = field(default_factory=dict)
    reconciled: set[str] = field(default_factory=set)
    base_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for alias, primary in self.aliases.items():
            self.members.setdefault(primary, []).append(alias)
        # Classes where some model lacks a member and reads its twin: those members must fuse as one (shared key).
        # Tensors that are merely equal everywhere (untouched LayerNorms under LoRA) stay independent parameters.
        # (The base is matched by name alignment, so only the models decide.)
        self.reconciled = {
            primary
            for primary, group in self.members.items()
            if any(not all(m in self.ckpts[i].entries for m in group) for i in self.experts)
        }

    def key_of(self, name: str) -> str:
        primary = self.aliases.get(name)
        return primary if primary in self.reconciled else name

    def resolve(self, index: int, name: str) -> str | None:
        """The name to read in model ``index`` for output tensor ``name`` (a tied twin if it lacks the name)."""
        entries = self.ckpts[index].entries
        if name in entries:
            return name
        twins = self.members.get(self.aliases.get(name, ""), [])
        return next((t for t in twins if t in entries), None)

    def align_base(self, names: Sequence[str]) -> None:
        if self.base is not None:
            self.base_names = align_names(names, self.ckpts[self.base].entries)

    def resolve_base(self, name: str) -> str | None:
        for candidate in [name, *self.members.get(self.aliases.get(name, ""), [])]:
            if candidate in self.base_names:
                return self.base_names[candidate]
        return None

    def out_name(self, name: str) -> str:
        """The base's spelling when the output follows the base (tied twins keep their own name)."""
        return self.base_names.get(name, name) if self.reference == self.base else name

    def entry(self, index: int, name: str) -> TensorEntry:
        return _entry(self.ckpts, index, name, self.resolve)


def build_plan(
    checkpoints: Sequence[Checkpoint],
    *,
    base: int | None,
    experts: Sequence[int],
    uses_base: bool,
    reference: int,
    exclude: Sequence[str] = (),
    heads: Sequence[str] = (),
    out_dtype: str | None = None,
    copy_from: Mapping[str, int] | None = None,
) -> FusionPlan:
    """Checks the models against each other and lays out the output; raises :class:`IncompatibleModelsError`.

    Tensors matching ``heads`` (per-task heads) are left out. When the reference is the base, output tensors take
    the base's names, so the fused model is the base's architecture. ``copy_from`` names tensors copied from one
    checkpoint instead of fused (layers a slice copies; see :mod:`hf_fusion.engine.slices`).
    """
    ckpts = list(checkpoints)
    copy_from = copy_from or {}
    check_headers(ckpts, base=base, experts=experts, uses_base=uses_base, exclude=exclude, heads=heads)
    aliases = find_aliases(ckpts, [*experts, *([base] if base is not None else [])], ignore=copy_from)
    table = _Names(ckpts, experts, base, reference, aliases)
    names = _shared_names(table, heads)
    table.align_base(names)
    position = {n: i for i, n in enumerate(ckpts[reference].entries)}
    order = sorted(names, key=lambda n: position.get(table.out_name(n), len(position)))
    planned = [_plan_tensor(table, name, uses_base=uses_base, exclude=exclude, out_dtype=out_dtype) for name in order]
    planned = [_copied(t, copy_from[n]) if n in copy_from else t for n, t in zip(order, planned)]
    dropped: list[str] = []
    if base is not None:
        wanted = {r for t in planned for i, r in t.reads.items() if i == base}
        dropped = [n for n in ckpts[base].entries if n not in wanted and n not in table.base_names.values()]
        if dropped:
            log.info(
                "the base has %d tensor(s) the models lack (e.g. %s); they are not in the output",
                len(dropped),
                dropped[0],
            )
    if not any(t.fuse for t in planned) and not copy_from:
        raise IncompatibleModelsError("no floating-point tensor is left to fuse (check `exclude`).")
    return FusionPlan(ckpts, base, list(experts), reference, planned, aliases, dropped)


def _shared_names(table: _Names, heads: Sequence[str]) -> list[str]:
    """The tensors every model has (heads aside), in the first model's order; refuses missing, extra or reshaped
    tensors with the models named."""
    ckpts, experts = table.ckpts, table.experts
    first = ckpts[experts[0]]
    names = [n for n in first.entries if not _matches(n, heads)]
    for index in experts[1:]:
        other = ckpts[index]
        missing = [n for n in names if table.resolve(index, n) is None]
        extra = [
            n
            for n in other.entries
            if n not in first.entries and not _matches(n, heads) and table.resolve(experts[0], n) is None
        ]
        if missing or extra:
            raise _names_differ(first, other, missing, extra)
        names += [n for n in other.entries if n not in first.entries and not _matches(n, heads)]
    for name in names:
        shape = table.entry(experts[0], name).shape
        for index in experts[1:]:
            entry = table.entry(index, name)
            if entry.shape != shape:
                raise IncompatibleModelsError(
                    f"tensor {name!r} has shape {list(entry.shape)} in {ckpts[index].label} but {list(shape)} in "
                    f"{first.label}. Models fused together must share an architecture and sizes.{_head_hint(name)}"
                )
    return names


def _plan_tensor(
    table: _Names, name: str, *, uses_base: bool, exclude: Sequence[str], out_dtype: str | None
) -> PlannedTensor:
    """One output tensor: copied (not floating-point, or excluded) from the base or the first model, or fused from
    every model (and the base, when the method reads it)."""
    ckpts, experts, base, reference = table.ckpts, table.experts, table.base, table.reference
    first = ckpts[experts[0]]
    entry = table.entry(experts[0], name)
    floating = all(is_floating(table.entry(i, name).dtype) for i in experts)
    copy_from = base if base is not None and table.resolve_base(name) is not None else experts[0]
    ref_name = table.resolve_base(name) if reference == base else table.resolve(reference, name)
    default_dtype = ckpts[reference].entries[ref_name].dtype if ref_name else entry.dtype
    if not floating or _matches(name, exclude):
        source_name = table.resolve_base(name) if copy_from == base else table.resolve(copy_from, name)
        source_entry = ckpts[copy_from].entries[source_name]  # type: ignore[index]
        if source_entry.shape != entry.shape:
            raise IncompatibleModelsError(
                f"tensor {name!r} has shape {list(source_entry.shape)} in the base {ckpts[copy_from].label} but "
                f"{list(entry.shape)} in {first.label}."
            )
        dtype = out_dtype if (out_dtype and is_floating(source_entry.dtype)) else source_entry.dtype
        reads = {copy_from: source_name}
        return PlannedTensor(table.out_name(name), entry.shape, dtype, False, table.key_of(name), reads)  # type: ignore[arg-type]
    reads = {i: table.resolve(i, name) for i in experts}
    if uses_base and base is not None:
        reads[base] = _base_read(table, name, entry)
    dtype = out_dtype or default_dtype
    return PlannedTensor(table.out_name(name), entry.shape, dtype, True, table.key_of(name), reads)  # type: ignore[arg-type]


def _copied(tensor: PlannedTensor, source: int) -> PlannedTensor:
    """``tensor`` copied from checkpoint ``source`` rather than fused."""
    if not tensor.fuse:
        return tensor
    return replace(tensor, fuse=False, reads={source: tensor.reads[source]})


def _base_read(table: _Names, name: str, entry: TensorEntry) -> str:
    """The base's name for a fused tensor, checked: present, same shape, floating-point."""
    base = table.ckpts[table.base]  # type: ignore[index]
    first = table.ckpts[table.experts[0]]
    base_name = table.resolve_base(name)
    if base_name is None:
        raise IncompatibleModelsError(
            f"the base {base.label} has no tensor {name!r}, which the models have; the base must be "
            "the model they were fine-tuned from. To keep such tensors unfused, list them in `exclude`."
        )
    base_entry = base.entries[base_name]
    if base_entry.shape != entry.shape:
        raise IncompatibleModelsError(
            f"tensor {name!r} has shape {list(base_entry.shape)} in the base {base.label} but "
            f"{list(entry.shape)} in {first.label}; the base must be the model they were fine-tuned from."
        )
    if not is_floating(base_entry.dtype):
        raise IncompatibleModelsError(
            f"tensor {name!r} is {base_entry.dtype} in the base {base.label} but floating-point in {first.label}."
        )
    return base_name


def _entry(ckpts: Sequence[Checkpoint], index: int, name: str, resolve) -> TensorEntry:  # type: ignore[no-untyped-def]
    resolved = resolve(index, name)
    if resolved is None:
        raise IncompatibleModelsError(f"{ckpts[index].label} has no tensor {name!r}.")
    return ckpts[index].entries[resolved]
