"""`hf-fusion evaluate --limit` labels a subset as one, in the report, the card body and the model-index, and says
which files it rewrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

import hf_fusion
from hf_fusion.cli import main


@pytest.fixture(scope="module")
def fused(text_pool: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("evaluated") / "fused"
    hf_fusion.merge(pool=str(text_pool / "pool.yaml"), method="task_arithmetic", output=output, show_progress=False)
    return output


def _evaluate(fused: Path, text_pool: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    code = main(
        [
            "evaluate",
            "--model",
            str(fused),
            "--pool",
            str(text_pool / "pool.yaml"),
            "--metrics",
            "bundled",
            "--batch-size",
            "8",
            *extra,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_limit_is_labelled_in_report_card_and_model_index(fused: Path, text_pool: Path, capsys) -> None:
    out = _evaluate(fused, text_pool, capsys, "--limit", "10")
    report = json.loads((fused / "evaluation.json").read_text())
    assert [(r["task"], r["examples"], r["subset_seed"]) for r in report["results"]] == [
        ("reviews_a", 10, 0),
        ("reviews_b", 10, 0),
    ]
    card = ModelCard.load(fused / "README.md")
    splits = {r.dataset_name: r.dataset_split for r in card.data.eval_results}
    assert splits == {"reviews_a": "test (sample of 10, seed 0)", "reviews_b": "validation (sample of 10, seed 0)"}
    assert "**These scores come from a subset, not the whole split**" in card.text
    assert "reviews_a: 10 of its test split, reviews_b: 10 of its validation split" in card.text
    assert "shuffled with seed 0" in card.text
    assert "| reviews_a | fusion-lab/reviews-a | test (sample of 10, seed 0) | 10 | accuracy |" in card.text
    assert "not the whole split (--limit 10): reviews_a 10, reviews_b 10 examples" in out
    assert f"Wrote {fused / 'evaluation.json'}" in out
    assert f"Rewrote {fused / 'README.md'} with these scores" in out


def test_a_limit_above_the_split_size_is_the_whole_split(fused: Path, text_pool: Path, capsys) -> None:
    out = _evaluate(fused, text_pool, capsys, "--limit", "100")  # each split holds 24 examples
    report = json.loads((fused / "evaluation.json").read_text())
    assert [(r["examples"], r["subset_seed"]) for r in report["results"]] == [(24, None), (24, None)]
    text = (fused / "README.md").read_text()
    data = yaml.safe_load(text.split("---\n")[1])
    splits = [r["dataset"]["split"] for r in data["model-index"][0]["results"]]
    assert splits == ["test", "validation"]
    assert "come from a subset" not in text and "not the whole split" not in out
    assert "| reviews_a | fusion-lab/reviews-a | test | 24 | accuracy |" in text
