"""The Space computes where its hardware lets it: the CPU here, a ZeroGPU slice held for each job there."""

from __future__ import annotations

import importlib
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
    """On ZeroGPU the ``spaces`` package attaches a GPU inside functions decorated with ``spaces.GPU`` when the app
    starts; every job runs through the one decorated at import."""
    decorated: list[int] = []
    held: list[str] = []

    def gpu(duration: int):
        decorated.append(duration)

        def wrap(function):
            def holding(*args):
                held.append("slice")
                return function(*args)

            return holding

        return wrap

    monkeypatch.setenv(hardware.ZERO_GPU_ENV, "true")
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    reloaded = importlib.reload(hardware)
    try:
        assert decorated == [reloaded.JOB_GPU_SECONDS]  # at import, before any job
        assert reloaded.job_device() == "cuda"
        assert reloaded.with_gpu(lambda: "merged")() == "merged"
        assert reloaded.with_gpu(lambda: "compared")() == "compared"
        assert held == ["slice", "slice"] and len(decorated) == 1
    finally:
        monkeypatch.delenv(hardware.ZERO_GPU_ENV)
        importlib.reload(hardware)


def test_a_malformed_hold_time_falls_back_to_the_default(monkeypatch) -> None:
    for text in ("abc", "-5", "0", "1e9", "99999"):
        monkeypatch.setenv(hardware.GPU_SECONDS_ENV, text)
        assert hardware._gpu_seconds() == 300
    monkeypatch.setenv(hardware.GPU_SECONDS_ENV, "600")
    assert hardware._gpu_seconds() == 600
