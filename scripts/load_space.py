"""Load test of the Space on loopback: N visitors merge the built-in pool at once.

Starts ``hf-fusion space --no-local-paths`` as its own process (with its temporary folder and gradio cache under a
scratch folder, so what it leaves on disk can be measured), then N gradio_client visitors each send a merge with
their own scaling factor at the same moment. It reports, as a JSON file and a Markdown table:

- latency of served merges (p50, max) and how many were refused at once because the line was full;
- isolation: each visitor's zip holds the recipe with its own scaling factor, and the weights differ per visitor;
- the server's RSS: before the burst (after one warm-up merge, which pays the imports), peak, and after the jobs
  (idle, once memory has been handed back);
- disk under the scratch folder: peak while visitors are active, after every visitor is done (the newest merge of
  each session is kept for Push), after the idle time with every visitor still connected (sessions removed by
  idle time alone), and after the server stops (SIGTERM).

Nothing leaves the machine: the server listens on 127.0.0.1 and the pool ships with hf-fusion.

    python scripts/load_space.py --visitors 12 --concurrency 2 --max-waiting 6 --idle-seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import psutil
import yaml

from hf_fusion.space import free_port
from hf_fusion.space.session import folder_bytes as disk_bytes


def rss(pid: int) -> int:
    """Resident memory of the server and its children."""
    try:
        proc = psutil.Process(pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return 0


class Sampler(threading.Thread):
    """Samples the server's RSS and the scratch folder's size every ``interval`` seconds."""

    def __init__(self, pid: int, scratch: Path, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.scratch, self.interval = pid, scratch, interval
        self.peak_rss = 0
        self.peak_disk = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.peak_rss = max(self.peak_rss, rss(self.pid))
            self.peak_disk = max(self.peak_disk, disk_bytes(self.scratch))


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/config", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


def visitor(
    url: str, index: int, scratch: Path, results: list[dict[str, Any]], start: threading.Event, clients: list[Any]
) -> None:
    """One visitor: a merge with its own scaling factor; the zip is fetched later (see :func:`check_isolation`) so
    that the latency is the server's, not this machine's download of 90 MB per visitor."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    factor = round(0.1 + 0.05 * index, 2)
    recipe = yaml.safe_dump(
        {"method": "task_arithmetic", "pool": "minilm-text3", "parameters": {"scaling_factor": factor}}
    )
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    clients.append(client)  # kept open (its heartbeat running) until the idle time has been measured
    start.wait()
    began = time.perf_counter()
    record: dict[str, Any] = {"visitor": index, "scaling_factor": factor}
    try:
        status, _, _, archive, _ = client.predict(recipe, False, 0, api_name="/merge")
        record.update(
            outcome="served",
            seconds=time.perf_counter() - began,
            status=status,
            archive=archive["url"] if isinstance(archive, dict) else archive,
        )
    except AppError as err:
        record.update(
            outcome="refused" if "busy" in str(err) else "failed",
            seconds=time.perf_counter() - began,
            status=str(err)[:200],
        )
    results.append(record)


def check_isolation(record: dict[str, Any], scratch: Path) -> None:
    """Downloads a visitor's zip as its browser would and checks it holds that visitor's own merge."""
    import urllib.error
    import urllib.request

    target = scratch / f"visitor-{record['visitor']}.zip"
    try:
        with urllib.request.urlopen(record["archive"], timeout=120) as response, target.open("wb") as out:
            shutil.copyfileobj(response, out)
    except urllib.error.HTTPError:  # evicted to keep the disk budget (or removed as idle): nothing to check
        record["evicted"] = True
        target.unlink(missing_ok=True)
        return
    with zipfile.ZipFile(target) as zf:
        recipe_name = next(n for n in zf.namelist() if n.endswith("recipe.yaml"))
        got = yaml.safe_load(zf.read(recipe_name))["parameters"]["scaling_factor"]
        weights = sorted(n for n in zf.namelist() if n.endswith(".safetensors"))
        record["own_recipe"] = got == record["scaling_factor"]
        record["weights_digest"] = hash(b"".join(zf.read(n)[-4096:] for n in weights))
    target.unlink()


def warm_up(url: str, scratch: Path) -> float:
    """One merge by a visitor who then leaves (its session is removed on leaving); returns its latency."""
    results: list[dict[str, Any]] = []
    clients: list[Any] = []
    start = threading.Event()
    start.set()
    visitor(url, 0, scratch, results, start, clients)
    for client in clients:
        client.close()
    if results[0]["outcome"] != "served":
        raise SystemExit(f"the warm-up merge failed: {results[0]['status']}")
    return float(results[0]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-waiting", type=int, default=6)
    parser.add_argument("--idle-seconds", type=float, default=20)
    parser.add_argument("--disk-budget", default="2GB")
    parser.add_argument("--output", type=Path, default=Path("load_space.json"))
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="hf-fusion-load-"))
    server_tmp = scratch / "server"
    server_tmp.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "TMPDIR": str(server_tmp),
        "GRADIO_TEMP_DIR": str(server_tmp / "gradio"),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    command = [
        sys.executable,
        "-m",
        "hf_fusion",
        "space",
        "--no-local-paths",
        "--port",
        str(port),
        "--concurrency",
        str(args.concurrency),
        "--max-waiting",
        str(args.max_waiting),
        "--idle-seconds",
        str(args.idle_seconds),
        "--disk-budget",
        args.disk_budget,
        "--quiet",
    ]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report: dict[str, Any] = {
        "visitors": args.visitors,
        "concurrency": args.concurrency,
        "max_waiting": args.max_waiting,
        "idle_seconds": args.idle_seconds,
        "disk_budget": args.disk_budget,
        "cpu_count": os.cpu_count(),
    }
    try:
        wait_until_up(url, proc)
        report["rss_cold"] = rss(proc.pid)
        report["warmup_seconds"] = warm_up(url, scratch)  # the first merge also imports torch, transformers, ...
        time.sleep(3)
        report["rss_before_jobs"] = rss(proc.pid)
        report["disk_before_jobs"] = disk_bytes(server_tmp)
        sampler = Sampler(proc.pid, server_tmp)
        sampler.start()
        results: list[dict[str, Any]] = []
        start = threading.Event()
        clients: list[Any] = []
        threads = [
            threading.Thread(target=visitor, args=(url, i, scratch, results, start, clients))
            for i in range(args.visitors)
        ]
        for thread in threads:
            thread.start()
        time.sleep(3)  # every client has fetched the app's config
        began = time.perf_counter()
        start.set()
        for thread in threads:
            thread.join()
        report["wall_seconds"] = time.perf_counter() - began
        time.sleep(3)
        report["disk_after_jobs"] = disk_bytes(server_tmp)
        report["rss_after_jobs"] = rss(proc.pid)
        for record in results:
            if record["outcome"] == "served":
                check_isolation(record, scratch)
        time.sleep(args.idle_seconds + min(30, args.idle_seconds / 4) + 3)
        report["disk_after_idle"] = disk_bytes(server_tmp)  # the visitors are still connected
        report["rss_idle"] = rss(proc.pid)
        for client in clients:
            client.close()
        sampler.halt.set()
        sampler.join()
        report["rss_peak"] = sampler.peak_rss
        report["disk_peak"] = sampler.peak_disk
        served = [r for r in results if r["outcome"] == "served"]
        latencies = sorted(r["seconds"] for r in served)
        report["served"] = len(served)
        report["latencies"] = [round(t, 2) for t in latencies]
        report["refused_busy"] = sum(r["outcome"] == "refused" for r in results)
        report["failed"] = [r for r in results if r["outcome"] == "failed"]
        report["latency_p50"] = statistics.median(latencies) if latencies else None
        report["latency_max"] = max(latencies) if latencies else None
        report["refusal_max_seconds"] = max((r["seconds"] for r in results if r["outcome"] == "refused"), default=None)
        checked = [r for r in served if not r.get("evicted")]
        report["evicted_before_download"] = len(served) - len(checked)
        report["isolation_checked"] = len(checked)
        report["isolation_own_recipe"] = all(r.get("own_recipe") for r in checked)
        report["isolation_distinct_weights"] = len({r["weights_digest"] for r in checked}) == len(checked)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        report["server_exit_code"] = proc.returncode
        report["disk_after_stop"] = disk_bytes(server_tmp)
        shutil.rmtree(scratch, ignore_errors=True)
    args.output.write_text(json.dumps(report, indent=2))
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    print(f"warm-up merge (cold server): {report['warmup_seconds']:.1f} s; RSS cold {gb(report['rss_cold'])}")
    print(
        "| visitors | served | refused at once | latency p50 / max | RSS before / peak / idle after | "
        "disk peak / after jobs / after idle / after stop |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.visitors} | {report['served']} | {report['refused_busy']} "
        f"(in <= {report['refusal_max_seconds'] or 0:.2f} s) | {report['latency_p50'] or 0:.1f} s / "
        f"{report['latency_max'] or 0:.1f} s | {gb(report['rss_before_jobs'])} / {gb(report['rss_peak'])} / "
        f"{gb(report['rss_idle'])} | {gb(report['disk_peak'])} / {gb(report['disk_after_jobs'])} / "
        f"{gb(report['disk_after_idle'])} / {gb(report['disk_after_stop'])} |"
    )
    print(
        f"isolation ({report['isolation_checked']} zips downloaded after the burst, "
        f"{report['evicted_before_download']} already evicted for the disk budget): own recipe in every zip: "
        f"{report['isolation_own_recipe']}, distinct weights: "
        f"{report['isolation_distinct_weights']}; failed: {len(report['failed'])}; "
        f"server exit code after SIGTERM: {report['server_exit_code']}"
    )


if __name__ == "__main__":
    main()
