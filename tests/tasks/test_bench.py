"""`hf-fusion bench` and `hf-fusion evaluate`: leaderboards, reports and plots from real runs on a tiny pool."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fusion.reports.leaderboard import rows
from hf_fusion.reports.report import EvaluationReport


@pytest.fixture
def text_pool_file(text_pool: Path) -> Path:
    return text_pool / "pool.yaml"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hf_fusion", *args], capture_output=True, text=True, timeout=600)


def test_bench_with_a_sweep(text_pool_file: Path, tmp_path: Path) -> None:
    out = run(
        "bench",
        "--pool",
        str(text_pool_file),
        "--methods",
        "simple_average,task_arithmetic",
        "--sweep",
        "scaling_factor=0.2:0.6:0.2",
        "--output",
        str(tmp_path / "r"),
        "--metrics",
        "bundled",
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    report = EvaluationReport.model_validate_json((tmp_path / "r" / "evaluation.json").read_text())
    labels = [
        "simple_average",
        "task_arithmetic[scaling_factor=0.2]",
        "task_arithmetic[scaling_factor=0.4]",
        "task_arithmetic[scaling_factor=0.6]",
    ]
    assert set(report.columns()) == {*labels, "pretrained", "individual"}
    table = list(csv.DictReader(io.StringIO((tmp_path / "r" / "leaderboard.csv").read_text())))
    by_model = {r["model"]: r for r in table}
    for row in rows(report):
        assert float(by_model[row.label]["average"]) == pytest.approx(row.average)
        assert float(by_model[row.label]["normalized"]) == pytest.approx(
            sum(r.scores[row.label] / r.scores["individual"] for r in report.results) / len(report.results)
        )
    assert "| task_arithmetic[scaling_factor=0.4] |" in out.stdout
    for png in ("scores_per_task.png", "sweep_scaling_factor.png"):
        assert (tmp_path / "r" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = json.loads((tmp_path / "r" / "bench.json").read_text())["models"]
    assert all(Path(p, "model.safetensors").is_file() for p in models.values())


def test_evaluate_command_adds_the_report_to_a_fused_folder(text_pool_file: Path, tmp_path: Path) -> None:
    merged = run("merge", "--pool", str(text_pool_file), "--method", "ties", "--output", str(tmp_path / "m"), "--quiet")
    assert merged.returncode == 0, merged.stderr
    out = run(
        "evaluate",
        "--model",
        str(tmp_path / "m"),
        "--pool",
        str(text_pool_file),
        "--metrics",
        "bundled",
        "--tasks",
        "reviews_a",
        "--limit",
        "10",
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    report = EvaluationReport.load(tmp_path / "m")
    assert [r.task for r in report.results] == ["reviews_a"] and report.limit == 10 and report.results[0].examples == 10
    assert "| fused |" in out.stdout and "## Evaluation" in (tmp_path / "m" / "README.md").read_text()


def test_evaluate_names_an_unreachable_dataset(text_pool_file: Path, tmp_path: Path) -> None:
    import yaml

    pool = yaml.safe_load(text_pool_file.read_text())
    pool["tasks"]["reviews_a"]["dataset"] = "fusion-lab/no-such-dataset"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(pool))
    out = run("evaluate", "--model", pool["base"], "--pool", str(broken), "--metrics", "bundled", "--quiet")
    assert out.returncode == 1
    assert "task reviews_a: cannot load dataset fusion-lab/no-such-dataset, split 'test'" in out.stderr
    assert "HF_HUB_OFFLINE=1" in out.stderr


def test_methods_with_one_model_per_task_are_scored_task_by_task(text_pool_file: Path, tmp_path: Path) -> None:
    """EMR-Merging writes a model per task; each task is scored with its own, exactly as when evaluated alone."""
    out = run(
        "bench",
        "--pool",
        str(text_pool_file),
        "--methods",
        "emr_merging",
        "--output",
        str(tmp_path / "r"),
        "--metrics",
        "bundled",
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    models = json.loads((tmp_path / "r" / "bench.json").read_text())["models"]["emr_merging"]
    assert set(models) == {"reviews_a", "reviews_b"} and models["reviews_a"] != models["reviews_b"]
    report = EvaluationReport.model_validate_json((tmp_path / "r" / "evaluation.json").read_text())
    for task, folder in models.items():
        alone = run(
            "evaluate",
            "--model",
            folder,
            "--pool",
            str(text_pool_file),
            "--metrics",
            "bundled",
            "--tasks",
            task,
            "--no-baselines",
            "--report",
            str(tmp_path / f"{task}.json"),
            "--quiet",
        )
        assert alone.returncode == 0, alone.stderr
        single = EvaluationReport.model_validate_json((tmp_path / f"{task}.json").read_text())
        expected = next(r for r in report.results if r.task == task).scores["emr_merging"]
        assert single.results[0].scores[Path(folder).name] == pytest.approx(expected)
    whole = run(
        "evaluate",
        "--model",
        str(tmp_path / "r" / "models" / "emr_merging"),
        "--pool",
        str(text_pool_file),
        "--metrics",
        "bundled",
        "--no-baselines",
        "--quiet",
    )
    assert whole.returncode == 0, whole.stderr
    assert "| fused |" in whole.stdout


def test_a_method_entry_carries_its_own_parameters() -> None:
    from hf_fusion.bench import parse_method_entry
    from hf_fusion.cli.arguments import method_list as _method_list
    from hf_fusion.errors import RecipeError

    entries = _method_list("simple_average[weight_scope_alignment=true],ties[threshold=10;merge_func=mean],tsv_m")
    assert [parse_method_entry(e) for e in entries] == [
        ("simple_average", {"weight_scope_alignment": True}),
        ("ties", {"threshold": 10, "merge_func": "mean"}),
        ("tsv_m", {}),
    ]
    with pytest.raises(RecipeError, match="key=value"):
        parse_method_entry("ties[threshold]")


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("scaling_factor=0.1:1.0:0.1", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        ("t=0:1:0.6", [0.0, 0.6]),  # stop included, never passed
        ("t=0.3,0.6", [0.3, 0.6]),
    ],
)
def test_sweep_values(text: str, values: list[float]) -> None:
    from hf_fusion.bench import Sweep

    assert Sweep.parse(text).values == values


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t=0:1e12:1e-12", "over a million values"),
        ("t=0:1:0.0001", "10001 values; at most 1000"),
        ("t=0:inf:1", "finite"),
        ("t=nan:1:0.1", "finite"),
        ("t=1,nan", "finite"),
        ("t=1:0:0.1", "START <= STOP"),
        ("t=0:1:0", "positive"),
        ("t=", "finite"),
        ("=1", "NAME=START"),
    ],
)
def test_sweeps_that_would_hang_or_crash_are_refused(text: str, message: str) -> None:
    from hf_fusion.bench import Sweep
    from hf_fusion.errors import RecipeError

    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        Sweep.parse(text)
