"""Jobs: progress seen through the engine's own bars, Stop that really stops a merge, logs kept per user."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import hf_fusion
from hf_fusion.errors import JobStopped
from hf_fusion.progress import progress_bar
from hf_fusion.space.jobs import Job
from hf_fusion.space.session import Session


def test_stop_during_a_merge_leaves_no_output(tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    reached = threading.Event()
    out = tmp_path / "merged"

    def work() -> object:
        return hf_fusion.merge(
            models=[str(e) for e in experts],
            base=str(base),
            method="ties_merging",
            output=out,
            show_progress=False,
            budget_elements=256,
        )  # many small slices: many steps

    job = Job(work, "merge")
    original = job._on_progress

    def watch(stage: str, done: int, total: int | None) -> None:
        original(stage, done, total)
        if stage == "fusing" and done >= 3:
            reached.set()
            reached.wait()

    job.monitor.on_progress = watch
    job.start()
    assert reached.wait(60)
    job.stop()
    job.wait(30)
    assert not job.running and job.stopped and isinstance(job.error, JobStopped)
    assert 3 <= job.done < (job.total or 0)
    assert not out.exists() and [p for p in tmp_path.iterdir()] == []
    assert "stop requested" in job.log_text() and "stopped" in job.status()


def test_each_job_keeps_only_its_own_log_and_progress() -> None:
    gate = threading.Barrier(2)

    def work(tag: str) -> str:
        logger = logging.getLogger("hf_fusion.test")
        with progress_bar(total=3, desc=f"steps-{tag}", unit="step", disable=True) as bar:
            for i in range(3):
                logger.info("%s step %d", tag, i)
                gate.wait(5)
                bar.update(1)
        return tag

    logging.getLogger("hf_fusion").setLevel(logging.INFO)
    jobs = [Job(lambda t=t: work(t), f"job-{t}").start() for t in ("a", "b")]
    for job in jobs:
        job.wait(30)
    for job, tag, other in zip(jobs, "ab", "ba"):
        assert job.result == tag and job.error is None
        assert f"{tag} step 2" in job.log_text() and f"{other} step" not in job.log_text()
        assert (job.stage, job.done, job.total) == (f"steps-{tag}", 3, 3)


def test_a_session_runs_one_job_at_a_time_and_cleans_up(tmp_path: Path) -> None:
    import pytest

    from hf_fusion.errors import FusionError

    release = threading.Event()
    session = Session("key", tmp_path / "work", tmp_path / "files")
    session.begin(Job(lambda: release.wait(30), "first"))
    with pytest.raises(FusionError, match="still running"):
        session.begin(Job(lambda: None, "second"))
    release.set()
    session.job.wait(10)  # type: ignore[union-attr]
    assert session.stop() == "Nothing is running."
    folder = session.new_folder("merge")
    folder.mkdir(parents=True)
    served = session.served_file("merge.zip")
    served.write_bytes(b"zip")
    assert session.disk_bytes() == 3
    session.remove_files()
    assert not session.workdir.exists() and not session.filesdir.exists()
