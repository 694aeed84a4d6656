"""Evaluation split over processes gives the scores of one process; placement, precision and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import run_cli

import hf_fusion
from hf_fusion.catalog import get_pool
from hf_fusion.errors import RecipeError
from hf_fusion.runtime import Runtime
from hf_fusion.tasks.base import EvalSettings
from hf_fusion.tasks.evaluate import evaluate_pool


def _scores(report: dict) -> dict[str, dict[str, float]]:
    return {r["task"]: r["scores"] for r in report["results"]}


def test_two_processes_score_as_one(tmp_path: Path) -> None:
    """The built-in pool scored by two processes (each scoring half of every task's batches) and by one: the same
    report, printed once."""
    fused = tmp_path / "fused"
    hf_fusion.merge(pool="minilm-text3", method="task_arithmetic", output=fused, show_progress=False)
    args = ["evaluate", "--model", str(fused), "--pool", "minilm-text3", "--limit", "24", "--batch-size", "5"]
    args += ["--no-score-cache", "-q"]
    offline = {"HF_HUB_OFFLINE": "1"}
    one = run_cli([*args, "--report", str(tmp_path / "one.json")], env=offline)
    two = run_cli([*args, "--report", str(tmp_path / "two.json")], processes=2, env=offline)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert _scores(second) == _scores(first)
    assert [r["examples"] for r in second["results"]] == [24, 24, 24]
    assert two.stdout.count("| pretrained |") == 1  # only the main process prints
    assert two.stdout == one.stdout


def test_batches_do_not_depend_on_the_split(text_pool: Path) -> None:
    """Longest examples first, every example once, and each process's share joined back gives the same batches."""
    from hf_fusion.tasks.base import TaskContext
    from hf_fusion.tasks.evaluate import EVALUATORS, fetch_pool

    pool = get_pool(str(text_pool / "pool.yaml"))
    spec = pool.select(None)[0]
    models = fetch_pool(pool, [spec], show_progress=False)
    context = TaskContext(models.base, models.experts[spec.name], tuple(pool.heads))
    evaluator = EVALUATORS[spec.kind](spec, context, EvalSettings(batch_size=5, metrics="bundled"))
    plan = evaluator.batch_plan
    lengths = evaluator.example_lengths()
    order = [i for batch in plan for i in batch]
    assert sorted(order) == list(range(len(evaluator.data)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    shares = [Runtime(p, 3).mine(plan) for p in range(3)]
    joined = [shares[p][k] for k in range(len(shares[0])) for p in range(3) if k < len(shares[p])]
    assert joined == plan


def test_placed_by_accelerate_with_disk_offload(text_pool: Path, tmp_path: Path) -> None:
    """--device-map with a CPU budget smaller than the model: accelerate offloads the rest to disk, and the scores
    are those of the model loaded whole."""
    fused = tmp_path / "fused"
    hf_fusion.merge(pool=str(text_pool / "pool.yaml"), method="task_arithmetic", output=fused, show_progress=False)
    pool = get_pool(str(text_pool / "pool.yaml"))
    plain = EvalSettings(batch_size=5, metrics="bundled", score_cache=False)
    placed = EvalSettings(
        batch_size=5, metrics="bundled", score_cache=False, device_map="auto", max_memory={"cpu": 40_000}
    )
    whole = evaluate_pool(pool, {"fused": fused}, settings=plain, show_progress=False)
    offloaded = evaluate_pool(pool, {"fused": fused}, settings=placed, show_progress=False)
    assert [r.scores for r in offloaded.results] == [r.scores for r in whole.results]


def test_bf16_autocast_scores_close_to_float32(text_pool: Path, tmp_path: Path) -> None:
    fused = tmp_path / "fused"
    hf_fusion.merge(pool=str(text_pool / "pool.yaml"), method="task_arithmetic", output=fused, show_progress=False)
    pool = get_pool(str(text_pool / "pool.yaml"))
    reports = {
        precision: evaluate_pool(
            pool,
            {"fused": fused},
            settings=EvalSettings(batch_size=5, metrics="bundled", mixed_precision=precision),
            show_progress=False,
        )
        for precision in ("no", "bf16")
    }
    for full, low in zip(reports["no"].results, reports["bf16"].results):
        for label, value in full.scores.items():
            assert low.scores[label] == pytest.approx(value, abs=0.15), (full.task, label)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-memory", "cpu:1GB"], "--max-memory needs --device-map"),
        (["--device-map", "auto", "--max-memory", "gpu:1GB"], "DEVICE:SIZE"),
        (["--device-map", "auto", "--max-memory", "0:lots"], "not a size"),
        (["--device-map", "auto", "--max-memory", "cpu:inf"], "not a size"),
        (["--device-map", "auto", "--max-memory", "cpu:1GB,cpu:2GB"], "names cpu twice"),
        (["--mixed-precision", "fp8"], "invalid choice"),
        (["--device-map", "auto", "--eval-device", "cuda"], "leave out the device 'cuda'"),
        (["--device-map", "auto", "--device", "cuda:1"], "leave out the device 'cuda:1'"),
        (["--device-map", "auto", "--max-memory", "3:1GB,cpu:1GB"], "names GPU 3"),
    ],
)
def test_bad_placement_flags_are_refused_before_work(flags: list[str], message: str, capsys) -> None:
    from hf_fusion.cli import main

    with pytest.raises(SystemExit) as refusal:
        main(["evaluate", "--model", "/nonexistent", "--pool", "minilm-text3", *flags])
    assert message in f"{refusal.value.code} {capsys.readouterr().err}"


def test_cuda_without_a_gpu_is_refused_before_work(tmp_path: Path, capsys) -> None:
    import torch

    from hf_fusion.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["evaluate", "--model", "org/never-downloaded", "--pool", "minilm-text3", "--device", "cuda"]) == 1
    assert "no CUDA device is available" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="no CUDA device is available"):
        evaluate_pool(get_pool("minilm-text3"), {"fused": tmp_path / "missing"}, settings=EvalSettings(device="cuda"))
    with pytest.raises(RecipeError, match="no CUDA device is available"):
        hf_fusion.merge(pool="minilm-text3", method="task_arithmetic", output=tmp_path / "m", device="cuda")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("method", ["simple_ensemble", "mixtral_upscaling"])
def test_fused_architectures_placed_by_accelerate(method: str, text_pool: Path, tmp_path: Path) -> None:
    """An ensemble and an up-scaled mixture (hf-fusion architectures around the task's head) scored with part of
    them offloaded to disk give the scores of the model loaded whole."""
    fused = tmp_path / "fused"
    hf_fusion.merge(pool=str(text_pool / "pool.yaml"), method=method, output=fused, show_progress=False)
    pool = get_pool(str(text_pool / "pool.yaml"))
    common = {"batch_size": 5, "metrics": "bundled", "score_cache": False}
    whole = evaluate_pool(pool, {"fused": fused}, settings=EvalSettings(**common), baselines=False, show_progress=False)
    placed = EvalSettings(**common, device_map="auto", max_memory={"cpu": 60_000})
    offloaded = evaluate_pool(pool, {"fused": fused}, settings=placed, baselines=False, show_progress=False)
    assert [r.scores for r in offloaded.results] == [r.scores for r in whole.results]


def test_more_processes_than_batches(tmp_path: Path) -> None:
    """Three examples in one batch, two processes: the second scores nothing, and the scores are one process's."""
    fused = tmp_path / "fused"
    hf_fusion.merge(pool="minilm-text3", method="task_arithmetic", output=fused, show_progress=False)
    args = ["evaluate", "--model", str(fused), "--pool", "minilm-text3", "--tasks", "sms_spam", "--limit", "3"]
    args += ["--no-score-cache", "-q", "--no-baselines"]
    offline = {"HF_HUB_OFFLINE": "1"}
    one = run_cli([*args, "--report", str(tmp_path / "one.json")], env=offline)
    two = run_cli([*args, "--report", str(tmp_path / "two.json")], processes=2, env=offline)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert _scores(second) == _scores(first)
