"""The Space holds its disk: sessions' files go when the visitor goes, a server-wide budget bounds what is kept, the
line of jobs is bounded and Stop always answers. Unit tests of the store and the line, then the served app."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError
from public_server import serve_public

from hf_fusion.errors import InsufficientResourcesError, JobStopped
from hf_fusion.space.jobs import Job
from hf_fusion.space.slots import JobSlots, SpaceBusyError
from hf_fusion.space.store import SessionStore

MB = 10**6


def _store(tmp_path: Path, *, idle: float = 60, budget: int = 100 * MB) -> SessionStore:
    return SessionStore(tmp_path / "sessions", tmp_path / "files", idle_seconds=idle, budget_bytes=budget)


def _fill(session, size: int) -> None:  # noqa: ANN001 - a Session
    folder = session.new_folder("merge")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    session.merged = folder


def _busy_job(release: threading.Event) -> Job:
    job = Job(lambda: release.wait(30), "merge")
    return job


def test_a_new_session_creates_nothing_until_a_job_writes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    session = store.open(None, "tab-1")
    assert store.open(session) is session and session.visitor == "tab-1"
    assert not (tmp_path / "sessions").exists() and not (tmp_path / "files").exists()
    _fill(session, 10)
    assert session.workdir.is_dir() and store.used_bytes() == 10


def test_idle_sessions_are_removed_and_running_ones_kept(tmp_path: Path) -> None:
    store = _store(tmp_path, idle=5)
    idle, working = store.open(None), store.open(None)
    _fill(idle, 10)
    _fill(working, 10)
    release = threading.Event()
    working.begin(_busy_job(release))
    assert store.sweep(time.monotonic() + 1) == 0  # not idle yet
    assert store.sweep(time.monotonic() + 6) == 1
    assert not idle.workdir.exists() and idle.closed and "idle" in (idle.removed_reason or "")
    assert working.workdir.exists() and not working.closed
    assert store.open(idle) is not idle  # a returning visitor gets a fresh session
    release.set()
    working.job.wait(10)  # type: ignore[union-attr]


def test_closing_a_busy_session_stops_its_job_and_removes_files_once_it_has_unwound(tmp_path: Path) -> None:
    store = _store(tmp_path)
    session = store.open(None, "tab")
    _fill(session, 10)
    stopped = threading.Event()

    def work() -> None:
        while not session.job.monitor.stop_event.is_set():  # type: ignore[union-attr]
            time.sleep(0.01)
        stopped.set()

    session.begin(Job(work, "merge"))
    assert store.close_visitor("tab") == 1
    assert stopped.wait(10)
    session.job.wait(10)  # type: ignore[union-attr]
    assert session.workdir.exists()  # the job might still have been writing when the tab closed
    assert store.sweep() == 1
    assert not session.workdir.exists()


def test_the_budget_evicts_idle_sessions_least_recently_used_first(tmp_path: Path) -> None:
    store = _store(tmp_path, budget=100 * MB)
    old, recent, me = store.open(None), store.open(None), store.open(None)
    _fill(old, 40 * MB)
    _fill(recent, 40 * MB)
    old.last_used -= 100
    store.reserve(me, 30 * MB)
    assert old.closed and not old.workdir.exists() and "disk" in (old.removed_reason or "")
    assert not recent.closed
    assert store.used_bytes() == 70 * MB  # recent's 40 on disk and my 30 reserved


def test_the_budget_refuses_when_running_jobs_hold_it(tmp_path: Path) -> None:
    store = _store(tmp_path, budget=100 * MB)
    working, me = store.open(None), store.open(None)
    _fill(working, 80 * MB)
    release = threading.Event()
    working.begin(_busy_job(release))
    with pytest.raises(InsufficientResourcesError, match="held by other visitors' running jobs"):
        store.reserve(me, 30 * MB)
    with pytest.raises(InsufficientResourcesError, match="more than this Space's budget"):
        store.reserve(me, 101 * MB)
    assert not working.closed
    release.set()
    working.job.wait(10)  # type: ignore[union-attr]


def test_two_running_jobs_cannot_both_claim_the_same_room(tmp_path: Path) -> None:
    store = _store(tmp_path, budget=100 * MB)
    first, second = store.open(None), store.open(None)
    store.reserve(first, 60 * MB)  # nothing written yet: the reservation still counts
    with pytest.raises(InsufficientResourcesError):
        store.reserve(second, 60 * MB)
    store.settle(first)
    store.reserve(second, 60 * MB)


def test_folders_of_a_dead_server_are_removed_at_start_and_a_live_ones_kept(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / "sessions" / f"server-{finished.stdout.strip()}-abcd"
    alive = tmp_path / "sessions" / f"server-{os.getppid()}-abcd"
    for folder in (dead, alive):
        (folder / "session-x").mkdir(parents=True)
    store = _store(tmp_path)
    assert not dead.exists() and alive.exists()
    _fill(store.open(None), 10)
    store.shutdown()
    assert not store.root.exists() and alive.exists()


def test_the_line_is_bounded_first_come_first_served_and_stoppable() -> None:
    slots = JobSlots(running=1, waiting=2)
    first, second, third = slots.admit(), slots.admit(), slots.admit()
    assert first.granted and (second.ahead(), third.ahead()) == (1, 2)
    with pytest.raises(SpaceBusyError, match="busy: 1 job\\(s\\) running and 2 waiting"):
        slots.admit()
    stop_second = threading.Event()
    errors: list[BaseException] = []

    def wait(ticket, stopped) -> None:  # noqa: ANN001
        try:
            ticket.wait(stopped.is_set)
        except JobStopped as err:
            errors.append(err)

    waiter = threading.Thread(target=wait, args=(second, stop_second))
    waiter.start()
    stop_second.set()
    waiter.join(5)
    assert errors and "waiting for a free slot" in str(errors[0])
    assert third.ahead() == 1 and slots.counts() == (1, 1)
    first.release()
    assert third.granted and slots.counts() == (1, 0)
    third.wait(lambda: False)  # returns at once
    third.release()
    third.release()  # idempotent
    assert slots.counts() == (0, 0)


# the served app ------------------------------------------------------------------------------------------------------

RECIPE = yaml.safe_dump({"method": "task_arithmetic", "pool": "minilm-text3"})


@pytest.fixture(scope="module")
def small_space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A public app with one slot, a line of one, and a short idle time, with its own gradio cache."""
    from hf_fusion.space import SpaceLimits

    cache, sessions = tmp_path_factory.mktemp("gradio-cache"), tmp_path_factory.mktemp("sessions")
    with serve_public(sessions, cache, SpaceLimits(running=1, waiting=1, idle_seconds=4, disk_budget=10**10)) as url:
        yield url, sessions, cache


def _client(url: str, tmp_path: Path, name: str) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / name))


def _files(folder: Path, suffix: str = "") -> list[Path]:
    return [p for p in folder.rglob(f"*{suffix}") if p.is_file()]


def test_refused_requests_leave_nothing(small_space, tmp_path: Path) -> None:
    url, sessions, cache = small_space
    client = _client(url, tmp_path, "a")
    for i in range(30):
        with pytest.raises(AppError):
            client.predict(f"method: task_arithmetic\npool: no-such-pool-{i}\n", False, 0, api_name="/merge")
    with pytest.raises(AppError, match="org/does-not-exist"):  # accepted, then failed in the job: nothing stays
        client.predict("method: simple_average\nmodels: [org/does-not-exist, org/other]\n", False, 0, api_name="/merge")
    assert list(sessions.rglob("*")) == [] and list((cache / "hf-fusion").rglob("*")) == []


def test_the_zip_is_served_from_where_it_was_written_and_goes_with_the_idle_session(small_space, tmp_path) -> None:
    url, sessions, cache = small_space
    client = _client(url, tmp_path, "a")
    status, _, _, archive, _ = client.predict(RECIPE, False, 0, api_name="/merge")
    assert "Merged 3 models" in status
    zips = _files(cache, ".zip")
    assert len(zips) == 1 and zips[0].is_relative_to(cache / "hf-fusion")  # gradio made no copy
    assert Path(archive).read_bytes() == zips[0].read_bytes()
    merged = [p for p in sessions.rglob("model*.safetensors")]
    assert merged, "the merged folder is kept for Push"
    deadline = time.time() + 20
    while time.time() < deadline and (_files(sessions) or _files(cache / "hf-fusion")):
        time.sleep(0.5)
    assert _files(sessions) == [] and _files(cache / "hf-fusion") == []  # removed after 4 s idle
    with pytest.raises(AppError, match="removed because it was idle"):
        client.predict("alice/anything", True, False, api_name="/push")


@pytest.mark.slow
def test_stop_answers_while_every_slot_and_the_line_are_taken(small_space, tmp_path: Path) -> None:
    url, sessions, cache = small_space
    first, second, third = (_client(url, tmp_path, n) for n in "abc")
    long_compare = ("minilm-text3", ["task_arithmetic", "ties_merging"], "scaling_factor=0.1:1.0:0.1", 0)
    running = first.submit(*long_compare, api_name="/compare")
    deadline = time.time() + 60
    while time.time() < deadline and not (running.outputs() and "fusing" in (running.outputs()[-1][1] or "")):
        time.sleep(0.2)
    waiting = second.submit(*long_compare, api_name="/compare")
    while time.time() < deadline and not (waiting.outputs() and "waiting" in (waiting.outputs()[-1][0] or "")):
        time.sleep(0.2)
    assert "waiting for a free slot" in waiting.outputs()[-1][0]
    started = time.perf_counter()
    with pytest.raises(AppError, match="the Space is busy"):
        third.predict(RECIPE, False, 0, api_name="/merge")
    assert "Stopping" in second.predict(api_name="/stop_compare")
    assert "stopped" in waiting.result(timeout=30)[0]
    assert "Stopping" in first.predict(api_name="/stop_compare")
    assert "stopped" in running.result(timeout=60)[0]
    assert time.perf_counter() - started < 30
    assert "Merged 3 models" in third.predict(RECIPE, False, 0, api_name="/merge")[0]  # the slot is free again


def test_leaving_the_server_removes_every_session(tmp_path: Path) -> None:
    from hf_fusion.space import SpaceLimits

    with serve_public(tmp_path / "sessions", tmp_path / "cache", SpaceLimits(disk_budget=10**10)) as url:
        _client(url, tmp_path, "a").predict(RECIPE, False, 0, api_name="/merge")
        assert _files(tmp_path / "sessions") and _files(tmp_path / "cache" / "hf-fusion")
    assert _files(tmp_path / "sessions") == [] and _files(tmp_path / "cache" / "hf-fusion") == []


def test_a_merge_beyond_the_disk_budget_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    from hf_fusion.space import SpaceLimits

    with serve_public(tmp_path / "sessions", tmp_path / "cache", SpaceLimits(disk_budget=50 * MB)) as url:
        with pytest.raises(AppError, match="more than this Space's budget of 0.05 GB"):
            _client(url, tmp_path, "a").predict(RECIPE, False, 0, api_name="/merge")
        assert _files(tmp_path / "sessions") == [] and _files(tmp_path / "cache" / "hf-fusion") == []
