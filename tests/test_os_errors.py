"""What the file system refuses becomes a message that says what to do, and leaves nothing behind.

Disk full and read-only folders are real: small tmpfs mounts (needs root, as CI runs; skipped elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import hf_fusion
from hf_fusion.errors import FileSystemError
from hf_fusion.output import TEMP_PREFIX, clean_leftovers


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hf_fusion", *args], capture_output=True, text=True, timeout=300)


def _merge_args(pool: tuple[Path, list[Path]], output: Path) -> list[str]:
    base, experts = pool
    return [
        "merge",
        "--repo-ids",
        *map(str, experts),
        "--base",
        str(base),
        "--method",
        "task_arithmetic",
        "--output",
        str(output),
        "--quiet",
    ]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:
    mounted: list[Path] = []

    def make(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def _no_traceback(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and out.stderr.startswith("hf-fusion: error: ")


def test_disk_full_while_writing(mount, bert_pool) -> None:
    # 128 MB passes the free-space estimate (output + a 64 MB margin); 4 inodes run out at the third file written
    disk = mount("full", "size=128m,nr_inodes=4")
    out = run(*_merge_args(bert_pool, disk / "merged"))
    _no_traceback(out)
    assert "no space left on the device; free some space or write the output elsewhere" in out.stderr
    assert list(disk.iterdir()) == []  # the atomic folder is gone


def test_read_only_folder(mount, bert_pool) -> None:
    disk = mount("ro", "ro,size=1m")
    out = run(*_merge_args(bert_pool, disk / "sub" / "merged"))
    _no_traceback(out)
    assert f"cannot write the output folder {disk / 'sub' / 'merged'}: permission denied in {disk}" in out.stderr


def test_output_under_a_file(tmp_path: Path, bert_pool) -> None:
    (tmp_path / "file").write_text("x")
    out = run(*_merge_args(bert_pool, tmp_path / "file" / "merged"))
    _no_traceback(out)
    assert f"{tmp_path / 'file'} is a file, not a folder" in out.stderr


def test_a_path_too_long_for_the_file_system(tmp_path: Path, bert_pool) -> None:
    out = run(*_merge_args(bert_pool, tmp_path / ("x" * 300)))
    _no_traceback(out)
    assert "a file name is too long for the file system" in out.stderr
    assert os.listdir(tmp_path) == []


def test_a_300_character_repo_id() -> None:
    out = run("merge", "--repo-ids", "a" * 300, "org/b", "--method", "simple_average", "--output", "unused")
    _no_traceback(out)
    assert "is neither a local folder nor a valid Hub repo id" in out.stderr


def test_python_api_raises_a_fusion_error(mount, bert_pool) -> None:
    disk = mount("full-api", "size=128m,nr_inodes=4")
    base, experts = bert_pool
    with pytest.raises(FileSystemError, match="no space left"):
        hf_fusion.merge(
            models=[str(e) for e in experts],
            base=str(base),
            method="task_arithmetic",
            output=disk / "m",
            show_progress=False,
        )


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_runs_are_removed_and_a_moved_output_restored(tmp_path: Path) -> None:
    target = tmp_path / "m"
    dead = _dead_pid()
    partial = tmp_path / f"{TEMP_PREFIX}m-{dead}-0123abcd"
    moved = tmp_path / f"{TEMP_PREFIX}old-m-{dead}-4567abcd"
    live = tmp_path / f"{TEMP_PREFIX}m-{os.getppid()}-89abcdef"  # a run that is still going: left alone
    other = tmp_path / f"{TEMP_PREFIX}mm-{dead}-01234567"  # another output's: not ours to touch
    for folder in (partial, moved, live, other):
        folder.mkdir()
    (moved / "model.safetensors").write_text("the previous output")
    removed = clean_leftovers(target)
    assert removed == [partial]
    assert (target / "model.safetensors").read_text() == "the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name, other.name])
