"""Scores are reused for the same weights and settings, and only then."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import hf_fusion
from hf_fusion.catalog import get_pool
from hf_fusion.tasks import evaluate as evaluation
from hf_fusion.tasks.base import EvalSettings
from hf_fusion.tasks.score_cache import file_digest


@pytest.fixture
def counted(monkeypatch) -> dict[str, list[str]]:
    """Records every evaluator built (per task) and every model scored (per label)."""
    calls: dict[str, list[str]] = {"built": [], "scored": []}
    originals = dict(evaluation.EVALUATORS)

    def counting(kind: str):
        class Counting(originals[kind]):  # type: ignore[misc, valid-type]
            def __init__(self, spec, *args, **kwargs) -> None:
                calls["built"].append(spec.name)
                super().__init__(spec, *args, **kwargs)

            def score(self, model, **kwargs):
                calls["scored"].append(model.label)
                return super().score(model, **kwargs)

        return Counting

    monkeypatch.setattr(evaluation, "EVALUATORS", {kind: counting(kind) for kind in originals})
    return calls


def _evaluate(text_pool: Path, fused: Path, **settings) -> list[dict[str, float | None]]:
    report = evaluation.evaluate_pool(
        get_pool(str(text_pool / "pool.yaml")),
        {"fused": fused},
        settings=EvalSettings(batch_size=5, metrics="bundled", **settings),
        show_progress=False,
    )
    return [r.scores for r in report.results]


def test_second_evaluation_reads_every_score_back(text_pool: Path, tmp_path: Path, counted) -> None:
    fused = tmp_path / "fused"
    hf_fusion.merge(pool=str(text_pool / "pool.yaml"), method="task_arithmetic", output=fused, show_progress=False)
    first = _evaluate(text_pool, fused)
    assert sorted(counted["scored"]) == sorted(["fused", "pretrained", "individual"] * 2)
    counted["built"].clear()
    counted["scored"].clear()
    assert _evaluate(text_pool, fused) == first
    assert counted == {"built": [], "scored": []}  # not even the data or the heads were loaded


def test_changed_weights_are_scored_again_and_baselines_are_not(text_pool: Path, tmp_path: Path, counted) -> None:
    fused = tmp_path / "fused"
    hf_fusion.merge(pool=str(text_pool / "pool.yaml"), method="task_arithmetic", output=fused, show_progress=False)
    _evaluate(text_pool, fused)
    weights = fused / "model.safetensors"
    state = load_file(weights)
    name = next(n for n, t in state.items() if t.is_floating_point() and t.dim() == 2)
    state[name] = state[name] + 1.0
    save_file(state, weights, metadata={"format": "pt"})
    counted["scored"].clear()
    _evaluate(text_pool, fused)
    assert counted["scored"] == ["fused", "fused"]


@pytest.mark.parametrize("change", [{"limit": 7}, {"batch_size": 4}, {"mixed_precision": "bf16"}])
def test_other_settings_are_scored_again(text_pool: Path, tmp_path: Path, counted, change: dict) -> None:
    fused = tmp_path / "fused"
    hf_fusion.merge(pool=str(text_pool / "pool.yaml"), method="task_arithmetic", output=fused, show_progress=False)
    _evaluate(text_pool, fused)
    counted["scored"].clear()
    settings = {"batch_size": 5, **change}
    evaluation.evaluate_pool(
        get_pool(str(text_pool / "pool.yaml")),
        {"fused": fused},
        settings=EvalSettings(metrics="bundled", **settings),
        show_progress=False,
    )
    assert len(counted["scored"]) == 6


def test_no_score_cache_scores_and_stores_nothing(text_pool: Path, tmp_path: Path, counted, own_score_cache) -> None:
    fused = tmp_path / "fused"
    hf_fusion.merge(pool=str(text_pool / "pool.yaml"), method="task_arithmetic", output=fused, show_progress=False)
    for _ in range(2):
        _evaluate(text_pool, fused, score_cache=False)
    assert len(counted["scored"]) == 12
    assert not (own_score_cache / "scores").exists()


def test_hub_cache_files_are_known_by_their_blob_name(tmp_path: Path) -> None:
    """A file in the Hub cache is a link to a blob named by its content hash: no need to read it."""
    content = b"weights"
    blob = tmp_path / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(content)
    link = tmp_path / "snapshots" / "abc" / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert file_digest(link) == blob.name
    plain = tmp_path / "plain.bin"
    plain.write_bytes(content)
    assert file_digest(plain) == hashlib.sha256(content).hexdigest()
