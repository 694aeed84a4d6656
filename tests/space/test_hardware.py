"""The Space computes where its hardware lets it: the CPU here, a ZeroGPU slice held for each job there."""

from __future__ import annotations

import sys
import types

import torch

from hf_fusion.space import hardware


def test_cpu_space_changes_nothing(monkeypatch) -> None:
    monkeypatch.delenv(hardware.ZERO_GPU_ENV, raising=False)

    def work() -> int:
        return 7

    assert hardware.with_gpu(work) is work
    assert hardware.job_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_zero_gpu_jobs_hold_a_slice_while_they_run(monkeypatch) -> None:
    """On ZeroGPU the ``spaces`` package attaches a GPU inside functions wrapped by ``spaces.GPU``: each job is."""
    held: list[int] = []

    def gpu(duration: int):
        def wrap(function):
            def holding():
                held.append(duration)
                return function()

            return holding

        return wrap

    monkeypatch.setenv(hardware.ZERO_GPU_ENV, "true")
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    assert hardware.job_device() == "cuda"
    assert hardware.with_gpu(lambda: "merged")() == "merged"
    assert held == [hardware.JOB_GPU_SECONDS]
