"""What the Space computes on: the GPU of a GPU Space, a ZeroGPU slice lent per job, or the CPU.

On ZeroGPU hardware a GPU is attached only inside functions wrapped by the ``spaces`` package's ``GPU`` decorator
(the package is installed there, not here), so a merge or comparison job runs inside one; on GPU hardware the GPU is
simply there; on CPU Spaces nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

ZERO_GPU_ENV = "SPACES_ZERO_GPU"
"""Set by the Hub on ZeroGPU hardware."""
GPU_SECONDS_ENV = "HF_FUSION_SPACE_GPU_SECONDS"


def _gpu_seconds() -> int:
    """``$HF_FUSION_SPACE_GPU_SECONDS`` when it is a whole number of seconds from 1 to 3600, else 300."""
    text = os.environ.get(GPU_SECONDS_ENV, "300")
    return int(text) if text.isdigit() and 1 <= int(text) <= 3600 else 300


JOB_GPU_SECONDS = _gpu_seconds()
"""The longest a job holds a ZeroGPU slice (the quota each visitor's job is charged against)."""


def on_zero_gpu() -> bool:
    return os.environ.get(ZERO_GPU_ENV, "").lower() in ("1", "true")


def job_device() -> str:
    """``cuda`` where the Space has (or is lent) a GPU, else ``cpu``."""
    if on_zero_gpu():
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(work: Callable[[], T]) -> T:
    return work()


if on_zero_gpu():  # ZeroGPU looks for its decorated functions when the app starts, so this one exists from import
    try:
        import spaces  # type: ignore[import-not-found]

        _run = spaces.GPU(duration=JOB_GPU_SECONDS)(_run)
    except ImportError:
        pass


def with_gpu(work: Callable[[], T]) -> Callable[[], T]:
    """``work`` as it runs on this hardware: inside the function that holds a ZeroGPU slice, or unchanged. On
    ZeroGPU the job runs in the worker ``spaces`` forks for it, so its progress and Stop do not reach the page."""
    if not on_zero_gpu():
        return work
    return lambda: _run(work)
