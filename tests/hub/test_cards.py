"""Cards tell the truth in every combination, and their front matter always parses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_helpers import publish
from huggingface_hub import ModelCard

import hf_fusion
from hf_fusion.reports.report import REPORT_FILENAME, EvaluationReport, TaskResult


def _front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    data = yaml.safe_load(text.split("---\n")[1])
    card = ModelCard.load(folder / "README.md")  # also validates model-index
    assert card.data.to_dict() == data
    return data


@pytest.mark.parametrize("case", ["no base", "one model", "local inputs", "hub and local"])
def test_front_matter_is_valid_in_every_combination(case: str, hub_pool, bert_pool, tmp_path: Path) -> None:
    base, experts = bert_pool
    hub_base, hub_experts = hub_pool["base"], hub_pool["experts"]
    args = {
        "no base": dict(models=hub_experts, method="simple_average"),
        "one model": dict(models=hub_experts[:1], base=hub_base, method="linear_interpolation", t=0.4),
        "local inputs": dict(models=[str(e) for e in experts], base=str(base), method="ties"),
        "hub and local": dict(models=[hub_experts[0], str(experts[1])], base=hub_base, method="ties"),
    }[case]
    hf_fusion.merge(output=tmp_path / "o", show_progress=False, **args)
    data = _front_matter(tmp_path / "o")
    hub_inputs = [m for m in [args.get("base"), *args["models"]] if m and not m.startswith("/")]
    if hub_inputs:
        assert data["base_model"] == hub_inputs and data["base_model_relation"] == "merge"
    else:
        assert "base_model" not in data and "base_model_relation" not in data
    assert "model-index" not in data
    assert data["license"] == ("apache-2.0" if case in ("no base", "one model") else "unknown")


def test_license_is_unknown_when_inputs_disagree(hub, hub_pool, bert_pool, tmp_path: Path) -> None:
    base, experts = bert_pool
    publish(hub, "fusion-lab/mit-ft", experts[1], license="mit")
    hf_fusion.merge(
        models=[hub_pool["experts"][0], "fusion-lab/mit-ft"],
        method="simple_average",
        output=tmp_path / "o",
        show_progress=False,
    )
    assert _front_matter(tmp_path / "o")["license"] == "unknown"


def test_card_command_adds_evaluation_results(hub_pool, tmp_path: Path) -> None:
    hf_fusion.merge(
        models=hub_pool["experts"], base=hub_pool["base"], method="ties", output=tmp_path / "o", show_progress=False
    )
    report = EvaluationReport(
        results=[
            TaskResult(
                task="sst2",
                task_type="text-classification",
                dataset="glue",
                dataset_config="sst2",
                split="validation",
                metric="accuracy",
                scores={"fused": 0.9123, "pretrained": 0.5, "ft0": 0.93},
            ),
            TaskResult(
                task="cola",
                task_type="text-classification",
                dataset="glue",
                dataset_config="cola",
                split="validation",
                metric="accuracy",
                scores={"fused": 0.7, "pretrained": 0.6, "ft1": 0.8},
            ),
        ]
    )
    (tmp_path / "o" / REPORT_FILENAME).write_text(report.model_dump_json(indent=2))
    out = subprocess.run(
        [sys.executable, "-m", "hf_fusion", "card", str(tmp_path / "o"), "--repo-id", "alice/fused"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    card = ModelCard.load(tmp_path / "o" / "README.md")
    results = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("sst2", "accuracy"): 0.9123, ("cola", "accuracy"): 0.7}
    assert card.data.model_name == "fused"
    assert "| task | dataset | split | examples | metric | fused | pretrained | ft0 | ft1 |" in card.text
    assert "| sst2 | glue | validation |  | accuracy | 0.9123 | 0.5000 | 0.9300 |  |" in card.text
    assert 'from_pretrained("alice/fused")' in card.text


def test_card_refuses_a_folder_without_recipe(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "hf_fusion", "card", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "no fusion_recipe.yaml" in out.stderr


@pytest.mark.parametrize("case", ["missing", "file"])
def test_card_names_a_missing_folder_or_a_file(case: str, tmp_path: Path) -> None:
    target = tmp_path / "missing"
    if case == "file":
        target.write_text("not a folder")
    out = subprocess.run([sys.executable, "-m", "hf_fusion", "card", str(target)], capture_output=True, text=True)
    expected = "does not exist" if case == "missing" else "is a file, not a folder"
    assert out.returncode == 1 and expected in out.stderr, out.stderr
    assert "not made by hf-fusion" not in out.stderr
