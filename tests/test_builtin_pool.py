"""The built-in minilm-text3 pool end to end, offline: the README's main command on a subset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_fusion.reports.report import EvaluationReport

pytestmark = pytest.mark.slow


def test_minilm_text3_fuses_and_scores_offline(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_fusion",
            "merge",
            "--pool",
            "minilm-text3",
            "--method",
            "task_arithmetic",
            "--evaluate",
            "--limit",
            "100",
            "--output",
            str(tmp_path / "m"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    report = EvaluationReport.load(tmp_path / "m")
    scores = {r.task: r.scores for r in report.results}
    assert [r.metric_source for r in report.results] == ["bundled"] * 3
    # the shipped experts score as they did after training (BBC 0.96, spam 0.99 on the full test split)
    assert scores["bbc_news"]["individual"] > 0.85 and scores["sms_spam"]["individual"] > 0.9
    fused = [s["fused"] / s["individual"] for s in scores.values()]
    assert sum(fused) / 3 > 0.7  # fusion keeps most of the experts' accuracy
    recipe = yaml.safe_load((tmp_path / "m" / "fusion_recipe.yaml").read_text())
    assert recipe["pool"] == "minilm-text3" and recipe["base"] == "builtin:all-MiniLM-L6-v2"
    assert recipe["models"][0] == "builtin:minilm-text3/bbc_news" and recipe["heads"] == ["classifier.*"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "ships with hf-fusion" in card and "| bbc_news |" in card
    assert (tmp_path / "m" / "1_Pooling" / "config.json").is_file()  # still a sentence-transformers folder
    assert "| fused |" in out.stdout
