"""Joining evaluation reports scored apart (one per bench configuration, one for the baselines) into one."""

from __future__ import annotations

import pytest

from hf_fusion.reports.report import EvaluationReport, TaskResult, join_reports


def result(task: str, scores: dict[str, float | None], **fields: object) -> TaskResult:
    base = {"task_type": "text-classification", "dataset": f"lab/{task}", "metric": "accuracy", "examples": 8}
    return TaskResult(task=task, scores=scores, **{**base, **fields})  # type: ignore[arg-type]


def report(label: str, scores: dict[str, float | None], **fields: object) -> EvaluationReport:
    tasks = [result(task, {label: value}, **fields) for task, value in scores.items()]
    return EvaluationReport(fused=label, results=tasks, pool="p", limit=8)


def test_joined_report_is_the_one_a_single_pass_would_write() -> None:
    baselines = EvaluationReport(
        fused="pretrained",
        results=[
            result("a", {"pretrained": 0.5, "individual": 0.9}, metric_source="bundled"),
            result("b", {"pretrained": 0.4, "individual": 0.8}, metric_source="bundled"),
        ],
        pool="p",
        limit=8,
    )
    first = report("ties", {"a": 0.7, "b": None})
    second = report("task_arithmetic[scaling_factor=0.3]", {"a": 0.6, "b": 0.5})
    joined = join_reports([first, second, baselines])
    assert joined.fused == "ties" and joined.pool == "p" and joined.limit == 8
    assert [r.task for r in joined.results] == ["a", "b"]
    assert list(joined.results[1].scores.items()) == [
        ("ties", None),
        ("task_arithmetic[scaling_factor=0.3]", 0.5),
        ("pretrained", 0.4),
        ("individual", 0.8),
    ]
    assert joined.results[0].metric_source == "bundled"
    assert first.results[0].scores == {"ties": 0.7}  # the inputs are left as they were
    assert join_reports([baselines]) == baselines
    assert join_reports([]).results == []


def test_reports_that_scored_a_task_differently_are_not_joined() -> None:
    with pytest.raises(ValueError, match="task 'a' differently \\(examples\\)"):
        join_reports([report("x", {"a": 0.1}), report("y", {"a": 0.2}, examples=9)])
    with pytest.raises(ValueError, match="scored for x in more than one report"):
        join_reports([report("x", {"a": 0.1}), report("x", {"a": 0.2})])
