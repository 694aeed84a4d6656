"""The Gradio app: Merge, Diffusion and Compare tabs over the same pipeline as the CLI.

Merge runs :func:`hf_fusion.fusion.merge` on the recipe YAML the form writes (or the user edits), optionally
scores it on its pool, offers the folder as a download, and pushes it with the signed-in user's token. Diffusion
fuses diffusers pipelines the same way, then draws the visitor's prompts with the base, each input and the fused
pipeline into one grid (see :mod:`hf_fusion.space.diffusion`). Compare runs :func:`hf_fusion.bench.run_bench`. All
run as :class:`~hf_fusion.space.jobs.Job` s in the session's own thread, behind a queue with a concurrency limit,
and the Stop button stops them at the next tensor, batch or picture.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hf_fusion.errors import FusionError, RecipeError
from hf_fusion.output import disk_reservation, nearest_existing
from hf_fusion.sizes import parse_size
from hf_fusion.space.block_presets import PRESETS, preset_yaml
from hf_fusion.space.diffusion import (
    COMPONENTS,
    DEFAULT_PROMPTS,
    DiffusionRequest,
    RenderCaps,
    check_pipeline_method,
    check_pipeline_recipe,
    check_pipelines,
    diffusion_methods,
    prepare_request,
    render_columns,
)
from hf_fusion.space.form import (
    POOL_SOURCE,
    REPO_SOURCE,
    ParamSlot,
    gradable_parameter,
    make_per_layer_widget,
    make_widget,
    param_slots,
    parse_recipe_yaml,
    per_layer_methods,
    recipe_fields,
    to_yaml,
)
from hf_fusion.space.hardware import job_device, with_gpu
from hf_fusion.space.jobs import Job
from hf_fusion.space.session import Session
from hf_fusion.space.slots import JobSlots, Ticket
from hf_fusion.space.store import SessionStore
from hf_fusion.space.visitor import check_pool_name, check_visitor_recipe

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_POOL = "minilm-text3"
DEFAULT_METHOD = "ties_merging"
DEFAULT_DIFFUSION_METHOD = "task_arithmetic"
DIFFUSION_KEYS = "diffusion."
DEFAULT_COMPARE = ["simple_average", "task_arithmetic", "ties_merging"]
DEFAULT_LIMIT = 200
SESSION_TTL_SECONDS = 6 * 3600
DEFAULT_IDLE_SECONDS = 15 * 60
DEFAULT_MAX_WAITING = 16
DEFAULT_BUDGET_CAP = 20 * 10**9
PUSH_CONCURRENCY = 2
MAX_COMPARE_RUNS = 48
DTYPES = ["auto", "float32", "float16", "bfloat16"]
EMPTY_BOARD = ["model", "task scores", "average", "normalized"]


def in_a_space() -> bool:
    """Hugging Face Spaces set ``SPACE_ID`` in the app's environment."""
    return bool(os.environ.get("SPACE_ID"))


def _quiet_network_defaults() -> None:
    """Nothing leaves the machine unless the user asks: no analytics, no Hub telemetry."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def zip_folder(folder: Path, archive: Path) -> Path:
    """Stores (no compression: safetensors barely compress) the folder's files under the folder's name."""
    partial = archive.with_suffix(".zip.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(folder.name) / path.relative_to(folder))
    partial.replace(archive)
    return archive


def leaderboard_frame(report: Any, order: list[str] | None = None) -> Any:
    """The leaderboard as a styled DataFrame: scores to one decimal, the best fused value of each column in bold."""
    import pandas as pd

    from hf_fusion.reports.leaderboard import table

    laid = table(report, order)
    frame = pd.DataFrame(
        [
            [label, *(None if v is None else round(v, 1) for v in values)]
            for label, values in zip(laid.labels, laid.cells)
        ],
        columns=["model", *laid.columns],
    )

    def bold(data: Any) -> Any:
        styles = pd.DataFrame("", index=data.index, columns=data.columns)
        for i, j in laid.best:
            styles.iat[i, j + 1] = "font-weight: bold; background-color: rgba(99, 102, 241, 0.18)"
        return styles

    return frame.style.apply(bold, axis=None).format(precision=1, na_rep="")


def eval_settings(limit: float | None) -> Any:
    """The Space scores with the metric modules bundled with hf-fusion: the same ``evaluate`` modules as the Hub's,
    pinned, so scores do not change between restarts and need no network."""
    from hf_fusion.tasks.base import EvalSettings

    if limit is not None and (
        isinstance(limit, bool)
        or not isinstance(limit, (int, float))
        or not math.isfinite(limit)
        or limit < 0
        or limit != int(limit)
    ):
        raise RecipeError(f"examples per task must be 0 (all) or a positive whole number, got {limit!r}.")
    return EvalSettings(limit=int(limit) if limit else None, metrics="bundled", device=job_device())


def card_body(folder: Path) -> str:
    """The model card without its YAML front matter, for display."""
    from huggingface_hub import ModelCard

    from hf_fusion.cards import CARD_FILENAME

    path = folder / CARD_FILENAME
    return ModelCard.load(path).text.lstrip() if path.is_file() else ""


def _user_error(err: BaseException, *, public: bool) -> Exception:
    """The message visitors see: hf-fusion's own messages as they are; anything else is logged on the server and, on
    a shared Space, named by its type only (a library's message may quote server paths or file contents)."""
    import gradio as gr

    if isinstance(err, FusionError):
        return gr.Error(str(err), print_exception=False)
    log.exception("unexpected error in the Space", exc_info=err)
    if public:
        return gr.Error(
            f"unexpected error ({type(err).__name__}); the details are in the server's log.", print_exception=False
        )
    return gr.Error(f"unexpected error ({type(err).__name__}): {err}", print_exception=False)


@dataclass(frozen=True)
class SpaceLimits:
    """How much of the server visitors may use: jobs at once, jobs waiting, idle time, and disk."""

    running: int = 1
    waiting: int = DEFAULT_MAX_WAITING
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    disk_budget: int = DEFAULT_BUDGET_CAP

    @classmethod
    def from_environment(cls, root: Path, running: int | None = None) -> SpaceLimits:
        """``HF_FUSION_SPACE_CONCURRENCY``, ``HF_FUSION_SPACE_MAX_WAITING``, ``HF_FUSION_SPACE_IDLE_SECONDS`` and
        ``HF_FUSION_SPACE_DISK_BUDGET`` (a size such as ``20GB``; by default half the free space where sessions are
        kept, at most 20 GB)."""
        env = os.environ
        try:
            budget_text = env.get("HF_FUSION_SPACE_DISK_BUDGET")
            limits = cls(
                running=running or int(env.get("HF_FUSION_SPACE_CONCURRENCY", "1")),
                waiting=int(env.get("HF_FUSION_SPACE_MAX_WAITING", str(DEFAULT_MAX_WAITING))),
                idle_seconds=float(env.get("HF_FUSION_SPACE_IDLE_SECONDS", str(DEFAULT_IDLE_SECONDS))),
                disk_budget=parse_size(budget_text) if budget_text else _default_budget(root),
            )
        except ValueError as err:
            raise RecipeError(f"the Space's settings are invalid: {err}") from None
        if limits.running < 1 or limits.waiting < 0 or not 0 < limits.idle_seconds < float("inf"):
            raise RecipeError(
                "the Space's settings are invalid: HF_FUSION_SPACE_CONCURRENCY must be at least 1, "
                "HF_FUSION_SPACE_MAX_WAITING at least 0 and HF_FUSION_SPACE_IDLE_SECONDS positive."
            )
        return limits


def _default_budget(root: Path) -> int:
    return max(1, min(DEFAULT_BUDGET_CAP, shutil.disk_usage(nearest_existing(root)).free // 2))


class SpaceApp:
    """Builds the Blocks and holds the handlers; one instance per server, never per-user data."""

    def __init__(
        self,
        *,
        root: Path,
        files_root: Path,
        in_space: bool,
        allow_local_paths: bool,
        limits: SpaceLimits,
        render_caps: RenderCaps | None = None,
    ) -> None:
        from hf_fusion.catalog import pool_names
        from hf_fusion.registry import all_methods

        self.in_space = in_space
        self.allow_local_paths = allow_local_paths
        self.limits = limits
        self.store = SessionStore(root, files_root, idle_seconds=limits.idle_seconds, budget_bytes=limits.disk_budget)
        self.job_slots = JobSlots(limits.running, limits.waiting)
        self.specs = all_methods()
        self.slots: list[ParamSlot] = param_slots(self.specs)
        self.per_layer_specs = per_layer_methods(self.specs)
        self.pools = pool_names()
        self.render_caps = render_caps or RenderCaps()
        self.diffusion_specs = diffusion_methods(self.specs)
        self.diffusion_slots: list[ParamSlot] = param_slots(self.diffusion_specs)
        self.diffusion_per_layer_specs = per_layer_methods(self.diffusion_specs)

    @property
    def public(self) -> bool:
        """A shared Space: visitors may name only catalog pools, Hub repo ids and built-in models."""
        return not self.allow_local_paths

    def _error(self, err: BaseException) -> Exception:
        return _user_error(err, public=self.public)

    # shared steps ----------------------------------------------------------------------------------------------
    def _admit(self) -> Ticket:
        """A place for a new job (a slot or the line), refused at once when the line is full."""
        try:
            return self.job_slots.admit()
        except FusionError as err:
            raise self._error(err) from None

    def _reserving(self, session: Session, factor: int) -> Callable[[Path, int], None]:
        """The disk reservation of ``session``'s outputs: ``factor`` copies of each (a folder and its zip)."""
        return lambda target, needed: self.store.reserve(session, needed * factor)

    def _run_job(
        self, session: Session, job: Job[T], progress: Any, *, results: int
    ) -> Generator[tuple[Any, ...], None, T | None]:
        """Starts ``job`` in the session and streams (session, status, log, *results) while it runs; returns its
        result, or None when it was stopped (after showing so). Errors reach the UI with their own message."""
        import gradio as gr

        try:
            session.begin(job)
        except FusionError as err:
            if job.ticket is not None:
                job.ticket.release()
            raise self._error(err) from None
        try:
            for _ in job.follow():
                if job.running and job.fraction() is not None:
                    progress((job.done, job.total), desc=job.stage, unit="steps")
                yield (session, job.status(), job.log_text(), *[gr.skip()] * results)
        finally:
            if job.running:  # the client went away: do not leave the job running for nobody
                job.stop()
            self.store.settle(session)
        if job.stopped:
            yield (session, job.status(), job.log_text(), *[None] * results)
            return None
        if job.error is not None:
            raise self._error(job.error)
        return job.result

    # Merge tab --------------------------------------------------------------------------------------------------
    def form_to_yaml(
        self, source: str, pool_name: str, models_text: str, base: str, method: str, dtype: str, *values: Any
    ) -> str:
        from hf_fusion.catalog import get_pool

        if source == POOL_SOURCE and pool_name and self.public:
            check_pool_name(pool_name)
        pool = get_pool(pool_name) if source == POOL_SOURCE and pool_name else None
        return self._form_yaml(source, pool, models_text, base, method, dtype, self.slots, self.per_layer_specs, values)

    @staticmethod
    def _form_yaml(
        source: str,
        pool: Any,
        models_text: str,
        base: str,
        method: str,
        dtype: str,
        slots: list[ParamSlot],
        per_layer_specs: list[Any],
        values: tuple[Any, ...],
        components: list[str] | tuple[str, ...] = (),
    ) -> str:
        """A form's recipe YAML: ``values`` are its widgets' values (one per slot) then its per-layer boxes'."""
        widget_values, per_layer_texts = values[: len(slots)], values[len(slots) :]
        per_layer = {spec.name: text for spec, text in zip(per_layer_specs, per_layer_texts)}
        return to_yaml(
            recipe_fields(
                source=source,
                pool=pool,
                models_text=models_text or "",
                base=base or "",
                method=method,
                dtype=dtype,
                slots=slots,
                values=widget_values,
                per_layer=per_layer,
                components=components,
            )
        )

    def method_blurb(self, method: str) -> str:
        from hf_fusion.registry import get_method

        spec = get_method(method)
        paper = f" · [{spec.paper.title}]({spec.paper.url})" if spec.paper else ""
        return (
            f"**{spec.name}**: {spec.summary}  \nfamily: {spec.family.value} · data: {spec.data.value} · "
            f"base model: {spec.base.value}{paper}"
        )

    def _prepare_merge(
        self, recipe_text: str, evaluate: bool, limit: float | None
    ) -> tuple[Any, Any, list[str] | None]:
        """Everything checkable without weights, in the request itself, so bad input fails at once."""
        from hf_fusion.fusion import as_recipe, validate_recipe

        fields = parse_recipe_yaml(recipe_text)
        if self.public:  # before anything reads a pool file or looks at a folder
            check_visitor_recipe(fields)
        recipe = validate_recipe(as_recipe(fields, {})).recipe
        if not evaluate:
            return recipe, False, None
        if not recipe.pool:
            raise RecipeError(
                "scoring needs a pool that says which tasks to evaluate: pick a catalog pool, or untick Evaluate."
            )
        return recipe, eval_settings(limit), self._pool_tasks(recipe)

    @staticmethod
    def _pool_tasks(recipe: Any) -> list[str]:
        """The pool's tasks whose expert is among the recipe's models (the YAML may have dropped some)."""
        from hf_fusion.catalog import get_pool

        pool = get_pool(recipe.pool)
        chosen = {pool.task_of(m.path) for m in recipe.models}
        tasks = [t.name for t in pool.tasks if t.name in chosen]
        if not tasks:
            raise RecipeError(f"none of the recipe's models is an expert of pool {pool.name!r}; nothing to score.")
        return tasks

    def run_merge(
        self,
        recipe_text: str,
        evaluate: bool,
        limit: float | None,
        session: Session | None,
        token: str | None,
        progress: Any,
        visitor: str | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        from hf_fusion.fusion import merge

        try:
            recipe, settings, tasks = self._prepare_merge(recipe_text, evaluate, limit)
        except FusionError as err:  # refused in the request: nothing was created for it
            raise self._error(err) from None
        ticket = self._admit()
        session = self.store.open(session, visitor)
        folder = session.new_folder(recipe.method)

        def work() -> tuple[Any, Path]:
            with disk_reservation(self._reserving(session, factor=2)):  # the folder, then its zip
                result = merge(
                    recipe.replace(output=str(folder), device=job_device()),
                    evaluate=settings,
                    tasks=tasks,
                    token=token,
                    show_progress=False,
                    convert_single_files=not self.public,
                )
            job.write(
                f"fused {result.fused_tensors} tensors ({result.copied_tensors} copied) in "
                f"{result.seconds:.1f} s; {result.output_bytes / 1e6:.0f} MB"
            )
            if result.evaluation is not None:
                job.write(f"scored {len(result.evaluation.results)} task(s) in {result.evaluation_seconds:.1f} s")
            try:
                archive = zip_folder(result.output, session.served_file(f"{folder.name}.zip"))
            except BaseException:
                shutil.rmtree(result.output, ignore_errors=True)
                raise
            return result, archive

        job: Job[tuple[Any, Path]] = Job(with_gpu(work), "merge", ticket)
        outcome = yield from self._run_job(session, job, progress, results=3)
        if outcome is None:
            return
        result, archive = outcome
        session.keep_merged(result.output, archive)
        scores = leaderboard_frame(result.evaluation) if result.evaluation else None
        status = (
            f"Merged {len(result.recipe.models)} models with **{result.recipe.method}** in {result.seconds:.1f} s"
            + (f", scored in {result.evaluation_seconds:.1f} s." if result.evaluation else ".")
            + " Download it below, or push it to the Hub."
        )
        yield session, status, job.log_text(), scores, str(archive), card_body(result.output)

    async def stop(self, session: Session | None) -> str:
        """Never queued behind jobs (see :mod:`hf_fusion.space.slots`), so it answers even when the line is full."""
        return "Nothing is running." if session is None else session.stop()

    def page_closed(self, request: Any) -> None:
        """gradio's ``unload``: the browser tab went away, so its sessions' files go too."""
        self.store.close_visitor(getattr(request, "session_hash", None))

    def push(
        self,
        repo_id: str,
        private: bool,
        overwrite: bool,
        session: Session | None,
        token: str | None,
        visitor: str | None = None,
    ) -> str:
        from hf_fusion.hub.auth import resolve_token
        from hf_fusion.hub.push import PushTarget, push_merged_folder

        try:
            if session is not None and session.closed and session.removed_reason:
                raise RecipeError(
                    f"nothing to push: this session's merged model was removed because "
                    f"{session.removed_reason}. Run the merge again."
                )
            if session is None or session.merged is None or not session.merged.is_dir():
                raise RecipeError("nothing to push yet: run a merge first.")
            session.touch()
            if not repo_id or not repo_id.strip():
                raise RecipeError("choose a repo name (`name` or `namespace/name`) to push to.")
            token = token if self.in_space else resolve_token(None)
            if self.in_space and not token:
                raise RecipeError("sign in with the Hugging Face button to push.")
            target = PushTarget(repo_id.strip(), private=private, overwrite=overwrite)
            pushed = push_merged_folder(session.merged, target, token=token, rewrite_card=True)
        except FusionError as err:
            raise self._error(err) from None
        visibility = "private" if private else "public"
        link = pushed.pr_url or pushed.url
        return f"Pushed to [{pushed.repo_id}]({link}) ({visibility})."

    # Diffusion tab ----------------------------------------------------------------------------------------------
    def form_to_diffusion_yaml(
        self, models_text: str, base: str, method: str, dtype: str, components: list[str] | None, *values: Any
    ) -> str:
        """The Diffusion form as recipe YAML: repo ids, the method's widgets and per-layer box, the components."""
        return self._form_yaml(
            REPO_SOURCE,
            None,
            models_text,
            base,
            method,
            dtype,
            self.diffusion_slots,
            self.diffusion_per_layer_specs,
            values,
            components or (),
        )

    def block_preset(self, preset: str | None, method: str, low: float, high: float, *values: Any) -> list[Any]:
        """Fills the chosen method's per-layer box with ``preset`` for its first real-valued parameter; tensors the
        preset does not cover keep that parameter's widget value."""
        import gradio as gr

        from hf_fusion.registry import get_method

        boxes = self.diffusion_per_layer_specs
        spec = get_method(method)
        parameter = gradable_parameter(spec)
        if not preset or spec not in boxes or parameter is None:
            if preset:
                gr.Warning(f"{method} has no real-valued parameter to weight by block; pick another method.")
            return [gr.skip() for _ in boxes]
        other = next(
            (
                v
                for slot, v in zip(self.diffusion_slots, values)
                if (slot.method, slot.info.name) == (method, parameter)
            ),
            None,
        )
        try:
            text = preset_yaml(preset, parameter, low, high, other if isinstance(other, (int, float)) else None)
        except FusionError as err:
            raise self._error(err) from None
        return [text if box.name == method else gr.skip() for box in boxes]

    def _prepare_diffusion(
        self, recipe_text: str, prompts_text: str, seeds_text: str, steps: Any, size: Any
    ) -> DiffusionRequest:
        """Everything checkable without weights, in the request: what the recipe may name, the method, the caps."""
        from hf_fusion.fusion import as_recipe, validate_recipe

        fields = parse_recipe_yaml(recipe_text)
        if self.public:  # before anything reads a file or looks at a folder
            check_visitor_recipe(fields)
        check_pipeline_method(fields.get("method"), self.diffusion_specs)
        recipe = validate_recipe(as_recipe(fields, {})).recipe
        check_pipeline_recipe(recipe, self.diffusion_specs, self.render_caps)
        return prepare_request(
            recipe, prompts_text, seeds_text, steps, size, caps=self.render_caps, device=job_device()
        )

    def run_diffusion(
        self,
        recipe_text: str,
        prompts_text: str,
        seeds_text: str,
        steps: Any,
        size: Any,
        session: Session | None,
        token: str | None,
        progress: Any,
        visitor: str | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        from hf_fusion.fusion import merge
        from hf_fusion.images.comparison import write_png_atomically

        try:
            request = self._prepare_diffusion(recipe_text, prompts_text, seeds_text, steps, size)
        except FusionError as err:  # refused in the request: nothing was created for it
            raise self._error(err) from None
        ticket = self._admit()
        session = self.store.open(session, visitor)
        folder = session.new_folder(request.recipe.method)

        def work() -> tuple[Any, Path, Path, float]:
            check_pipelines(request.recipe, token=token, caps=self.render_caps)
            with disk_reservation(self._reserving(session, factor=2)):  # the folder, then its zip
                result = merge(
                    request.recipe.replace(output=str(folder), device=job_device()), token=token, show_progress=False
                )
            job.write(
                f"fused {result.fused_tensors} tensors ({result.copied_tensors} copied) in "
                f"{result.seconds:.1f} s; {result.output_bytes / 1e6:.0f} MB"
            )
            grid = session.served_file(f"{folder.name}-grid.png")
            try:
                started = time.perf_counter()
                comparison = render_columns(request, result.recipe, result.output, token=token)
                write_png_atomically(grid, comparison.grid())
                for previous in session.filesdir.glob("*-grid.png"):  # only the newest grid is kept
                    if previous != grid:
                        previous.unlink(missing_ok=True)
                seconds = time.perf_counter() - started
                job.write(f"drew {request.pictures} pictures in {seconds:.1f} s")
                archive = zip_folder(result.output, session.served_file(f"{folder.name}.zip"))
            except BaseException:
                shutil.rmtree(result.output, ignore_errors=True)
                grid.unlink(missing_ok=True)
                raise
            return result, grid, archive, seconds

        job: Job[tuple[Any, Path, Path, float]] = Job(with_gpu(work), "diffusion merge", ticket)
        outcome = yield from self._run_job(session, job, progress, results=3)
        if outcome is None:
            return
        result, grid, archive, seconds = outcome
        session.keep_merged(result.output, archive)
        status = (
            f"Merged {len(result.recipe.models)} pipeline(s) with **{result.recipe.method}** in "
            f"{result.seconds:.1f} s, then drew {request.rows} row(s) x {request.columns} columns in {seconds:.1f} s. "
            "Download the fused pipeline below, or push it to the Hub."
        )
        yield session, status, job.log_text(), str(grid), str(archive), card_body(result.output)

    # Compare tab ------------------------------------------------------------------------------------------------
    def _prepare_compare(
        self, pool_name: str, methods: list[str], sweep_text: str, limit: float | None
    ) -> tuple[Any, list[Any], Any, Any]:
        """Pool, methods, sweep and settings of a comparison, checked in the request (a shared Space also bounds
        how many models one comparison fuses)."""
        from hf_fusion.bench import Sweep
        from hf_fusion.catalog import get_pool
        from hf_fusion.registry import get_method

        if not methods:
            raise RecipeError("pick at least one method to compare.")
        specs = [get_method(m) for m in methods]
        pool = get_pool(check_pool_name(pool_name) if self.public else pool_name)
        sweep = Sweep.parse(sweep_text.strip()) if sweep_text and sweep_text.strip() else None
        if sweep is not None and not any(sweep.parameter in s.params_model.model_fields for s in specs):
            raise RecipeError(f"none of the chosen methods has a parameter {sweep.parameter!r} to sweep.")
        runs = sum(len(sweep.values) if sweep and sweep.parameter in s.params_model.model_fields else 1 for s in specs)
        if self.public and runs > MAX_COMPARE_RUNS:
            raise RecipeError(
                f"this comparison would fuse and score {runs} models; a shared Space runs at most "
                f"{MAX_COMPARE_RUNS} per comparison (fewer methods or sweep values, or run "
                "`hf-fusion bench` on your own machine)."
            )
        return pool, specs, sweep, eval_settings(limit)

    def run_compare(
        self,
        pool_name: str,
        methods: list[str],
        sweep_text: str,
        limit: float | None,
        session: Session | None,
        token: str | None,
        progress: Any,
        visitor: str | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        from hf_fusion.bench import run_bench
        from hf_fusion.tasks.evaluate import INDIVIDUAL, PRETRAINED

        try:
            pool, specs, sweep, settings = self._prepare_compare(pool_name, methods, sweep_text, limit)
        except FusionError as err:  # refused in the request: nothing was created for it
            raise self._error(err) from None
        ticket = self._admit()
        session = self.store.open(session, visitor)
        output = session.served_file(f"{session.runs:03d}-compare")  # its plots are served from where they are

        def work() -> Any:
            for previous in output.parent.glob("*-compare"):  # only the newest comparison is kept
                shutil.rmtree(previous, ignore_errors=True)
            try:
                with disk_reservation(self._reserving(session, factor=1)):
                    return run_bench(
                        pool,
                        [s.name for s in specs],
                        output,
                        sweep=sweep,
                        settings=settings,
                        token=token,
                        show_progress=False,
                        device=job_device(),
                    )
            finally:
                shutil.rmtree(output / "models", ignore_errors=True)  # only the scores are shown

        job: Job[Any] = Job(with_gpu(work), "comparison", ticket)
        bench = yield from self._run_job(session, job, progress, results=3)
        if bench is None:
            return
        labels = [c for c in bench.report.columns() if c not in (PRETRAINED, INDIVIDUAL)]
        frame = leaderboard_frame(bench.report)  # baselines first, then the fused models in the order they ran
        bars = output / "scores_per_task.png"
        lines = output / f"sweep_{sweep.parameter}.png" if sweep else None
        status = f"Compared {len(labels)} fused model(s) on {len(bench.report.results)} task(s) of {pool.name}."
        if bench.failed:  # the others are still compared
            status += " Failed: " + "; ".join(f"{label} ({error})" for label, error in bench.failed.items()) + "."
        yield (
            session,
            status,
            job.log_text(),
            frame,
            str(bars) if bars.is_file() else None,
            str(lines) if lines is not None and lines.is_file() else None,
        )

    # layout -----------------------------------------------------------------------------------------------------
    def build(self) -> Any:
        import gradio as gr

        # delete_cache: files gradio itself copies into its cache (not the sessions', which the store removes)
        with gr.Blocks(title="hf-fusion", fill_width=True, delete_cache=(1800, 7200)) as demo:
            session = gr.State(None, time_to_live=SESSION_TTL_SECONDS, delete_callback=self.store.close)
            gr.Markdown(
                "# hf-fusion\nFuse fine-tuned models from the Hub, score them against their experts (or draw "
                "fused diffusion pipelines beside their inputs), and push the result. Every method and parameter "
                "below comes from the same registry as the `hf-fusion` command line."
            )
            if self.in_space:
                gr.LoginButton()
            else:
                gr.Markdown("Pushing uses your local Hugging Face token (`hf auth login` or `HF_TOKEN`).")
            with gr.Tabs():
                with gr.Tab("Merge", id="merge"):
                    self._merge_tab(session)
                with gr.Tab("Diffusion", id="diffusion"):
                    self._diffusion_tab(session)
                with gr.Tab("Compare", id="compare"):
                    self._compare_tab(session)
            demo.unload(self._with_visitor(self.page_closed))
        # Long jobs wait in the Space's own bounded line (JobSlots), not in gradio's queue: gradio's queue refuses
        # every request once full, Stop included, so it is left unbounded and never holds more than quick events.
        demo.queue(max_size=None, default_concurrency_limit=None)
        self.store.start()
        atexit.register(self.store.shutdown)
        return demo

    @staticmethod
    def _with_visitor(handler: Callable[[Any], None]) -> Callable[..., None]:
        import gradio as gr

        def closed(request: Any) -> None:
            handler(request)

        closed.__annotations__ = {"request": gr.Request, "return": None}  # how gradio knows to pass the request
        return closed

    def _with_token(self, handler: Callable[..., Any], inputs: int, *, generator: bool) -> Callable[..., Any]:
        """``handler`` with the user's token, the visitor's session hash (and gradio's progress tracker) after its
        ``inputs`` values.

        gradio injects special arguments by position, reading the signature: so the wrapper declares its inputs
        one by one, then ``oauth_token: gr.OAuthToken | None`` in a Space (the signed-in user's token; outside a
        Space none is passed and the local login is used), then ``request: gr.Request``, then
        ``progress=gr.Progress()`` for generators.
        """
        import inspect

        import gradio as gr

        Param = inspect.Parameter
        params = [Param(f"input_{i}", Param.POSITIONAL_OR_KEYWORD) for i in range(inputs)]
        if self.in_space:
            params.append(
                Param("oauth_token", Param.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.OAuthToken | None)
            )
        params.append(Param("request", Param.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request))
        if generator:
            params.append(Param("progress", Param.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
        in_space = self.in_space

        def split(args: tuple[Any, ...]) -> tuple[list[Any], str | None, str | None, Any]:
            values, extra = list(args[:inputs]), list(args[inputs:])
            oauth = extra.pop(0) if in_space and extra else None
            request = extra.pop(0) if extra else None
            return (
                values,
                (oauth.token if oauth is not None else None),
                getattr(request, "session_hash", None),
                (extra[0] if extra else None),
            )

        if generator:

            def run(*args: Any) -> Any:
                values, token, visitor, progress = split(args)
                yield from handler(*values, token, progress, visitor=visitor)
        else:

            def run(*args: Any) -> Any:  # type: ignore[misc]
                values, token, visitor, _ = split(args)
                return handler(*values, token, visitor=visitor)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not Param.empty}
        return run

    def _merge_tab(self, session: Any) -> None:
        import gradio as gr

        with gr.Row():
            with gr.Column(scale=1):
                source = gr.Radio([POOL_SOURCE, REPO_SOURCE], value=POOL_SOURCE, label="Models from")
                pool = gr.Dropdown(
                    self.pools,
                    value=DEFAULT_POOL,
                    label="Pool",
                    info="FusionBench's pools and the built-in minilm-text3 (runs offline)",
                )
                models = gr.Textbox(
                    label="Models",
                    lines=4,
                    visible=False,
                    placeholder="org/model-a\norg/model-b@revision",
                    info="Hub repo ids, one per line",
                )
                base = gr.Textbox(
                    label="Base model",
                    visible=False,
                    placeholder="org/pretrained",
                    info="the model the others were fine-tuned from (task vectors are taken against it)",
                )
                method = gr.Dropdown(
                    [(f"{s.name} ({s.family.value})", s.name) for s in self.specs], value=DEFAULT_METHOD, label="Method"
                )
                blurb = gr.Markdown(self.method_blurb(DEFAULT_METHOD))
                groups, widgets, per_layer_boxes = [], [], []
                with gr.Column(elem_id="merge-params"):
                    for spec in self.specs:
                        with gr.Group(visible=spec.name == DEFAULT_METHOD) as group:
                            if not spec.parameters():
                                gr.Markdown(f"{spec.name} has no parameters.")
                            for slot in self.slots:
                                if slot.method == spec.name:
                                    widgets.append(make_widget(slot))
                            if spec in self.per_layer_specs:
                                per_layer_boxes.append(make_per_layer_widget(spec))
                        groups.append(group)
                dtype = gr.Dropdown(DTYPES, value="auto", label="Output dtype")
            with gr.Column(scale=1):
                initial = self.form_to_yaml(
                    POOL_SOURCE,
                    DEFAULT_POOL,
                    "",
                    "",
                    DEFAULT_METHOD,
                    "auto",
                    *[s.info.default for s in self.slots],
                    *[""] * len(per_layer_boxes),
                )
                recipe = gr.Code(
                    initial, language="yaml", label="Recipe (editable; Merge runs exactly this)", interactive=True
                )
                with gr.Row():
                    evaluate = gr.Checkbox(True, label="Evaluate on the pool's tasks")
                    limit = gr.Number(DEFAULT_LIMIT, precision=0, minimum=0, label="Examples per task (0 = all)")
                with gr.Row():
                    merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-button")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="merge-stop")
                status = gr.Markdown(elem_id="merge-status")
                scores = gr.Dataframe(
                    label="Scores (fused against the pretrained model and each task's expert)",
                    interactive=False,
                    elem_id="merge-scores",
                    headers=EMPTY_BOARD,
                )
                download, log_box, card = self._result_panel("Merged model (zip)", session, "push")

        source.change(
            lambda s: (
                gr.update(visible=s == POOL_SOURCE),
                gr.update(visible=s == REPO_SOURCE),
                gr.update(visible=s == REPO_SOURCE),
            ),
            source,
            [pool, models, base],
            api_visibility="private",
            queue=False,
        )
        method.change(
            lambda m: [self.method_blurb(m), *(gr.update(visible=s.name == m) for s in self.specs)],
            method,
            [blurb, *groups],
            api_visibility="private",
            queue=False,
        )
        form = [source, pool, models, base, method, dtype, *widgets, *per_layer_boxes]
        gr.on([c.change for c in form], self.form_to_yaml, form, recipe, api_visibility="private", queue=False)
        merge_btn.click(
            self._with_token(self.run_merge, 4, generator=True),
            [recipe, evaluate, limit, session],
            [session, status, log_box, scores, download, card],
            api_name="merge",
            concurrency_limit=None,
        )
        stop_btn.click(self.stop, session, status, api_name="stop", queue=False)

    def _result_panel(self, label: str, session: Any, push_api: str) -> tuple[Any, Any, Any]:
        """What a merge tab shows after a run: the zip, the log, the card, and pushing the session's last merge
        (``push_api`` names its endpoint). Returns the download, log and card components."""
        import gradio as gr

        download = gr.File(label=label, interactive=False)
        with gr.Accordion("Log", open=False):
            log_box = gr.Textbox(lines=12, max_lines=20, show_label=False, autoscroll=True)
        with gr.Accordion("Model card", open=False):
            card = gr.Markdown()
        with gr.Group():
            repo = gr.Textbox(label="Push to repo", placeholder="name or namespace/name")
            with gr.Row():
                private = gr.Checkbox(True, label="Private")
                overwrite = gr.Checkbox(False, label="Replace files of an existing repo")
            push_btn = gr.Button("Push to the Hub")
            push_status = gr.Markdown()
        push_btn.click(
            self._with_token(self.push, 4, generator=False),
            [repo, private, overwrite, session],
            push_status,
            api_name=push_api,
            concurrency_limit=PUSH_CONCURRENCY,
            concurrency_id="push",
        )
        return download, log_box, card

    def _diffusion_tab(self, session: Any) -> None:
        import gradio as gr

        caps = self.render_caps
        with gr.Row():
            with gr.Column(scale=1):
                base = gr.Textbox(
                    label="Base pipeline",
                    placeholder="org/base-pipeline",
                    info="a diffusers pipeline repo (with model_index.json): the first column, and what the others "
                    "were fine-tuned from",
                )
                models = gr.Textbox(
                    label="Pipelines to fuse",
                    lines=3,
                    placeholder="org/fine-tune-a\norg/fine-tune-b@revision",
                    info=f"Hub repo ids of pipelines of the same kind, one per line (at most {caps.models})",
                )
                method = gr.Dropdown(
                    [(f"{s.name} ({s.family.value})", s.name) for s in self.diffusion_specs],
                    value=DEFAULT_DIFFUSION_METHOD,
                    label="Method",
                    info="the tensor-wise methods: each UNet, text encoder and VAE tensor fused on its own",
                )
                blurb = gr.Markdown(self.method_blurb(DEFAULT_DIFFUSION_METHOD))
                groups, widgets, per_layer_boxes = [], [], []
                with gr.Column(elem_id="diffusion-params"):
                    for spec in self.diffusion_specs:
                        with gr.Group(visible=spec.name == DEFAULT_DIFFUSION_METHOD) as group:
                            if not spec.parameters():
                                gr.Markdown(f"{spec.name} has no parameters.")
                            for slot in self.diffusion_slots:
                                if slot.method == spec.name:
                                    widgets.append(make_widget(slot, DIFFUSION_KEYS))
                            if spec in self.diffusion_per_layer_specs:
                                per_layer_boxes.append(make_per_layer_widget(spec, DIFFUSION_KEYS))
                        groups.append(group)
                with gr.Group():
                    preset = gr.Dropdown(
                        list(PRESETS),
                        value=None,
                        label="Block weights preset",
                        info="fills the per-layer box: one value per UNet block in block-merge order (IN00..M00.."
                        "OUTxx: 25 for SD 1.x/2.x, 19 for SDXL), or one per down / mid / up group, between the "
                        "two values below; other tensors keep the value above",
                        elem_id="diffusion-preset",
                    )
                    with gr.Row():
                        low = gr.Number(0.0, label="Preset low value")
                        high = gr.Number(1.0, label="Preset high value")
                components = gr.CheckboxGroup(
                    COMPONENTS,
                    label="Components to fuse",
                    info="none ticked: every weight component; the others are copied from the base",
                )
                dtype = gr.Dropdown(DTYPES, value="auto", label="Output dtype")
            with gr.Column(scale=1):
                initial = self.form_to_diffusion_yaml(
                    "",
                    "",
                    DEFAULT_DIFFUSION_METHOD,
                    "auto",
                    [],
                    *[s.info.default for s in self.diffusion_slots],
                    *[""] * len(per_layer_boxes),
                )
                recipe = gr.Code(
                    initial,
                    language="yaml",
                    label="Recipe (editable; Merge and draw runs exactly this)",
                    interactive=True,
                    elem_id="diffusion-recipe",
                )
                prompts = gr.Textbox(
                    DEFAULT_PROMPTS,
                    lines=3,
                    label="Prompts",
                    info=f"one per line, at most {caps.prompts}; each is a row of the grid for every seed",
                )
                with gr.Row():
                    seeds = gr.Textbox("0", label="Seeds", info=f"at most {caps.seeds}, e.g. 0, 1")
                    steps = gr.Slider(1, caps.steps, value=min(caps.default_steps, caps.steps), step=1, label="Steps")
                    size = gr.Slider(
                        caps.min_size,
                        caps.size,
                        value=min(caps.default_size, caps.size),
                        step=8,
                        label="Size (pixels a side)",
                    )
                gr.Markdown(caps.summary(), elem_id="diffusion-caps")
                with gr.Row():
                    run_btn = gr.Button("Merge and draw", variant="primary", elem_id="diffusion-button")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="diffusion-stop")
                status = gr.Markdown(elem_id="diffusion-status")
                grid = gr.Image(
                    label="Rows: prompt x seed. Columns: the base, each input, the fused pipeline",
                    type="filepath",
                    format="png",
                    interactive=False,
                    elem_id="diffusion-grid",
                )
                download, log_box, card = self._result_panel("Fused pipeline (zip)", session, "push_pipeline")

        method.change(
            lambda m: [self.method_blurb(m), *(gr.update(visible=s.name == m) for s in self.diffusion_specs)],
            method,
            [blurb, *groups],
            api_visibility="private",
            queue=False,
        )
        form = [models, base, method, dtype, components, *widgets, *per_layer_boxes]
        gr.on(
            [c.change for c in form],
            self.form_to_diffusion_yaml,
            form,
            recipe,
            api_visibility="private",
            queue=False,
        )
        gr.on(
            [preset.change, low.change, high.change, method.change],
            self.block_preset,
            [preset, method, low, high, *widgets],
            per_layer_boxes,
            api_visibility="private",
            queue=False,
        )
        run_btn.click(
            self._with_token(self.run_diffusion, 6, generator=True),
            [recipe, prompts, seeds, steps, size, session],
            [session, status, log_box, grid, download, card],
            api_name="merge_pipelines",
            concurrency_limit=None,
        )
        stop_btn.click(self.stop, session, status, api_name="stop_diffusion", queue=False)

    def _compare_tab(self, session: Any) -> None:
        import gradio as gr

        with gr.Row():
            with gr.Column(scale=1):
                pool = gr.Dropdown(self.pools, value=DEFAULT_POOL, label="Pool")
                methods = gr.CheckboxGroup([s.name for s in self.specs], value=DEFAULT_COMPARE, label="Methods")
                sweep = gr.Textbox(
                    label="Sweep (optional)",
                    placeholder="scaling_factor=0.1:1.0:0.1",
                    info="NAME=START:STOP:STEP or NAME=V1,V2,...; methods without it run once",
                )
                limit = gr.Number(DEFAULT_LIMIT, precision=0, minimum=0, label="Examples per task (0 = all)")
                with gr.Row():
                    run_btn = gr.Button("Compare", variant="primary", elem_id="compare-button")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="compare-stop")
                status = gr.Markdown(elem_id="compare-status")
                with gr.Accordion("Log", open=False):
                    log_box = gr.Textbox(lines=12, max_lines=20, show_label=False, autoscroll=True)
            with gr.Column(scale=2):
                board = gr.Dataframe(
                    label="Leaderboard (best fused value per column in bold)",
                    interactive=False,
                    elem_id="compare-leaderboard",
                    headers=EMPTY_BOARD,
                )
                with gr.Row():
                    bars = gr.Image(label="Scores per task", type="filepath", interactive=False)
                    lines = gr.Image(
                        label="Average score against the swept parameter", type="filepath", interactive=False
                    )
        run_btn.click(
            self._with_token(self.run_compare, 5, generator=True),
            [pool, methods, sweep, limit, session],
            [session, status, log_box, board, bars, lines],
            api_name="compare",
            concurrency_limit=None,
        )
        stop_btn.click(self.stop, session, status, api_name="stop_compare", queue=False)


def create_app(
    *,
    root: str | Path | None = None,
    files_root: str | Path | None = None,
    in_space: bool | None = None,
    allow_local_paths: bool | None = None,
    concurrency: int | None = None,
    limits: SpaceLimits | None = None,
    render_caps: RenderCaps | None = None,
) -> SpaceApp:
    """The Space's handlers and its session store. Outside a Space, local folders may be fused and the local token
    pushes; inside one, only Hub ids, catalog pools and built-in models, and the signed-in user's OAuth token.
    Limits come from ``limits`` or the environment (see :meth:`SpaceLimits.from_environment`); the Diffusion tab's
    pictures are bounded by ``render_caps`` (:class:`~hf_fusion.space.diffusion.RenderCaps` by default)."""
    from gradio.utils import get_upload_folder

    _quiet_network_defaults()
    space = in_a_space() if in_space is None else in_space
    logging.getLogger("hf_fusion").setLevel(logging.INFO)  # each job keeps its own thread's records
    root = Path(root) if root else default_root()
    return SpaceApp(
        root=root,
        files_root=Path(files_root) if files_root else Path(get_upload_folder()) / "hf-fusion",
        in_space=space,
        allow_local_paths=(not space) if allow_local_paths is None else allow_local_paths,
        limits=limits or SpaceLimits.from_environment(root, concurrency),
        render_caps=render_caps,
    )


def default_root() -> Path:
    """Where sessions' merged folders are kept unless told otherwise (under the system's temporary folder)."""
    return Path(tempfile.gettempdir()) / "hf-fusion-space"


def build_app(**options: Any) -> Any:
    """The Blocks of the Space (see :func:`create_app` for the options)."""
    return create_app(**options).build()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so that a stopped server unwinds and removes its sessions' files


def launch(*, host: str = "127.0.0.1", port: int | None = None, demo: Any = None, **options: Any) -> None:
    """Builds (unless given) and serves the app, blocking, never through a share link; SIGTERM (what a Space or a
    container sends to stop) ends it like Ctrl-C, so the sessions' files are removed on the way out."""
    demo = demo if demo is not None else build_app(**options)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        footer_links=["api", "settings"],
        max_file_size="1mb",
    )  # nothing in the app takes uploads


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(*, host: str = "127.0.0.1", port: int | None = None, **build: Any) -> Iterator[str]:
    """Serves the app in this process for the duration of the block (tests, scripts, notebooks); yields its URL.
    Leaving the block stops the server and removes every session's files."""
    app = create_app(**build)
    demo = app.build()
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port or free_port(host),
        prevent_thread_lock=True,
        quiet=True,
        share=False,
        ssr_mode=False,
        max_file_size="1mb",
    )
    try:
        yield url.rstrip("/")
    finally:
        demo.close()
        app.store.shutdown()
