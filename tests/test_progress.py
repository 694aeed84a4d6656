"""Where no bar can be drawn (stderr is a file or a CI log), long steps log periodic progress lines instead of
printing nothing until they end."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fusion.errors import FusionError
from hf_fusion.progress import INTERVAL_ENV, log_interval, progress_bar


def test_a_bar_that_is_not_drawn_logs_lines(monkeypatch, caplog) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    caplog.set_level(logging.INFO, logger="hf_fusion.progress")
    with progress_bar(total=3, desc="fusing", unit="tensor") as bar:
        bar.update(3)
    assert caplog.messages == []  # interval 0: no lines
    monkeypatch.setenv(INTERVAL_ENV, "0.000001")
    with progress_bar(total=3, desc="fusing", unit="tensor") as bar:
        for _ in range(3):
            bar.update(1)
    assert caplog.messages == ["fusing: 1/3 tensors, 0 s", "fusing: 2/3 tensors, 0 s", "fusing: 3/3 tensors, 0 s"]


def test_the_last_count_is_logged_when_a_step_ends(monkeypatch, caplog) -> None:
    clock = iter([0.0, 31.0, 40.0, 50.0, 95.0])  # start, then one reading per update and one for the closing line
    monkeypatch.setattr("hf_fusion.progress._clock", lambda: next(clock))
    monkeypatch.delenv(INTERVAL_ENV, raising=False)  # the default: every 30 s
    caplog.set_level(logging.INFO, logger="hf_fusion.progress")
    with progress_bar(total=3, desc="evaluating", unit="score") as bar:
        for _ in range(3):
            bar.update(1)
    assert caplog.messages == ["evaluating: 1/3 scores, 31 s", "evaluating: 3/3 scores, 1 min 35 s"]


def test_quiet_bars_log_nothing(monkeypatch, caplog) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0.000001")
    caplog.set_level(logging.INFO, logger="hf_fusion.progress")
    with progress_bar(total=2, desc="fusing", unit="tensor", disable=True) as bar:
        bar.update(2)
    assert caplog.messages == []


@pytest.mark.parametrize("value", ["fast", "-1", "nan", "inf"])
def test_a_bad_interval_is_refused(monkeypatch, value: str) -> None:
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(FusionError, match=INTERVAL_ENV):
        log_interval()


def test_merge_logs_progress_to_a_file(bert_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = bert_pool
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}  # bars on, but no terminal
    env[INTERVAL_ENV] = "0.000001"
    with open(tmp_path / "log.txt", "w") as log:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "hf_fusion",
                "merge",
                "--repo-ids",
                *map(str, experts),
                "--base",
                str(base),
                "--method",
                "task_arithmetic",
                "--output",
                str(tmp_path / "m"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            timeout=120,
        )
    text = (tmp_path / "log.txt").read_text()
    assert out.returncode == 0, text
    lines = re.findall(r"^fusing: (\d+)/(\d+) tensors, \d+ s$", text, flags=re.M)
    assert len(lines) >= 2 and lines[-1][0] == lines[-1][1], text
    assert "\r" not in text and "it/s" not in text  # no bar redraws in the log
