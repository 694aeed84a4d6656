"""The hf-fusion command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import reference as ref
import yaml
from safetensors.torch import load_file


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hf_fusion", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_is_fast_and_lists_commands() -> None:
    started = time.perf_counter()
    out = run("--help")
    assert out.returncode == 0 and "merge" in out.stdout and "methods" in out.stdout
    assert time.perf_counter() - started < 5  # no torch import for --help


def test_methods_lists_every_registered_method() -> None:
    out = run("methods", "--json")
    assert out.returncode == 0
    methods = {m["name"]: m for m in json.loads(out.stdout)}
    assert {
        "simple_average",
        "weighted_average",
        "linear_interpolation",
        "task_arithmetic",
        "ties_merging",
        "dare_simple_average",
        "dare_task_arithmetic",
        "dare_ties_merging",
        "slerp",
        "expo",
    } <= set(methods)
    ties = {p["name"]: p for p in methods["ties_merging"]["parameters"]}
    assert ties["scaling_factor"]["default"] == 0.3 and ties["threshold"]["default"] == 20
    assert "ties" in methods["ties_merging"]["aliases"]
    table = run("methods")
    assert "ties_merging" in table.stdout and "scaling_factor=0.3" in table.stdout


def test_merge_from_flags_then_from_the_saved_recipe(tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    out = run(
        "merge",
        "--repo-ids",
        *map(str, experts),
        "--base",
        str(base),
        "--method",
        "ties_merging",
        "--param",
        "scaling_factor=0.3",
        "--param",
        "threshold=20",
        "--output",
        str(tmp_path / "merged"),
    )
    assert out.returncode == 0, out.stderr
    assert "Fused 3 models with ties_merging" in out.stdout
    expected = ref.ties(ref.load_state(base), [ref.load_state(e) for e in experts], 0.3, 20)
    fused = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(abs(fused[k].double() - v).max() < 1e-5 for k, v in expected.items())
    again = run(
        "merge",
        "--config",
        str(tmp_path / "merged" / "fusion_recipe.yaml"),
        "--output",
        str(tmp_path / "again"),
        "--quiet",
    )
    assert again.returncode == 0 and again.stdout == "" and again.stderr == ""
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()


def test_handwritten_recipe_with_flag_overrides(tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    recipe = {
        "method": "task_arithmetic",
        "models": [str(e) for e in experts[:2]],
        "base": str(base),
        "parameters": {"scaling_factor": 0.5},
        "dtype": "bf16",
        "output": str(tmp_path / "from_yaml"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = run("merge", "--config", str(tmp_path / "recipe.yaml"), "--param", "scaling_factor=0.7")
    assert out.returncode == 0, out.stderr
    saved = yaml.safe_load((tmp_path / "from_yaml" / "fusion_recipe.yaml").read_text())
    assert saved["parameters"] == {"scaling_factor": 0.7, "weights": None, "normalize": False}
    assert saved["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "tiess"], "unknown method 'tiess'. Did you mean 'ties_merging'"),
        (["--method", "ties", "--param", "threshold=0"], "threshold: Input should be greater than 0"),
        (["--method", "ties", "--param", "oops"], "--param takes NAME=VALUE"),
    ],
)
def test_errors_exit_non_zero_without_traceback(tmp_path: Path, bert_pool, args: list[str], message: str) -> None:
    base, experts = bert_pool
    out = run("merge", "--repo-ids", *map(str, experts), "--base", str(base), "--output", str(tmp_path / "o"), *args)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()


def test_bad_recipe_file(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("method: ties\nmodels: [a]\nscaling_factor: 3\n")
    out = run("merge", "--config", str(tmp_path / "r.yaml"))
    assert out.returncode == 1 and "unknown recipe field 'scaling_factor'" in out.stderr


SLOW_MERGE = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    from hf_fusion.methods.task_arithmetic import TaskArithmetic
    # a test run started in the background inherits an ignored SIGINT; a user's terminal delivers it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    original = TaskArithmetic.merge
    def slow(self, inputs):
        pathlib.Path(os.environ["MERGING_MARKER"]).touch()  # tells the test that tensors are being merged
        time.sleep(5)  # small tensors merge in a few calls: each must outlast a busy machine's scheduling delay
        return original(self, inputs)
    TaskArithmetic.merge = slow
    from hf_fusion.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_merge_leaves_no_output(tmp_path: Path, bert_pool, sig: signal.Signals) -> None:
    base, experts = bert_pool
    (tmp_path / "slow.py").write_text(SLOW_MERGE)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "slow.py"),
            "merge",
            "--repo-ids",
            *map(str, experts),
            "--base",
            str(base),
            "--method",
            "task_arithmetic",
            "--output",
            str(work / "merged"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "MERGING_MARKER": str(tmp_path / "merging")},
    )
    deadline = time.time() + 60
    # wait until tensors are being merged into the temporary folder (a fixed delay is too short on a loaded machine)
    while not ((tmp_path / "merging").exists() and any(p.name.startswith(".hf-fusion-tmp-") for p in work.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the merge never started writing"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted; nothing was written" in stderr
    assert list(work.iterdir()) == []


def test_a_killed_merge_leaves_a_folder_the_next_run_removes(tmp_path: Path, bert_pool) -> None:
    """SIGKILL cannot be caught: the hidden folder stays until the next run on the same output removes it."""
    base, experts = bert_pool
    (tmp_path / "slow.py").write_text(SLOW_MERGE)
    work = tmp_path / "work"
    work.mkdir()
    args = [
        "merge",
        "--repo-ids",
        *map(str, experts),
        "--base",
        str(base),
        "--method",
        "task_arithmetic",
        "--output",
        str(work / "merged"),
    ]
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "slow.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MERGING_MARKER": str(tmp_path / "merging")},
    )
    deadline = time.time() + 60
    while not (tmp_path / "merging").exists():
        assert proc.poll() is None and time.time() < deadline, "the merge never started writing"
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = [p.name for p in work.iterdir()]
    assert left.startswith(".hf-fusion-tmp-merged-")
    again = run(*args)
    assert again.returncode == 0, again.stderr
    assert f"removed {left}, left by an interrupted run" in again.stderr
    assert sorted(p.name for p in work.iterdir()) == ["merged"]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--push", "", "argument --push: needs a repo name"),
        ("--push", "a b", "is not a valid Hub repo id"),
        ("--max-shard-size", "0", "argument --max-shard-size: a size must be positive"),
        ("--limit", "0", "argument --limit: must be at least 1"),
        ("--batch-size", "-3", "argument --batch-size: must be at least 1"),
        ("--lr", "nan", "argument --lr: must be a finite number"),
    ],
)
def test_flag_values_that_would_be_ignored_or_misread_are_refused(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    out = run(
        "merge",
        "--repo-ids",
        "org/a",
        "org/b",
        "--method",
        "simple_average",
        "--output",
        str(tmp_path / "o"),
        flag,
        value,
    )
    assert out.returncode == 2 and message in out.stderr
    assert not (tmp_path / "o").exists()
