"""``hf-fusion bench``: several methods (and a parameter sweep) on one pool, evaluated side by side.

Every fused model is written under ``output/models/<label>``; all of them are then scored in one pass over each
task (data, text classifiers and baselines are prepared once), and the leaderboard, the JSON report and the plots
land in ``output``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hf_fusion.catalog import Pool
from hf_fusion.errors import RecipeError
from hf_fusion.reports.leaderboard import rows, to_csv, to_markdown
from hf_fusion.reports.plots import grouped_bars, sweep_lines
from hf_fusion.reports.report import EvaluationReport
from hf_fusion.tasks.base import EvalSettings
from hf_fusion.tasks.evaluate import evaluate_pool

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


def _paths(fused: Path | dict[str, Path]) -> str | dict[str, str]:
    return {task: str(p) for task, p in fused.items()} if isinstance(fused, dict) else str(fused)


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
) -> BenchResult:
    from hf_fusion.fusion import fused_models, merge
    from hf_fusion.registry import flag_parameters, get_method

    entries = [parse_method_entry(entry) for entry in methods]
    per_method = flag_parameters([get_method(method) for method, _ in entries], common or {})
    output.mkdir(parents=True, exist_ok=True)
    specs = pool.select(tasks)
    fused: dict[str, Path | dict[str, Path]] = {}
    points: dict[str, list[tuple[float, str]]] = {}
    seconds: dict[str, float] = {}
    for (method, own), shared in zip(entries, per_method):
        spec = get_method(method)
        swept = sweep is not None and sweep.parameter in spec.params_model.model_fields
        for value in sweep.values if swept else [None]:  # type: ignore[union-attr]
            params = {**shared, **(parameters or {}), **own}
            label = spec.name + (f"[{';'.join(f'{k}={v}' for k, v in own.items())}]" if own else "")
            if value is not None:
                params[sweep.parameter] = value  # type: ignore[union-attr]
                label = f"{spec.name}[{sweep.parameter}={value:g}]"  # type: ignore[union-attr]
                points.setdefault(spec.name, []).append((value, label))
            folder = output / "models" / label.replace("[", "_").replace("]", "").replace("=", "-")
            result = merge(
                models=[pool.experts[s.name] for s in specs],
                base=pool.base,
                method=spec.name,
                heads=pool.heads,
                output=folder,
                overwrite=overwrite,
                token=token,
                show_progress=show_progress,
                pool=pool.name,
                **params,
            )
            fused[label] = fused_models(result.output, result.recipe, pool)
            seconds[label] = round(result.seconds, 2)
    report = evaluate_pool(pool, fused, tasks=tasks, settings=settings, token=token, show_progress=show_progress)
    report.save(output)
    order = ["pretrained", "individual", *fused]
    board = to_markdown(report, order)
    (output / "leaderboard.md").write_text(board + "\n")
    (output / "leaderboard.csv").write_text(to_csv(report, order))
    grouped_bars(report, output / "scores_per_task.png", [label for label in order if label in report.columns()])
    if points:
        averages = {r.label: r.average for r in rows(report, order)}
        series = {m: [(v, averages[label]) for v, label in pts] for m, pts in points.items()}
        baselines = {k: averages[k] for k in ("pretrained", "individual") if k in averages}
        sweep_lines(series, sweep.parameter, output / f"sweep_{sweep.parameter}.png", baselines)  # type: ignore[union-attr]
    (output / "bench.json").write_text(
        json.dumps(
            {
                "pool": pool.name,
                "methods": methods,
                "sweep": sweep.__dict__ if sweep else None,
                "models": {k: _paths(v) for k, v in fused.items()},
                "fusion_seconds": seconds,
            },
            indent=2,
        )
    )
    return BenchResult(report, board, output)
