"""The Gradio app: a Merge tab and a Compare tab over the same pipeline as the CLI.

Merge runs :func:`hf_fusion.pipeline.merge` on the recipe YAML the form writes (or the user edits), optionally
scores it on its pool, offers the folder as a download, and pushes it with the signed-in user's token. Compare runs
:func:`hf_fusion.bench.run_bench`. Both run as :class:`~hf_fusion.space.jobs.Job` s in the session's own thread,
behind a queue with a concurrency limit, and the Stop button stops them at the next tensor or batch.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, TypeVar

from hf_fusion.errors import FusionError, RecipeError
from hf_fusion.space.form import (
    POOL_SOURCE,
    REPO_SOURCE,
    ParamSlot,
    check_no_local_paths,
    make_widget,
    param_slots,
    parse_recipe_yaml,
    recipe_fields,
    to_yaml,
)
from hf_fusion.space.jobs import Job
from hf_fusion.space.session import Session, close_session

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_POOL = "minilm-text3"
DEFAULT_METHOD = "ties_merging"
DEFAULT_COMPARE = ["simple_average", "task_arithmetic", "ties_merging"]
DEFAULT_LIMIT = 200
SESSION_TTL_SECONDS = 6 * 3600
CONCURRENCY_ID = "fusion-jobs"
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

    from hf_fusion.leaderboard import table

    laid = table(report, order)
    frame = pd.DataFrame(
        [[label, *(None if v is None else round(v, 1) for v in values)] for label, values in zip(laid.labels, laid.cells)],
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

    return EvalSettings(limit=int(limit) if limit else None, metrics="bundled")


def card_body(folder: Path) -> str:
    """The model card without its YAML front matter, for display."""
    from huggingface_hub import ModelCard

    from hf_fusion.cards import CARD_FILENAME

    path = folder / CARD_FILENAME
    return ModelCard.load(path).text.lstrip() if path.is_file() else ""


def _user_error(err: BaseException) -> Exception:
    """The message users see in the UI: validation messages as they are, anything else named as unexpected."""
    import gradio as gr

    if isinstance(err, FusionError):
        return gr.Error(str(err), print_exception=False)
    log.exception("unexpected error in the Space", exc_info=err)
    return gr.Error(f"unexpected error ({type(err).__name__}): {err}")


class SpaceApp:
    """Builds the Blocks and holds the handlers; one instance per server, never per-user data."""

    def __init__(self, *, root: Path, in_space: bool, allow_local_paths: bool, concurrency: int) -> None:
        from hf_fusion.catalog import pool_names
        from hf_fusion.registry import all_methods

        self.root = root
        self.in_space = in_space
        self.allow_local_paths = allow_local_paths
        self.concurrency = concurrency
        self.specs = all_methods()
        self.slots: list[ParamSlot] = param_slots(self.specs)
        self.pools = pool_names()

    # shared steps ----------------------------------------------------------------------------------------------
    def _session(self, session: Session | None) -> Session:
        return session if session is not None else Session.create(self.root)

    def _run_job(self, session: Session, job: Job[T], progress: Any, *, results: int
                 ) -> Generator[tuple[Any, ...], None, T | None]:
        """Starts ``job`` in the session and streams (session, status, log, *results) while it runs; returns its
        result, or None when it was stopped (after showing so). Errors reach the UI with their own message."""
        import gradio as gr

        try:
            session.begin(job)
        except FusionError as err:
            raise _user_error(err) from None
        try:
            for _ in job.follow():
                if job.running and job.fraction() is not None:
                    progress((job.done, job.total), desc=job.stage, unit="steps")
                yield (session, job.status(), job.log_text(), *[gr.skip()] * results)
        finally:
            if job.running:  # the client went away: do not leave the job running for nobody
                job.stop()
        if job.stopped:
            yield (session, job.status(), job.log_text(), *[None] * results)
            return None
        if job.error is not None:
            raise _user_error(job.error)
        return job.result

    # Merge tab --------------------------------------------------------------------------------------------------
    def form_to_yaml(self, source: str, pool_name: str, models_text: str, base: str, method: str, dtype: str,
                     *values: Any) -> str:
        from hf_fusion.catalog import get_pool

        pool = get_pool(pool_name) if source == POOL_SOURCE and pool_name else None
        return to_yaml(recipe_fields(source=source, pool=pool, models_text=models_text or "", base=base or "",
                                     method=method, dtype=dtype, slots=self.slots, values=values))

    def method_blurb(self, method: str) -> str:
        from hf_fusion.registry import get_method

        spec = get_method(method)
        paper = f" · [{spec.paper.title}]({spec.paper.url})" if spec.paper else ""
        return (f"**{spec.name}**: {spec.summary}  \nfamily: {spec.family.value} · data: {spec.data.value} · "
                f"base model: {spec.base.value}{paper}")

    def _prepare_merge(self, recipe_text: str, evaluate: bool, limit: float | None) -> tuple[Any, Any, list[str] | None]:
        """Everything checkable without weights, in the request itself, so bad input fails at once."""
        from hf_fusion.pipeline import as_recipe, validate_recipe

        recipe = validate_recipe(as_recipe(parse_recipe_yaml(recipe_text), {})).recipe
        if not self.allow_local_paths:
            check_no_local_paths(recipe)
        if not evaluate:
            return recipe, False, None
        if not recipe.pool:
            raise RecipeError("scoring needs a pool that says which tasks to evaluate: pick a catalog pool, or untick "
                              "Evaluate.")
        return recipe, eval_settings(limit), self._pool_tasks(recipe)

    @staticmethod
    def _pool_tasks(recipe: Any) -> list[str]:
        """The pool's tasks whose expert is among the recipe's models (the YAML may have dropped some)."""
        from hf_fusion.catalog import get_pool

        pool = get_pool(recipe.pool)
        chosen = {m.path for m in recipe.models}
        paths = pool.expert_paths()
        tasks = [t.name for t in pool.tasks if paths[t.name] in chosen]
        if not tasks:
            raise RecipeError(f"none of the recipe's models is an expert of pool {pool.name!r}; nothing to score.")
        return tasks

    def run_merge(self, recipe_text: str, evaluate: bool, limit: float | None, session: Session | None,
                  token: str | None, progress: Any) -> Iterator[tuple[Any, ...]]:
        from hf_fusion.pipeline import merge

        session = self._session(session)
        try:
            recipe, settings, tasks = self._prepare_merge(recipe_text, evaluate, limit)
        except FusionError as err:
            raise _user_error(err) from None
        folder = session.new_folder(recipe.method)

        def work() -> tuple[Any, Path]:
            result = merge(recipe.replace(output=str(folder)), evaluate=settings, tasks=tasks, token=token,
                           show_progress=False)
            job.write(f"fused {result.fused_tensors} tensors ({result.copied_tensors} copied) in "
                      f"{result.seconds:.1f} s; {result.output_bytes / 1e6:.0f} MB")
            if result.evaluation is not None:
                job.write(f"scored {len(result.evaluation.results)} task(s) in {result.evaluation_seconds:.1f} s")
            archive = zip_folder(result.output, session.workdir / f"{folder.name}.zip")
            return result, archive

        job: Job[tuple[Any, Path]] = Job(work, "merge")
        outcome = yield from self._run_job(session, job, progress, results=3)
        if outcome is None:
            return
        result, archive = outcome
        session.keep_merged(result.output)
        scores = leaderboard_frame(result.evaluation) if result.evaluation else None
        status = (f"Merged {len(result.recipe.models)} models with **{result.recipe.method}** in {result.seconds:.1f} s"
                  + (f", scored in {result.evaluation_seconds:.1f} s." if result.evaluation else ".")
                  + " Download it below, or push it to the Hub.")
        yield session, status, job.log_text(), scores, str(archive), card_body(result.output)

    def stop(self, session: Session | None) -> str:
        return "Nothing is running." if session is None else session.stop()

    def push(self, repo_id: str, private: bool, overwrite: bool, session: Session | None, token: str | None) -> str:
        from hf_fusion.hub.auth import resolve_token
        from hf_fusion.hub.push import PushTarget, push_merged_folder

        try:
            if session is None or session.merged is None or not session.merged.is_dir():
                raise RecipeError("nothing to push yet: run a merge first.")
            if not repo_id or not repo_id.strip():
                raise RecipeError("choose a repo name (`name` or `namespace/name`) to push to.")
            token = token if self.in_space else resolve_token(None)
            if self.in_space and not token:
                raise RecipeError("sign in with the Hugging Face button to push.")
            target = PushTarget(repo_id.strip(), private=private, overwrite=overwrite)
            pushed = push_merged_folder(session.merged, target, token=token, rewrite_card=True)
        except FusionError as err:
            raise _user_error(err) from None
        visibility = "private" if private else "public"
        link = pushed.pr_url or pushed.url
        return f"Pushed to [{pushed.repo_id}]({link}) ({visibility})."

    # Compare tab ------------------------------------------------------------------------------------------------
    def run_compare(self, pool_name: str, methods: list[str], sweep_text: str, limit: float | None,
                    session: Session | None, token: str | None, progress: Any) -> Iterator[tuple[Any, ...]]:
        from hf_fusion.bench import Sweep, run_bench
        from hf_fusion.catalog import get_pool
        from hf_fusion.evaluation import INDIVIDUAL, PRETRAINED
        from hf_fusion.registry import get_method

        session = self._session(session)
        try:
            if not methods:
                raise RecipeError("pick at least one method to compare.")
            specs = [get_method(m) for m in methods]
            pool = get_pool(pool_name)
            sweep = Sweep.parse(sweep_text.strip()) if sweep_text and sweep_text.strip() else None
            if sweep is not None and not any(sweep.parameter in s.params_model.model_fields for s in specs):
                raise RecipeError(f"none of the chosen methods has a parameter {sweep.parameter!r} to sweep.")
            settings = eval_settings(limit)
        except FusionError as err:
            raise _user_error(err) from None
        output = session.new_folder("compare")

        def work() -> Any:
            try:
                return run_bench(pool, [s.name for s in specs], output, sweep=sweep, settings=settings, token=token,
                                 show_progress=False)
            finally:
                shutil.rmtree(output / "models", ignore_errors=True)  # only the scores are shown

        job: Job[Any] = Job(work, "comparison")
        bench = yield from self._run_job(session, job, progress, results=3)
        if bench is None:
            return
        labels = [c for c in bench.report.columns() if c not in (PRETRAINED, INDIVIDUAL)]
        frame = leaderboard_frame(bench.report)  # baselines first, then the fused models in the order they ran
        bars = output / "scores_per_task.png"
        lines = output / f"sweep_{sweep.parameter}.png" if sweep else None
        status = f"Compared {len(labels)} fused model(s) on {len(bench.report.results)} task(s) of {pool.name}."
        yield (session, status, job.log_text(), frame, str(bars) if bars.is_file() else None,
               str(lines) if lines is not None and lines.is_file() else None)

    # layout -----------------------------------------------------------------------------------------------------
    def build(self) -> Any:
        import gradio as gr

        with gr.Blocks(title="hf-fusion", fill_width=True) as demo:
            session = gr.State(None, time_to_live=SESSION_TTL_SECONDS, delete_callback=close_session)
            gr.Markdown("# hf-fusion\nFuse fine-tuned models from the Hub, score them against their experts, and "
                        "push the result. Every method and parameter below comes from the same registry as the "
                        "`hf-fusion` command line.")
            if self.in_space:
                gr.LoginButton()
            else:
                gr.Markdown("Pushing uses your local Hugging Face token (`hf auth login` or `HF_TOKEN`).")
            with gr.Tabs():
                with gr.Tab("Merge", id="merge"):
                    self._merge_tab(session)
                with gr.Tab("Compare", id="compare"):
                    self._compare_tab(session)
        demo.queue(max_size=32, default_concurrency_limit=self.concurrency)
        return demo

    def _with_token(self, handler: Callable[..., Any], inputs: int, *, generator: bool) -> Callable[..., Any]:
        """``handler`` with the user's token (and gradio's progress tracker) after its ``inputs`` values.

        gradio injects special arguments by position, reading the signature: so the wrapper declares its inputs
        one by one, then ``oauth_token: gr.OAuthToken | None`` in a Space (the signed-in user's token; outside a
        Space none is passed and the local login is used), then ``progress=gr.Progress()`` for generators.
        """
        import inspect

        import gradio as gr

        Param = inspect.Parameter
        params = [Param(f"input_{i}", Param.POSITIONAL_OR_KEYWORD) for i in range(inputs)]
        if self.in_space:
            params.append(Param("oauth_token", Param.POSITIONAL_OR_KEYWORD, default=None,
                                annotation=gr.OAuthToken | None))
        if generator:
            params.append(Param("progress", Param.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
        in_space = self.in_space

        def split(args: tuple[Any, ...]) -> tuple[list[Any], str | None, Any]:
            values, extra = list(args[:inputs]), list(args[inputs:])
            oauth = extra.pop(0) if in_space and extra else None
            return values, (oauth.token if oauth is not None else None), (extra[0] if extra else None)

        if generator:
            def run(*args: Any) -> Any:
                values, token, progress = split(args)
                yield from handler(*values, token, progress)
        else:
            def run(*args: Any) -> Any:  # type: ignore[misc]
                values, token, _ = split(args)
                return handler(*values, token)
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not Param.empty}
        return run

    def _merge_tab(self, session: Any) -> None:
        import gradio as gr

        with gr.Row():
            with gr.Column(scale=1):
                source = gr.Radio([POOL_SOURCE, REPO_SOURCE], value=POOL_SOURCE, label="Models from")
                pool = gr.Dropdown(self.pools, value=DEFAULT_POOL, label="Pool",
                                   info="FusionBench's pools and the built-in minilm-text3 (runs offline)")
                models = gr.Textbox(label="Models", lines=4, visible=False,
                                    placeholder="org/model-a\norg/model-b@revision", info="Hub repo ids, one per line")
                base = gr.Textbox(label="Base model", visible=False, placeholder="org/pretrained",
                                  info="the model the others were fine-tuned from (task vectors are taken against it)")
                method = gr.Dropdown([(f"{s.name} ({s.family.value})", s.name) for s in self.specs],
                                     value=DEFAULT_METHOD, label="Method")
                blurb = gr.Markdown(self.method_blurb(DEFAULT_METHOD))
                groups, widgets = [], []
                with gr.Column(elem_id="merge-params"):
                    for spec in self.specs:
                        with gr.Group(visible=spec.name == DEFAULT_METHOD) as group:
                            if not spec.parameters():
                                gr.Markdown(f"{spec.name} has no parameters.")
                            for slot in self.slots:
                                if slot.method == spec.name:
                                    widgets.append(make_widget(slot))
                        groups.append(group)
                dtype = gr.Dropdown(DTYPES, value="auto", label="Output dtype")
            with gr.Column(scale=1):
                initial = self.form_to_yaml(POOL_SOURCE, DEFAULT_POOL, "", "", DEFAULT_METHOD, "auto",
                                            *[s.info.default for s in self.slots])
                recipe = gr.Code(initial, language="yaml", label="Recipe (editable; Merge runs exactly this)",
                                 interactive=True)
                with gr.Row():
                    evaluate = gr.Checkbox(True, label="Evaluate on the pool's tasks")
                    limit = gr.Number(DEFAULT_LIMIT, precision=0, minimum=0, label="Examples per task (0 = all)")
                with gr.Row():
                    merge_btn = gr.Button("Merge", variant="primary", elem_id="merge-button")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="merge-stop")
                status = gr.Markdown(elem_id="merge-status")
                scores = gr.Dataframe(label="Scores (fused against the pretrained model and each task's expert)",
                                      interactive=False, elem_id="merge-scores", headers=EMPTY_BOARD)
                download = gr.File(label="Merged model (zip)", interactive=False)
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

        source.change(lambda s: (gr.update(visible=s == POOL_SOURCE), gr.update(visible=s == REPO_SOURCE),
                                 gr.update(visible=s == REPO_SOURCE)),
                      source, [pool, models, base], api_visibility="private", queue=False)
        method.change(lambda m: [self.method_blurb(m), *(gr.update(visible=s.name == m) for s in self.specs)],
                      method, [blurb, *groups], api_visibility="private", queue=False)
        form = [source, pool, models, base, method, dtype, *widgets]
        gr.on([c.change for c in form], self.form_to_yaml, form, recipe, api_visibility="private", queue=False)
        merge_btn.click(self._with_token(self.run_merge, 4, generator=True), [recipe, evaluate, limit, session],
                              [session, status, log_box, scores, download, card], api_name="merge",
                              concurrency_id=CONCURRENCY_ID)
        stop_btn.click(self.stop, session, status, api_name="stop", queue=False)
        push_btn.click(self._with_token(self.push, 4, generator=False), [repo, private, overwrite, session], push_status,
                       api_name="push")

    def _compare_tab(self, session: Any) -> None:
        import gradio as gr

        with gr.Row():
            with gr.Column(scale=1):
                pool = gr.Dropdown(self.pools, value=DEFAULT_POOL, label="Pool")
                methods = gr.CheckboxGroup([s.name for s in self.specs], value=DEFAULT_COMPARE, label="Methods")
                sweep = gr.Textbox(label="Sweep (optional)", placeholder="scaling_factor=0.1:1.0:0.1",
                                   info="NAME=START:STOP:STEP or NAME=V1,V2,...; methods without it run once")
                limit = gr.Number(DEFAULT_LIMIT, precision=0, minimum=0, label="Examples per task (0 = all)")
                with gr.Row():
                    run_btn = gr.Button("Compare", variant="primary", elem_id="compare-button")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="compare-stop")
                status = gr.Markdown(elem_id="compare-status")
                with gr.Accordion("Log", open=False):
                    log_box = gr.Textbox(lines=12, max_lines=20, show_label=False, autoscroll=True)
            with gr.Column(scale=2):
                board = gr.Dataframe(label="Leaderboard (best fused value per column in bold)", interactive=False,
                                     elem_id="compare-leaderboard", headers=EMPTY_BOARD)
                with gr.Row():
                    bars = gr.Image(label="Scores per task", type="filepath", interactive=False)
                    lines = gr.Image(label="Average score against the swept parameter", type="filepath",
                                     interactive=False)
        run_btn.click(self._with_token(self.run_compare, 5, generator=True), [pool, methods, sweep, limit, session],
                      [session, status, log_box, board, bars, lines], api_name="compare",
                      concurrency_id=CONCURRENCY_ID)
        stop_btn.click(self.stop, session, status, api_name="stop_compare", queue=False)


def build_app(*, root: str | Path | None = None, in_space: bool | None = None, allow_local_paths: bool | None = None,
              concurrency: int | None = None) -> Any:
    """The Blocks of the Space. Outside a Space, local folders may be fused and the local token pushes; inside one,
    only Hub ids and built-in pools, and the signed-in user's OAuth token."""
    _quiet_network_defaults()
    space = in_a_space() if in_space is None else in_space
    logging.getLogger("hf_fusion").setLevel(logging.INFO)  # each job keeps its own thread's records
    app = SpaceApp(
        root=Path(root) if root else Path(tempfile.gettempdir()) / "hf-fusion-space",
        in_space=space,
        allow_local_paths=(not space) if allow_local_paths is None else allow_local_paths,
        concurrency=concurrency or int(os.environ.get("HF_FUSION_SPACE_CONCURRENCY", "1")),
    )
    return app.build()


def launch(*, host: str = "127.0.0.1", port: int | None = None, **build: Any) -> None:
    """Builds and serves the app (blocking); never through a share link."""
    demo = build_app(**build)
    demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False, footer_links=["api", "settings"])


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(*, host: str = "127.0.0.1", port: int | None = None, **build: Any) -> Iterator[str]:
    """Serves the app in this process for the duration of the block (tests, scripts, notebooks); yields its URL."""
    demo = build_app(**build)
    _, url, _ = demo.launch(server_name=host, server_port=port or free_port(host), prevent_thread_lock=True,
                            quiet=True, share=False, ssr_mode=False)
    try:
        yield url.rstrip("/")
    finally:
        demo.close()
