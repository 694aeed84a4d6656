"""``hf-fusion bench``: several methods (and a parameter sweep) on one pool, evaluated side by side.

Each configuration (a method, with a sweep value where it has the swept parameter) is a job: it fuses its model into
``output/models/<name>``, scores it, and writes its result to ``output/runs/<name>.json`` as soon as it is done, or
the error that stopped it; one failing configuration never loses the others. A rerun of the same command skips the
jobs whose result is already there (``overwrite`` runs them all again). The pretrained model and the experts are
scored once, as a job of their own (``runs/baselines.json``).

Under ``torchrun`` or ``accelerate launch`` each process runs its share of the jobs (:meth:`Runtime.mine`), each job
on one process; the main process then joins every result into one report and writes the leaderboard, the JSON
report and the plots into ``output``, the same whatever the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from hf_fusion.atomic import write_text_atomically
from hf_fusion.catalog import Pool
from hf_fusion.errors import JobStopped, RecipeError
from hf_fusion.recipe import RECIPE_FILENAME, Recipe
from hf_fusion.reports.leaderboard import rows, to_csv, to_markdown
from hf_fusion.reports.plots import grouped_bars, sweep_lines
from hf_fusion.reports.report import EvaluationReport, join_reports
from hf_fusion.runtime import LOCAL, Runtime, current
from hf_fusion.tasks.base import EvalSettings
from hf_fusion.tasks.evaluate import evaluate_pool
from hf_fusion.version import __version__

log = logging.getLogger(__name__)


MAX_SWEEP_VALUES = 1000


@dataclass(frozen=True)
class Sweep:
    parameter: str
    values: list[float]

    @classmethod
    def parse(cls, text: str) -> Sweep:
        """``name=start:stop:step`` (stop included) or ``name=v1,v2,...``; finite numbers, at most
        :data:`MAX_SWEEP_VALUES` of them."""
        name, sep, spec = text.partition("=")
        if not sep or not name:
            raise RecipeError(f"--sweep takes NAME=START:STOP:STEP or NAME=V1,V2,..., got {text!r}")
        try:
            if ":" in spec:
                start, stop, step = (float(x) for x in spec.split(":"))
                if not all(math.isfinite(v) for v in (start, stop, step)) or step <= 0 or stop < start:
                    raise ValueError
                count = math.floor((stop - start) / step + 1e-9) + 1  # stop included, never passed
            else:
                values = [float(x) for x in spec.split(",")]
                if not all(math.isfinite(v) for v in values):
                    raise ValueError
                count = len(values)
        except ValueError:
            raise RecipeError(
                f"--sweep values of {name!r} must be finite numbers (START <= STOP, a positive step): {spec!r}"
            ) from None
        if count > MAX_SWEEP_VALUES:
            shown = count if count < 10**6 else "over a million"
            raise RecipeError(
                f"--sweep {text!r} has {shown} values; at most {MAX_SWEEP_VALUES} are run (use a larger "
                "step or fewer values)."
            )
        if ":" in spec:
            values = [round(start + i * step, 10) for i in range(count)]
        return cls(name, values)


@dataclass(frozen=True)
class BenchResult:
    report: EvaluationReport
    leaderboard: str
    output: Path
    failed: dict[str, str] = field(default_factory=dict)
    """Configurations (and ``baselines``) that raised, label -> ``ExceptionType: message``."""


def parse_method_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name[key=value;key=value]``: a method with its own parameters, e.g.
    ``simple_average[weight_scope_alignment=true]`` (values read as YAML scalars)."""
    match = re.fullmatch(r"\s*([^\[\]]+?)\s*(?:\[(.*)\])?\s*", entry)
    if match is None:
        raise RecipeError(f"cannot read method {entry!r}: write name or name[key=value;key=value].")
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (match.group(2) or "").split(";"))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"cannot read parameter {item!r} of method {match.group(1)!r}: write key=value.")
        params[key.strip()] = yaml.safe_load(raw)
    return match.group(1), params


RUNS_FOLDER = "runs"
"""Where each job writes its result, ``<folder name>.json``, under the bench's output folder."""
BASELINES = "baselines"
"""The job scoring the pretrained model and the experts (``runs/baselines.json``; no method bears this name)."""


@dataclass(frozen=True)
class Job:
    """One configuration of the grid: a method with its parameters, fused into ``folder`` and scored there."""

    label: str
    method: str
    parameters: dict[str, Any]
    folder: Path
    sweep_value: float | None = None

    @property
    def name(self) -> str:
        """The name of its fused folder and of its result file."""
        return self.folder.name


def folder_name(label: str) -> str:
    """A configuration's folder name: ``task_arithmetic[scaling_factor=0.3]`` -> ``task_arithmetic_scaling_factor-0.3``."""
    return label.replace("[", "_").replace("]", "").replace("=", "-")


def bench_jobs(
    methods: list[str],
    output: Path,
    *,
    sweep: Sweep | None = None,
    parameters: dict[str, Any] | None = None,
    common: dict[str, Any] | None = None,
) -> list[Job]:
    """The grid, in the order the methods are given: each method once, or once per sweep value when it has the
    swept parameter. Common flags go to the methods that take them; method entries' own parameters win over
    ``parameters``, and the sweep value over both."""
    from hf_fusion.registry import flag_parameters, get_method

    entries = [parse_method_entry(entry) for entry in methods]
    per_method = flag_parameters([get_method(method) for method, _ in entries], common or {})
    jobs: list[Job] = []
    for (method, own), shared in zip(entries, per_method):
        spec = get_method(method)
        swept = sweep is not None and sweep.parameter in spec.params_model.model_fields
        for value in sweep.values if swept else [None]:  # type: ignore[union-attr]
            params = {**shared, **(parameters or {}), **own}
            label = spec.name + (f"[{';'.join(f'{k}={v}' for k, v in own.items())}]" if own else "")
            if value is not None:
                params[sweep.parameter] = value  # type: ignore[union-attr]
                label = f"{spec.name}[{sweep.parameter}={value:g}]"  # type: ignore[union-attr]
            jobs.append(Job(label, spec.name, params, output / "models" / folder_name(label), value))
    names = [job.name for job in jobs]
    twice = sorted({job.label for job in jobs if names.count(job.name) > 1})
    if twice:
        raise RecipeError(f"--methods lists {', '.join(twice)} more than once.")
    return jobs


def _paths(fused: Path | dict[str, Path]) -> str | dict[str, str]:
    return {task: str(p) for task, p in fused.items()} if isinstance(fused, dict) else str(fused)


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, paths strings), so recorded and wanted compare."""
    return json.loads(json.dumps(value, default=str))


def job_key(job: Job | None, pool: Pool, tasks: list[str], settings: EvalSettings) -> dict[str, Any]:
    """What a result depends on, recorded in its file: a rerun skips a job only when all of it is unchanged (the
    baselines job, ``job=None``, depends on the pool, the tasks and the scoring only)."""
    key: dict[str, Any] = {}
    if job is not None:
        key = {"label": job.label, "method": job.method, "parameters": job.parameters}
    key |= {
        "pool": pool.name,
        "base": pool.base,
        "experts": [pool.experts[t] for t in tasks],
        "tasks": tasks,
        "evaluation": {
            "limit": settings.limit,
            "metrics": settings.metrics,
            "batch_size": settings.batch_size,
            "mixed_precision": settings.mixed_precision,
            "device": "cpu" if settings.device == "cpu" and not settings.device_map else "cuda",
            "hf_fusion": __version__,
        },
    }
    return _plain(key)


def read_result(path: Path) -> dict[str, Any]:
    """A job's result file, or an error saying there is none (its process stopped before writing it)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {"error": "no result was written (the process running it stopped before the end)"}
    except (OSError, ValueError) as err:
        return {"error": f"its result {path} cannot be read: {err}"}
    return record if isinstance(record, dict) else {"error": f"its result {path} is not a JSON object"}


def finished(path: Path, key: dict[str, Any]) -> bool:
    """Whether ``path`` holds a successful result of the job ``key`` describes (a failed one is run again)."""
    record = read_result(path)
    return "report" in record and all(record.get(name) == value for name, value in key.items())


def write_result(path: Path, record: dict[str, Any]) -> None:
    """Writes a result atomically: a reader (the main process, a rerun) never sees half of one."""
    write_text_atomically(path, json.dumps(record, indent=2) + "\n")


def _attempt(path: Path, key: dict[str, Any], work: Any, process: int) -> None:
    """Runs one job and writes its result, or the error it raised: an error in one job never loses the others.
    Stopping the job (the Space's Stop) or the process (Ctrl-C) is not a result and stops the bench. The result
    names the ``process`` that ran it."""
    path.unlink(missing_ok=True)  # no stale result stands for a job being run again
    try:
        record = {**key, "process": process, **work()}
    except JobStopped:
        raise
    except Exception as err:
        log.debug("%s failed", key.get("label", BASELINES), exc_info=True)
        error = f"{type(err).__name__}: {err}"
        record = {**key, "process": process, "error": error, "traceback": traceback.format_exc()}
    write_result(path, record)


def earlier_fusion(job: Job, pool: Pool, models: int) -> Recipe | None:
    """The recipe of a fused folder an earlier run left for ``job`` (fused, then stopped while scoring), when it was
    fused with the same method and parameters from the same pool; a rerun then scores it instead of fusing again."""
    from hf_fusion.registry import get_method

    path = job.folder / RECIPE_FILENAME
    if not path.is_file():
        return None
    try:
        recipe = Recipe.from_yaml(path)
        wanted = get_method(job.method).validate_params(job.parameters).model_dump()
    except Exception:  # not a folder this bench can reuse; fusing again says what is in the way
        return None
    same = (
        recipe.method == job.method
        and _plain(recipe.parameters) == _plain(wanted)
        and recipe.pool == pool.name
        and len(recipe.models) == models
    )
    return recipe if same else None


def run_bench(
    pool: Pool,
    methods: list[str],
    output: Path,
    *,
    sweep: Sweep | None = None,
    tasks: list[str] | None = None,
    settings: EvalSettings = EvalSettings(),
    parameters: dict[str, Any] | None = None,
    common: dict[str, Any] | None = None,
    token: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    device: str = "cpu",
    runtime: Runtime | None = None,
) -> BenchResult:
    """Fuses and scores every configuration (see the module's docstring) and returns the joined report, on every
    process. ``device`` is where each configuration is fused (plain ``cuda``: each process's own GPU)."""
    from hf_fusion.registry import get_method

    rt = runtime or current()
    jobs = bench_jobs(methods, output, sweep=sweep, parameters=parameters, common=common)
    specs = pool.select(tasks)
    names = [s.name for s in specs]
    for job in jobs:  # a misspelt or out-of-range parameter refuses the whole bench before any work
        get_method(job.method).validate_params(job.parameters)
    fuse_on = rt.device(device)
    # each job is scored whole on the process running it; the split is over jobs, not over a task's examples
    job_settings = replace(
        settings,
        device=settings.device if settings.device_map else rt.device(settings.device),
        across_processes=False,
    )
    show = show_progress and rt.is_main
    runs = output / RUNS_FOLDER
    runs.mkdir(parents=True, exist_ok=True)

    def run_job(job: Job) -> dict[str, Any]:
        from hf_fusion.fusion import fused_models, merge

        recipe = None if overwrite else earlier_fusion(job, pool, len(specs))
        seconds = None
        if recipe is None:
            # one process fuses the whole model: the work is split over jobs (see the module's docstring)
            result = merge(
                models=[pool.experts[name] for name in names],
                base=pool.base,
                method=job.method,
                heads=pool.heads,
                output=job.folder,
                overwrite=overwrite,
                token=token,
                device=fuse_on,
                show_progress=show,
                pool=pool.name,
                mixed_precision=settings.mixed_precision,
                runtime=LOCAL,
                **job.parameters,
            )
            recipe, seconds = result.recipe, round(result.seconds, 2)
        fused = fused_models(job.folder, recipe, pool)
        started = time.perf_counter()
        report = evaluate_pool(
            pool,
            {job.label: fused},
            tasks=tasks,
            baselines=False,
            settings=job_settings,
            token=token,
            show_progress=show,
        )
        return {
            "folder": str(job.folder),
            "models": _paths(fused),
            "fusion_seconds": seconds,
            "evaluation_seconds": round(time.perf_counter() - started, 2),
            "report": report.model_dump(mode="json"),
        }

    def run_baselines() -> dict[str, Any]:
        started = time.perf_counter()
        report = evaluate_pool(
            pool, {}, tasks=tasks, baselines=True, settings=job_settings, token=token, show_progress=show
        )
        return {"evaluation_seconds": round(time.perf_counter() - started, 2), "report": report.model_dump(mode="json")}

    results: dict[str, dict[str, Any]] = {}
    for job in rt.mine(jobs):
        key = job_key(job, pool, names, job_settings)
        path = runs / f"{job.name}.json"
        if overwrite or not finished(path, key):
            _attempt(path, key, lambda job=job: run_job(job), rt.process_index)
        results[job.name] = read_result(path)
    if rt.process_index == rt.num_processes - 1:  # the last process has the smallest share of the jobs
        key, path = job_key(None, pool, names, job_settings), runs / f"{BASELINES}.json"
        if overwrite or not finished(path, key):
            _attempt(path, key, run_baselines, rt.process_index)
        results[BASELINES] = read_result(path)
    # the results travel to the main process with the processes themselves (a file another machine just wrote may
    # not be visible yet on a network file system); the files are what a rerun resumes from
    for share in rt.gather([results]):
        results.update(share[0])
    return rt.on_main(lambda: _write_reports(pool, methods, output, jobs, sweep, settings, results))


def _write_reports(
    pool: Pool,
    methods: list[str],
    output: Path,
    jobs: list[Job],
    sweep: Sweep | None,
    settings: EvalSettings,
    results: dict[str, dict[str, Any]],
) -> BenchResult:
    """Joins every job's result (by job name) into one report; writes it with the leaderboard, the plots and
    ``bench.json``."""
    records = {job.label: results[job.name] for job in jobs}
    baselines = results[BASELINES]
    done = [job for job in jobs if "report" in records[job.label]]
    failed = {job.label: str(records[job.label]["error"]) for job in jobs if "report" not in records[job.label]}
    if "report" not in baselines:
        failed[BASELINES] = str(baselines.get("error"))
    reports = [EvaluationReport.model_validate(records[job.label]["report"]) for job in done]
    if "report" in baselines:
        reports.append(EvaluationReport.model_validate(baselines["report"]))
    report = join_reports(reports) if reports else EvaluationReport(results=[], pool=pool.name, limit=settings.limit)
    report.save(output)
    order = ["pretrained", "individual", *(job.label for job in done)]
    board = to_markdown(report, order)
    if failed:
        board += "\n\nFailed (no scores):\n" + "\n".join(f"- {label}: {error}" for label, error in failed.items())
    (output / "leaderboard.md").write_text(board + "\n")
    (output / "leaderboard.csv").write_text(to_csv(report, order))
    grouped_bars(report, output / "scores_per_task.png", [label for label in order if label in report.columns()])
    averages = {r.label: r.average for r in rows(report, order)}
    points: dict[str, list[tuple[float, float]]] = {}
    for job in done:
        if job.sweep_value is not None and job.label in averages:
            points.setdefault(job.method, []).append((job.sweep_value, averages[job.label]))
    if points:
        baseline_lines = {k: averages[k] for k in ("pretrained", "individual") if k in averages}
        sweep_lines(points, sweep.parameter, output / f"sweep_{sweep.parameter}.png", baseline_lines)  # type: ignore[union-attr]
    (output / "bench.json").write_text(
        json.dumps(
            {
                "pool": pool.name,
                "methods": methods,
                "sweep": sweep.__dict__ if sweep else None,
                "models": {job.label: records[job.label]["models"] for job in done},
                "fusion_seconds": {job.label: records[job.label]["fusion_seconds"] for job in done},
                "failed": failed,
                "runs": RUNS_FOLDER,
            },
            indent=2,
        )
    )
    return BenchResult(report, board, output, failed)
