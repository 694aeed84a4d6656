"""The streaming executor: read slices ahead on a thread, fuse on the compute device, write in order.

Non-finite values: every input slice of a fused tensor is checked with one ``isfinite`` pass. A slice holding NaN or
an infinity is refused with the model and tensor named, unless it is byte-identical in every input (a stored
``-inf`` mask), which passes through untouched. With ``allow_nonfinite`` such a slice is fused anyway, by one rule
for every method: the elements that are non-finite in any input are set to zero in every input before the method
runs (so they take no part in sums, norms, signs, sorting or SVDs), and in the output those elements hold the sum
of the inputs' non-finite values there (NaN where any input is NaN or infinities of both signs meet, else that
infinity). Every fused result is checked before it is written: a value that overflows the output dtype (or a NaN
made from finite inputs) is refused with the tensor named, or, for overflow with ``clamp_overflow``, clamped to the
dtype's finite range.

Memory is bounded by the slice budget, not by the model: an element-wise method sees row slices of at most
``budget_elements / number_of_inputs`` elements per model, so the working set stays the same as models grow in
size or number. Read buffers come from a pool and are reused, because touching fresh memory costs more than
reading the data on small machines.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pydantic
import torch

from hf_fusion.engine.checkpoint import TensorEntry
from hf_fusion.engine.contract import TensorInputs, TensorMerge, Visitor
from hf_fusion.engine.dtypes import SAFETENSORS_TO_TORCH
from hf_fusion.engine.plan import FusionPlan, PlannedTensor
from hf_fusion.engine.writer import ShardedSafetensorsWriter
from hf_fusion.errors import NonFiniteError
from hf_fusion.progress import progress_bar

log = logging.getLogger(__name__)

CPU_BUDGET_ELEMENTS = 1 << 20
"""Elements per slice across all inputs on a CPU: 4 MB of float32, so that a slice and the method's temporaries stay
in the L2/L3 caches while the method makes its several passes over them. On the Qwen2-0.5B workload
(scripts/bench_merge.py) this ran TIES and task arithmetic faster than 8M elements, at half the peak memory."""
GPU_BUDGET_ELEMENTS = 8 << 20
"""On a GPU, slices large enough to keep every kernel launch busy."""


def default_budget_elements(device: str | torch.device) -> int:
    return GPU_BUDGET_ELEMENTS if torch.device(device).type == "cuda" else CPU_BUDGET_ELEMENTS


@dataclass(frozen=True)
class SliceJob:
    tensor: PlannedTensor
    sources: tuple[int, ...]
    row_start: int
    row_stop: int
    flat_offset: int


def _rows_nbytes(entry: TensorEntry, rows: int) -> int:
    """Bytes of ``rows`` leading rows of a tensor (the whole tensor for a scalar)."""
    return entry.nbytes * rows // entry.rows if entry.rows else entry.nbytes


@dataclass(frozen=True)
class _Poison:
    """Elements non-finite in some input (``where``) and the value the output takes there (``values``)."""

    where: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class _Prepared:
    """A slice ready for the method; ``inputs`` is None when it passes through as stored."""

    inputs: TensorInputs | None
    poison: _Poison | None


def _all_finite(values: torch.Tensor) -> bool:
    """Whether every element is finite. A sum is one vectorised pass without a mask: any NaN or infinity makes it
    non-finite, so a finite sum settles it; only a non-finite one (or an overflowing sum) needs the element check."""
    if not values.is_floating_point():
        return True
    if math.isfinite(float(torch.sum(values, dtype=torch.float64 if values.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(values).all())


def _identical(typed: Sequence[torch.Tensor]) -> bool:
    """Whether every input holds the same bytes (a stored mask or buffer that fine-tuning never touched)."""
    first = typed[0]
    raw = first.reshape(-1).view(torch.uint8)
    return all(t.dtype == first.dtype and torch.equal(t.reshape(-1).view(torch.uint8), raw) for t in typed[1:])


def _set_aside(values: list[torch.Tensor]) -> tuple[list[torch.Tensor], _Poison]:
    """Zeroes, in every input, the elements non-finite in any input, and records what the output holds there."""
    stacked = torch.stack(values)
    finite = torch.isfinite(stacked)
    where = ~finite.all(dim=0)
    carried = torch.where(finite, torch.zeros_like(stacked), stacked).sum(dim=0)
    cleaned = [v.masked_fill(where, 0.0) for v in values]
    return cleaned, _Poison(where, carried)


class _BufferPool:
    """Fixed-size byte buffers, recycled so that slices do not fault in fresh pages."""

    def __init__(self, block_bytes: int, pin: bool) -> None:
        self.block_bytes = block_bytes
        self.pin = pin
        self._free: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.block_bytes:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        block = (
            self._free.pop() if self._free else torch.empty(self.block_bytes, dtype=torch.uint8, pin_memory=self.pin)
        )
        return block

    def give(self, block: torch.Tensor) -> None:
        if block.numel() == self.block_bytes:
            self._free.append(block)


class StreamingEngine:
    """Runs one tensor-wise method over a plan; see :meth:`run`."""

    def __init__(
        self,
        plan: FusionPlan,
        method: TensorMerge,
        *,
        uses_base: bool,
        device: str | torch.device = "cpu",
        budget_elements: int | None = None,
        prefetch: int = 2,
        show_progress: bool = True,
        module_types: dict[str, str] | None = None,
        parameters: Mapping[str, pydantic.BaseModel] | None = None,
        allow_nonfinite: bool = False,
        clamp_overflow: bool = False,
    ) -> None:
        self.plan = plan
        self.parameters = parameters or {}
        self.allow_nonfinite = allow_nonfinite
        self.clamp_overflow = clamp_overflow
        self.module_types = module_types or {}
        self.method = method
        self.device = torch.device(device)
        self.prefetch = max(1, prefetch)
        self.show_progress = show_progress
        base = [plan.base] if uses_base and plan.base is not None else []
        self.merge_sources = tuple(base + plan.experts)
        self.has_base = bool(base)
        self.budget_elements = budget_elements or default_budget_elements(self.device)
        any_f64 = any(
            plan.checkpoints[i].entries[name].dtype == "F64" for t in plan.fused for i, name in t.reads.items()
        )
        self.compute_dtype = torch.float64 if any_f64 else torch.float32
        self.passes = 0
        block = max((self._slice_bytes(j) for j in self._jobs(plan.tensors)), default=1)
        self._pool = _BufferPool(block, pin=self.device.type == "cuda")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-fusion-read")

    # slicing ------------------------------------------------------------------------------------------------
    def _rows_per_slice(self, tensor: PlannedTensor, num_sources: int) -> int:
        entry = self.plan.checkpoints[next(iter(tensor.reads))].entries[next(iter(tensor.reads.values()))]
        if tensor.fuse and not self.method.elementwise and not (self.method.row_local and len(entry.shape) >= 2):
            return max(1, entry.rows)
        per_source = max(1, self.budget_elements // max(1, num_sources))
        return max(1, per_source // max(1, entry.row_numel))

    def _jobs(self, tensors: list[PlannedTensor]) -> Iterator[SliceJob]:
        for tensor in tensors:
            sources = self.merge_sources if tensor.fuse else (next(iter(tensor.reads)),)
            entry = self.plan.checkpoints[sources[0]].entries[tensor.reads[sources[0]]]
            step = self._rows_per_slice(tensor, len(sources))
            rows = entry.rows
            for start in range(0, max(rows, 1), step):
                stop = min(rows, start + step)
                yield SliceJob(tensor, sources, start, stop, start * entry.row_numel)

    def _slice_bytes(self, job: SliceJob) -> int:
        return max(
            _rows_nbytes(self.plan.checkpoints[i].entries[job.tensor.reads[i]], job.row_stop - job.row_start)
            for i in job.sources
        )

    # reading ------------------------------------------------------------------------------------------------
    def _read(self, job: SliceJob) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Reads the slice from every source; returns (buffer, typed view) pairs."""
        out = []
        for index in job.sources:
            ckpt = self.plan.checkpoints[index]
            entry = ckpt.entries[job.tensor.reads[index]]
            rows = job.row_stop - job.row_start
            nbytes = _rows_nbytes(entry, rows)
            buffer = self._pool.take(nbytes)
            ckpt.read_rows(entry.name, job.row_start, job.row_stop, buffer)
            shape = (rows, *entry.shape[1:]) if entry.shape else ()
            typed = buffer[:nbytes].view(SAFETENSORS_TO_TORCH[entry.dtype]).view(shape)
            out.append((buffer, typed))
        return out

    def _prefetched(
        self, jobs: Iterator[SliceJob]
    ) -> Iterator[tuple[SliceJob, list[tuple[torch.Tensor, torch.Tensor]]]]:
        pending: deque[tuple[SliceJob, Future]] = deque()
        jobs = iter(jobs)

        def top_up() -> None:
            while len(pending) < self.prefetch:
                job = next(jobs, None)
                if job is None:
                    return
                pending.append((job, self._reader.submit(self._read, job)))

        try:
            top_up()
            while pending:
                job, future = pending.popleft()
                slices = future.result()
                top_up()
                try:
                    yield job, slices
                finally:
                    for buffer, _ in slices:
                        self._pool.give(buffer)
        finally:
            for _, future in pending:
                future.cancel()
            for _, future in pending:
                if not future.cancelled():
                    try:
                        for buffer, _ in future.result():
                            self._pool.give(buffer)
                    except Exception:  # the error that stopped us is already propagating
                        pass

    def _inputs(self, job: SliceJob, slices: list[tuple[torch.Tensor, torch.Tensor]]) -> _Prepared:
        """The slice as the method sees it, after the non-finite check (see the module docstring)."""
        values = [typed.to(self.device, non_blocking=True).to(self.compute_dtype) for _, typed in slices]
        poison = None
        bad = [i for i, v in enumerate(values) if not _all_finite(v)]
        if bad:
            if _identical([typed for _, typed in slices]):
                return _Prepared(None, None)
            if not self.allow_nonfinite:
                raise self._nonfinite_input(job, bad[0], values[bad[0]])
            values, poison = _set_aside(values)
        base = values[0] if self.has_base else None
        experts = values[1:] if self.has_base else values
        inputs = TensorInputs(
            job.tensor.key,
            base,
            experts,
            job.tensor.shape,
            job.flat_offset,
            self.module_types.get(job.tensor.key),
            self.parameters.get(job.tensor.key),
        )
        return _Prepared(inputs, poison)

    def _nonfinite_input(self, job: SliceJob, position: int, value: torch.Tensor) -> NonFiniteError:
        source = job.sources[position]
        label = self.plan.checkpoints[source].label
        name = job.tensor.reads[source]
        kind = "NaN" if bool(torch.isnan(value).any()) else "infinite values"
        count = int((~torch.isfinite(value)).sum())
        return NonFiniteError(
            f"{label} holds {kind} in tensor {name!r} ({count} of {value.numel()} values read); fusing would spread "
            "them into the output. Repair or leave out that model, list the tensor in `exclude` to copy it unfused, "
            "or pass --allow-nonfinite (recipe field `allow_nonfinite: true`) to carry such values through."
        )

    def _output(self, job: SliceJob, result: torch.Tensor, poison: _Poison | None) -> torch.Tensor:
        """The fused slice in the output dtype on the CPU, after the overflow check (and clamp, if asked)."""
        out_dtype = SAFETENSORS_TO_TORCH[job.tensor.out_dtype]
        if self.clamp_overflow and out_dtype.is_floating_point:
            info = torch.finfo(out_dtype)
            result = result.clamp(info.min, info.max)
        cast = result.to(out_dtype)
        if poison is None and _all_finite(cast):
            return cast.cpu()
        finite = torch.isfinite(cast)
        if poison is not None:
            finite = finite | poison.where
        if not bool(finite.all()):
            raise self._nonfinite_output(job.tensor.name, result, cast, finite)
        if poison is not None:
            cast = torch.where(poison.where, poison.values.to(out_dtype), cast)
        return cast.cpu()

    def _nonfinite_output(
        self, name: str, result: torch.Tensor, cast: torch.Tensor, finite: torch.Tensor
    ) -> NonFiniteError:
        bad = int((~finite).sum())
        dtype = str(cast.dtype).removeprefix("torch.")
        if bool(torch.isnan(result[~finite]).any()):
            return NonFiniteError(
                f"fusing tensor {name!r} gives NaN from finite inputs ({bad} of {cast.numel()} values); nothing was "
                "written. Check the method's parameters (weights and scales far from 1 overflow on the way)."
            )
        return NonFiniteError(
            f"fused tensor {name!r} overflows {dtype} ({bad} of {cast.numel()} values beyond its range); nothing was "
            f"written. Use smaller weights or scales, a wider --dtype (float32), or --clamp-overflow (recipe field "
            f"`clamp_overflow: true`) to clamp such values to {dtype}'s finite range."
        )

    def _copied(self, job: SliceJob, typed: torch.Tensor) -> torch.Tensor:
        """An unfused slice in the output dtype; a conversion that overflows is refused or clamped like a result."""
        out_dtype = SAFETENSORS_TO_TORCH[job.tensor.out_dtype]
        if typed.dtype == out_dtype:
            return typed
        copied = typed.to(out_dtype)
        if out_dtype.is_floating_point and not bool(torch.isfinite(copied).all()):
            was_finite = torch.isfinite(typed)
            if not bool((torch.isfinite(copied) | ~was_finite).all()):
                if not self.clamp_overflow:
                    raise self._nonfinite_output(job.tensor.name, typed, copied, torch.isfinite(copied) | ~was_finite)
                info = torch.finfo(out_dtype)
                copied = torch.where(was_finite, typed.clamp(info.min, info.max), typed).to(out_dtype)
        return copied

    # passes -------------------------------------------------------------------------------------------------
    def scan(self, visitor: Visitor) -> None:
        """One read-only pass over every fused tensor (the method's statistics passes)."""
        self.passes += 1
        fused: list[PlannedTensor] = []
        seen: set[str] = set()
        for tensor in self.plan.fused:  # tied aliases share their primary's key: visit it once
            if tensor.key not in seen:
                seen.add(tensor.key)
                fused.append(tensor)
        with progress_bar(
            total=len(fused), desc=f"statistics pass {self.passes}", unit="tensor", disable=not self.show_progress
        ) as bar:
            for job, slices in self._prefetched(self._jobs(fused)):
                prepared = self._inputs(job, slices)
                if prepared.inputs is not None:
                    visitor(prepared.inputs)
                if job.row_stop >= self._rows(job):
                    bar.update(1)

    def _per_writer(
        self, writers: Sequence[ShardedSafetensorsWriter], result: torch.Tensor
    ) -> list[tuple[ShardedSafetensorsWriter, torch.Tensor]]:
        """Pairs each writer with its part of a fused result (the i-th model's for ``outputs_per_model``)."""
        if self.method.outputs_per_model:
            return list(zip(writers, result.unbind(0)))
        return [(writers[0], result)]

    def _revisit(self, writers: Sequence[ShardedSafetensorsWriter]) -> None:
        """Fuses again the slices the method asks for once the merge pass is over, overwriting them in place."""
        stale = self.method.revisit()
        if not stale:
            return
        jobs = [j for j in self._jobs(self.plan.fused) if (j.tensor.key, j.flat_offset) in stale]
        log.debug("fusing %d slice(s) again after the merge pass", len(jobs))
        for job, slices in self._prefetched(iter(jobs)):
            prepared = self._inputs(job, slices)
            if prepared.inputs is None:
                continue
            result = self._output(job, self.method.merge(prepared.inputs), prepared.poison)
            for writer_, part in self._per_writer(writers, result):
                writer_.overwrite(job.tensor.name, job.flat_offset * part.element_size(), part)

    def _rows(self, job: SliceJob) -> int:
        return job.tensor.shape[0] if job.tensor.shape else 1

    def run(
        self,
        writers: ShardedSafetensorsWriter | Sequence[ShardedSafetensorsWriter],
        on_tensor: Callable[[int, int], None] | None = None,
    ) -> None:
        """Computes statistics if the method needs them, then fuses or copies every planned tensor into the writer
        (one writer per model for methods with ``outputs_per_model``; copied tensors go to each)."""
        writers = [writers] if isinstance(writers, ShardedSafetensorsWriter) else list(writers)
        expected_writers = len(self.plan.experts) if self.method.outputs_per_model else 1
        if len(writers) != expected_writers:
            raise ValueError(f"this method writes {expected_writers} model(s), got {len(writers)} writer(s)")
        try:
            self.method.prepare(self.scan)
            total = len(self.plan.tensors)
            done = 0
            with progress_bar(total=total, desc="fusing", unit="tensor", disable=not self.show_progress) as bar:
                current = None
                for job, slices in self._prefetched(self._jobs(self.plan.tensors)):
                    if job.tensor is not current:
                        current = job.tensor
                        for writer in writers:
                            writer.begin(current.name)
                    prepared = self._inputs(job, slices) if job.tensor.fuse else None
                    if prepared is not None and prepared.inputs is None:
                        for writer in writers:  # non-finite and identical in every input: written as stored
                            writer.write(self._copied(job, slices[0][1]))
                    elif prepared is not None:
                        result = self.method.merge(prepared.inputs)
                        expected = (job.row_stop - job.row_start, *job.tensor.shape[1:]) if job.tensor.shape else ()
                        if self.method.outputs_per_model:
                            expected = (len(writers), *expected)
                        if tuple(result.shape) != expected:
                            raise RuntimeError(
                                f"method returned shape {list(result.shape)} for {job.tensor.name!r}, "
                                f"expected {list(expected)}"
                            )
                        for writer, part in self._per_writer(writers, self._output(job, result, prepared.poison)):
                            writer.write(part)
                    else:
                        copied = self._copied(job, slices[0][1])
                        for writer in writers:
                            writer.write(copied)
                    if job.row_stop >= self._rows(job):
                        done += 1
                        bar.update(1)
                        if on_tensor is not None:
                            on_tensor(done, total)
            self._revisit(writers)
        finally:
            self._reader.shutdown(wait=True, cancel_futures=True)
