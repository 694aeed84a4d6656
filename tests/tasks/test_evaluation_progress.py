"""An evaluation whose output is not a terminal logs periodic lines per task and model, counted in examples."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hf_fusion
from hf_fusion.cli import main
from hf_fusion.progress import INTERVAL_ENV


def test_evaluation_logs_examples_scored(text_pool: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    hf_fusion.merge(
        pool=str(text_pool / "pool.yaml"), method="task_arithmetic", output=tmp_path / "m", show_progress=False
    )
    monkeypatch.setenv(INTERVAL_ENV, "0.000001")
    caplog.set_level(logging.INFO, logger="hf_fusion.progress")
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "m"),
                "--pool",
                str(text_pool / "pool.yaml"),
                "--metrics",
                "bundled",
                "--batch-size",
                "5",
                "--limit",
                "12",
            ]
        )
        == 0
    )
    lines = [m for m in caplog.messages if m.startswith("evaluating reviews_a (fused)")]
    counts = [re.fullmatch(r"evaluating reviews_a \(fused\): (\d+)/12 examples, \d+ s", m).group(1) for m in lines]
    assert counts[:3] == ["5", "10", "12"] and counts[-1] == "12"
    assert any(m.startswith("evaluating reviews_b (individual): ") for m in caplog.messages)
    assert any(re.fullmatch(r"evaluating: 6/6 scores, \d+ s", m) for m in caplog.messages)
