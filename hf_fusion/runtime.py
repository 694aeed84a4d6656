"""Where work runs: how many processes share it, which one this is, which device and precision it computes in.

A plain ``hf-fusion`` run is one process. Under ``accelerate launch`` or ``torchrun`` (several processes, on one
machine or several), accelerate's :class:`~accelerate.PartialState` joins the process group (NCCL on GPUs, gloo on
CPUs) and this module answers the questions every part asks: is this the main process, which share of a list is
mine, what did the others compute. Nothing else in hf-fusion talks to ``torch.distributed`` directly.

Work is split so that results do not depend on the number of processes: shares are whole items (batches of
examples, grid configurations), gathered back in their original order, so the same items go through the same
arithmetic whatever the split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any, TypeVar

from hf_fusion.errors import FusionError, RecipeError

T = TypeVar("T")

MIXED_PRECISION = ("no", "fp16", "bf16")
"""``--mixed-precision`` values, as accelerate names them: autocast dtype of evaluation and adaptation."""


@dataclass(frozen=True)
class Runtime:
    """This process's place among the processes of one run (one process: index 0 of 1)."""

    process_index: int = 0
    num_processes: int = 1
    local_process_index: int = 0

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1

    def mine(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``num_processes``-th item from its index (round-robin, so long
        and short items spread evenly when they come sorted)."""
        return list(items[self.process_index :: self.num_processes])

    def gather(self, values: list[T]) -> list[list[T]]:
        """Every process's ``values``, in process order (a list per process), on every process."""
        if not self.distributed:
            return [values]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.num_processes
        dist.all_gather_object(gathered, values)
        return gathered

    def interleaved(self, share: list[T]) -> list[T]:
        """The inverse of :meth:`mine`: every process's share joined back into the original order."""
        shares = self.gather(share)
        joined: list[T] = []
        for position in range(max((len(s) for s in shares), default=0)):
            joined += [s[position] for s in shares if position < len(s)]
        return joined

    def broadcast(self, value: T) -> T:
        """The main process's ``value``, on every process."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_(self, tensor: Any) -> Any:
        """Adds ``tensor`` over all processes, in place (gradients, Fisher and Gram statistics)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            import torch

            on_gpu = tensor.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def finish(self) -> None:
        """Ends a run whose every process reached its end: they wait for each other, then leave the process group.
        Leaving alone while another process still talks to the group, or leaving the group to the interpreter's
        exit, can abort a process after its work is done (gloo: "terminate called without an active exception")."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def on_main(self, work: Callable[[], T]) -> T:
        """Runs ``work`` on the main process only and hands its result, or its error, to every process; the others
        wait meanwhile (writing a folder, downloading once)."""
        if not self.distributed:
            return work()
        outcome: tuple[Any, BaseException | None] = (None, None)
        if self.is_main:
            try:
                outcome = (work(), None)
            except BaseException as err:  # every process must hear of it, or the others wait for ever
                outcome = (None, _crossing(err))
        result, error = self.broadcast(outcome)
        if error is not None:
            raise error
        return result

    def main_first(self, work: Callable[[], T]) -> T:
        """Runs ``work`` on the first process of each machine, then on the others: a download happens once per
        machine, and the other processes find it in the cache; an error on any first process is raised on every
        process. What ``work`` returns stays on the process that made it."""
        if not self.distributed:
            return work()
        done: list[T] = []
        error: BaseException | None = None
        if self.local_process_index == 0:
            try:
                done.append(work())
            except BaseException as err:  # every process must hear of it, or the others wait for ever
                error = _crossing(err)
        errors = [e for [e] in self.gather([error]) if e is not None]
        if errors:
            raise errors[0]
        return done[0] if done else work()

    def device(self, requested: str) -> str:
        """``requested`` for this process: plain ``cuda`` becomes this process's own GPU when several processes
        share a machine; a GPU that is not there is an error before any work."""
        import torch

        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise RecipeError(f"unknown device {requested!r}; use cpu, cuda or cuda:N.") from None
        if dev.type not in ("cpu", "cuda"):
            raise RecipeError(f"device {requested!r} is not supported; use cpu or cuda.")
        if dev.type == "cpu":
            return "cpu"
        if not torch.cuda.is_available():
            raise RecipeError(
                f"device {requested!r} was requested but no CUDA device is available (torch {torch.__version__}"
                f"{'' if torch.version.cuda else ', a CPU-only build'})."
            )
        count = torch.cuda.device_count()
        index = dev.index if dev.index is not None else (self.local_process_index if self.distributed else 0)
        if index >= count:
            raise RecipeError(f"device {requested!r} asks for GPU {index}, and this machine has {count}.")
        return f"cuda:{index}"


def _crossing(error: BaseException) -> BaseException:
    """``error`` as it can be sent to the other processes: itself, or where it cannot be pickled a
    :class:`FusionError` saying what it was."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return FusionError(f"another process failed: {type(error).__name__}: {error}")


WAIT_ENV = "HF_FUSION_WAIT_SECONDS"
DEFAULT_WAIT_S = 6 * 3600


def wait_seconds() -> int:
    """How long a process waits for the others at a collective (``$HF_FUSION_WAIT_SECONDS``, default 6 hours):
    while the main process fuses a large model, or one process finishes its share of a sweep long before another,
    the others wait, far beyond torch's default of 10 to 30 minutes. A process that crashes ends the run at once
    (the launcher stops the others), so a long wait never hides a failure."""
    try:
        return max(60, int(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S)))
    except ValueError:
        return DEFAULT_WAIT_S


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by ``accelerate launch`` and ``torchrun``)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@lru_cache(maxsize=1)
def current() -> Runtime:
    """The run's runtime. A launched run joins its process group through accelerate once, on first use; a plain run
    never imports accelerate's distributed state."""
    if launched_processes() == 1:
        return Runtime()
    import torch
    from accelerate import PartialState

    # without ``cpu`` accelerate only joins a process group on accelerators, and a CPU-only run stays one process
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=wait_seconds()))
    return Runtime(state.process_index, state.num_processes, state.local_process_index)


LOCAL = Runtime()
"""One process on its own: what a job uses when its work is already split (a ``bench`` configuration)."""


def check_mixed_precision(value: str, device: str) -> str:
    """``value`` when it is one of :data:`MIXED_PRECISION` and the device can compute in it."""
    if value not in MIXED_PRECISION:
        raise RecipeError(f"unknown mixed precision {value!r}; use {', '.join(MIXED_PRECISION)}.")
    if value == "bf16" and device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise RecipeError(f"{device} cannot compute in bf16; use --mixed-precision fp16 or no.")
    return value


@contextmanager
def autocast(device: str, mixed_precision: str) -> Iterator[None]:
    """Forward passes in ``mixed_precision`` (float32 weights, lower-precision matrix products), as accelerate's
    ``Accelerator.autocast`` does; ``no`` computes in the weights' own precision."""
    if mixed_precision == "no":
        yield
        return
    import torch

    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    with torch.autocast(device_type=device.split(":")[0], dtype=dtype):
        yield
