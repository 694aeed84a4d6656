"""`hf-fusion bench` as independent jobs: the grid, one result file per configuration, failures kept apart,
reruns that skip what is done, and the same leaderboard from two processes as from one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from launch import run_cli

from hf_fusion.bench import BASELINES, RUNS_FOLDER, Sweep, bench_jobs, run_bench
from hf_fusion.catalog import get_pool
from hf_fusion.errors import JobStopped, RecipeError
from hf_fusion.fusion import merge as REAL_MERGE
from hf_fusion.reports.report import EvaluationReport
from hf_fusion.runtime import LOCAL
from hf_fusion.tasks.base import EvalSettings
from hf_fusion.tasks.evaluate import evaluate_pool as REAL_EVALUATE


def test_the_grid_is_a_list_of_jobs(tmp_path: Path) -> None:
    jobs = bench_jobs(
        ["simple_average[weight_scope_alignment=true]", "ties_merging", "task_arithmetic"],
        tmp_path,
        sweep=Sweep.parse("scaling_factor=0.2,0.4"),
        parameters={"threshold": 10},
        common={"batch_size": 8},
    )
    assert [(j.label, j.name, j.sweep_value) for j in jobs] == [
        ("simple_average[weight_scope_alignment=True]", "simple_average_weight_scope_alignment-True", None),
        ("ties_merging[scaling_factor=0.2]", "ties_merging_scaling_factor-0.2", 0.2),
        ("ties_merging[scaling_factor=0.4]", "ties_merging_scaling_factor-0.4", 0.4),
        ("task_arithmetic[scaling_factor=0.2]", "task_arithmetic_scaling_factor-0.2", 0.2),
        ("task_arithmetic[scaling_factor=0.4]", "task_arithmetic_scaling_factor-0.4", 0.4),
    ]
    assert jobs[0].parameters == {"threshold": 10, "weight_scope_alignment": True}
    assert jobs[2].parameters == {"threshold": 10, "scaling_factor": 0.4}
    assert all(j.folder == tmp_path / "models" / j.name for j in jobs)
    with pytest.raises(RecipeError, match="lists ties_merging more than once"):
        bench_jobs(["ties_merging", "ties"], tmp_path)


@pytest.fixture
def tiny_pool(text_pool: Path) -> Any:
    return get_pool(str(text_pool / "pool.yaml"))


SETTINGS = EvalSettings(metrics="bundled", limit=12)


class Calls:
    """Wraps merge and evaluate_pool, counting what each job really ran; a method may be made to fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failing: dict[str, BaseException] | None = None) -> None:
        import hf_fusion.bench
        import hf_fusion.fusion

        self.merged: list[str] = []
        self.scored: list[list[str]] = []
        merge, evaluate = REAL_MERGE, REAL_EVALUATE

        def counted_merge(**kwargs: Any) -> Any:
            self.merged.append(kwargs["output"].name)
            if kwargs["method"] in (failing or {}):
                raise (failing or {})[kwargs["method"]]
            return merge(**kwargs)

        def counted_evaluate(pool: Any, fused: Any, **kwargs: Any) -> Any:
            self.scored.append(list(fused) or [BASELINES])
            assert kwargs["settings"].across_processes is False  # each job is scored whole by its own process
            return evaluate(pool, fused, **kwargs)

        monkeypatch.setattr(hf_fusion.fusion, "merge", counted_merge)
        monkeypatch.setattr(hf_fusion.bench, "evaluate_pool", counted_evaluate)


def bench(pool: Any, out: Path, **kwargs: Any) -> Any:
    methods = kwargs.pop("methods", ["simple_average", "ties_merging", "task_arithmetic"])
    kwargs.setdefault("settings", SETTINGS)
    return run_bench(pool, methods, out, show_progress=False, runtime=LOCAL, **kwargs)


def test_a_failing_configuration_is_recorded_and_the_others_are_scored(
    tiny_pool: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r"
    calls = Calls(monkeypatch, {"ties_merging": RuntimeError("no memory left for the trim")})
    result = bench(tiny_pool, out)
    assert result.failed == {"ties_merging": "RuntimeError: no memory left for the trim"}
    record = json.loads((out / RUNS_FOLDER / "ties_merging.json").read_text())
    assert record["error"] == "RuntimeError: no memory left for the trim" and "Traceback" in record["traceback"]
    assert record["method"] == "ties_merging" and "report" not in record
    done = json.loads((out / RUNS_FOLDER / "task_arithmetic.json").read_text())
    assert done["label"] == "task_arithmetic" and done["parameters"] == {}
    assert done["folder"] == done["models"] == str(out / "models" / "task_arithmetic")
    assert done["fusion_seconds"] >= 0 and done["evaluation"]["limit"] == 12
    assert EvaluationReport.model_validate(done["report"]).results[0].scores.keys() == {"task_arithmetic"}
    assert set(result.report.columns()) == {"simple_average", "task_arithmetic", "pretrained", "individual"}
    board = (out / "leaderboard.md").read_text()
    assert "| task_arithmetic |" in board and "| ties_merging |" not in board
    assert "Failed (no scores):\n- ties_merging: RuntimeError: no memory left for the trim" in board
    summary = json.loads((out / "bench.json").read_text())
    assert summary["failed"] == result.failed and set(summary["models"]) == {"simple_average", "task_arithmetic"}
    assert calls.scored == [["simple_average"], ["task_arithmetic"], [BASELINES]]


def test_a_rerun_skips_what_is_done_and_runs_what_failed_or_changed(
    tiny_pool: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r"
    Calls(monkeypatch, {"ties_merging": RuntimeError("flaky")})
    first = bench(tiny_pool, out)
    calls = Calls(monkeypatch)
    again = bench(tiny_pool, out)  # no --overwrite needed: only the failed configuration runs
    assert calls.merged == ["ties_merging"] and calls.scored == [["ties_merging"]] and not again.failed
    for label in ("simple_average", "task_arithmetic"):
        assert [r.scores[label] for r in again.report.results] == [r.scores[label] for r in first.report.results]

    (out / RUNS_FOLDER / "simple_average.json").unlink()  # fused, then stopped while scoring
    calls = Calls(monkeypatch)
    bench(tiny_pool, out)
    assert calls.merged == [] and calls.scored == [["simple_average"]]  # its fused folder is scored, not refused
    assert json.loads((out / RUNS_FOLDER / "simple_average.json").read_text())["fusion_seconds"] is None

    calls = Calls(monkeypatch)
    bench(tiny_pool, out, settings=EvalSettings(metrics="bundled", limit=10))  # other scores: everything again
    assert calls.scored == [["simple_average"], ["ties_merging"], ["task_arithmetic"], [BASELINES]]
    assert calls.merged == []  # the fused models themselves did not change

    calls = Calls(monkeypatch)
    bench(tiny_pool, out, overwrite=True, methods=["task_arithmetic"])
    assert calls.merged == ["task_arithmetic"] and calls.scored == [["task_arithmetic"], [BASELINES]]


def test_a_parameter_is_checked_before_any_job_and_stopping_stops_the_bench(
    tiny_pool: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hf_fusion.errors import ParameterError

    with pytest.raises(ParameterError):
        bench(tiny_pool, tmp_path / "bad", methods=["simple_average", "ties_merging[threshold=500]"])
    assert not (tmp_path / "bad").exists()
    calls = Calls(monkeypatch, {"task_arithmetic": JobStopped("stopped")})
    with pytest.raises(JobStopped):
        bench(tiny_pool, tmp_path / "r", methods=["task_arithmetic", "simple_average"])
    assert calls.merged == ["task_arithmetic"]
    assert not (tmp_path / "r" / RUNS_FOLDER / "task_arithmetic.json").exists()


def _bench_command(out: Path) -> list[str]:
    return [
        "bench",
        "--pool",
        "minilm-text3",
        "--methods",
        "simple_average,task_arithmetic",
        "--limit",
        "8",
        "--output",
        str(out),
        "--quiet",
    ]


@pytest.mark.slow
def test_two_processes_write_the_leaderboard_one_process_writes(tmp_path: Path) -> None:
    offline = {"HF_HUB_OFFLINE": "1"}
    two = run_cli(_bench_command(tmp_path / "two"), processes=2, env=offline)
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_cli(_bench_command(tmp_path / "one"), env=offline)
    assert one.returncode == 0, one.stderr[-4000:]
    # the jobs really were shared: each result names the process that ran it (the baselines: the last process)
    written = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "two" / RUNS_FOLDER).glob("*.json")}
    processes = [written[name]["process"] for name in ("simple_average", "task_arithmetic", BASELINES)]
    assert processes == [0, 1, 1], "the two processes did not join one process group (runtime.current())"
    assert two.stdout.count("| simple_average |") == 1  # only the main process prints
    board = (tmp_path / "one" / "leaderboard.md").read_text()
    assert (tmp_path / "two" / "leaderboard.md").read_text() == board and "| task_arithmetic |" in board
    assert (tmp_path / "two" / "leaderboard.csv").read_text() == (tmp_path / "one" / "leaderboard.csv").read_text()
    reports = [EvaluationReport.load(tmp_path / run) for run in ("one", "two")]
    assert reports[0] == reports[1]
