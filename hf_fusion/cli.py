"""The ``hf-fusion`` command line. Heavy modules (torch, transformers) are imported only by the commands that run."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
from typing import Any, Sequence

from hf_fusion.version import __version__

log = logging.getLogger("hf_fusion")

def size_argument(text: str) -> int:
    """A ``--max-shard-size`` style value (see :func:`hf_fusion.sizes.parse_size`)."""
    from hf_fusion.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A count that must be at least 1 (examples, batch size, jobs)."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """A count that may be 0 (adaptation steps: 0 keeps the initial coefficients)."""
    return _whole_number(text, 0)


def finite_float(text: str) -> float:
    """A number that must be finite (a NaN learning rate trains nothing but NaNs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (seconds)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def repo_id(text: str) -> str:
    """A Hub repo to push to: ``name`` or ``org/name``, checked by huggingface_hub's rules before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not text.strip():
        raise argparse.ArgumentTypeError("needs a repo name (org/name, or name under your account), got nothing")
    try:
        validate_repo_id(text)
    except HFValidationError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid Hub repo id: {err}") from None
    return text


def parse_param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` with VALUE read as YAML, so numbers, booleans and lists keep their types."""
    import yaml

    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return name.strip(), value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step (DEBUG level)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fusion",
        description="Fuse fine-tuned models (ensemble, merge, mix) into one that loads with from_pretrained.",
    )
    parser.add_argument("--version", action="version", version=f"hf-fusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    methods = sub.add_parser("methods", help="list fusion methods with their parameters and defaults")
    methods.add_argument("name", nargs="?", help="show one method in detail")
    methods.add_argument("--json", action="store_true", help="machine-readable output")
    methods.add_argument("--markdown", action="store_true", help="the README's methods table")
    _add_common(methods)

    merge = sub.add_parser(
        "merge",
        help="fuse models into an output folder",
        description="Fuse models with any registered method. Flags override the fields of --config.",
    )
    merge.add_argument("--config", metavar="RECIPE.yaml", help="recipe file (the output keeps a copy)")
    merge.add_argument("--repo-ids", nargs="+", metavar="MODEL",
                       help="models to fuse: Hub repo ids (org/name[@revision]) or local folders")
    merge.add_argument("--base", metavar="MODEL", help="the pretrained model the others were fine-tuned from")
    merge.add_argument("--method", help="fusion method (see `hf-fusion methods`)")
    merge.add_argument("--param", action="append", type=parse_param, default=[], metavar="NAME=VALUE",
                       help="method parameter, repeatable (e.g. --param scaling_factor=0.3)")
    merge.add_argument("--output", metavar="FOLDER", help="where to write the fused model")
    merge.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"],
                       help="output dtype of floating-point tensors (default: as the reference model)")
    merge.add_argument("--device", help="compute device: cpu (default), cuda, cuda:N")
    merge.add_argument("--exclude", nargs="+", metavar="PATTERN",
                       help="tensor-name globs copied unfused from the base (e.g. 'classifier.*')")
    merge.add_argument("--heads", nargs="+", metavar="PATTERN",
                       help="tensor-name globs of per-task heads, left out: the output is the fused backbone")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace an existing output folder, and files on an existing Hub branch with --push")
    merge.add_argument("--allow-pickle", action="store_true",
                       help="load .bin/.pt pickle checkpoints (can run code; only for models you trust)")
    merge.add_argument("--allow-nonfinite", action="store_true", default=None,
                       help="fuse tensors holding NaN or inf instead of refusing them (carried through to the output)")
    merge.add_argument("--clamp-overflow", action="store_true", default=None,
                       help="clamp fused values beyond the output dtype's range instead of refusing them")
    merge.add_argument("--max-shard-size", type=size_argument, default=None, metavar="SIZE",
                       help="largest output shard (default 5GB)")
    merge.add_argument("--pool", help="a catalog pool (see `hf-fusion pools`) or pool file: its base, experts, heads")
    merge.add_argument("--tasks", type=_comma_list, metavar="T1,T2", help="only these tasks (and their experts) of the pool")
    merge.add_argument("--evaluate", action="store_true", help="score the fused model on the pool's tasks")
    _add_eval_options(merge)
    _add_method_data_options(merge)
    merge.add_argument("--push", metavar="REPO", type=repo_id, help="push the fused model to this Hub repo (org/name or name)")
    _add_push_options(merge)
    _add_common(merge)

    pools = sub.add_parser("pools", help="list the model pools: FusionBench's and the built-in ones")
    pools.add_argument("name", nargs="?", help="show one pool's base, experts and tasks")
    pools.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common(pools)

    evaluate = sub.add_parser("evaluate", help="score a model on a pool's tasks, beside the base and the experts")
    evaluate.add_argument("--model", required=True, help="a fused folder, or any model folder or Hub repo id")
    evaluate.add_argument("--pool", required=True, help="catalog pool or pool file")
    evaluate.add_argument("--tasks", type=_comma_list, metavar="T1,T2", help="only these tasks")
    evaluate.add_argument("--no-baselines", action="store_true", help="skip the pretrained model and the experts")
    evaluate.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    evaluate.add_argument("--token", help="Hub token for private models or datasets")
    _add_eval_options(evaluate)
    _add_common(evaluate)

    bench = sub.add_parser("bench", help="compare methods (and a parameter sweep) on a pool: leaderboard and plots")
    bench.add_argument("--pool", required=True, help="catalog pool or pool file")
    bench.add_argument("--methods", required=True, type=_method_list, metavar="M1,M2[K=V;K=V]",
                       help="methods to compare; a method may carry its own parameters in brackets")
    bench.add_argument("--sweep", metavar="NAME=START:STOP:STEP", help="sweep one parameter of the methods having it")
    bench.add_argument("--param", action="append", type=parse_param, default=[], metavar="NAME=VALUE",
                       help="fixed method parameter, repeatable")
    bench.add_argument("--tasks", type=_comma_list, metavar="T1,T2", help="only these tasks")
    bench.add_argument("--output", required=True, metavar="FOLDER", help="report folder (models under models/)")
    bench.add_argument("--overwrite", action="store_true", help="replace fused models from an earlier run")
    bench.add_argument("--token", help="Hub token")
    _add_eval_options(bench)
    _add_method_data_options(bench)
    _add_common(bench)

    push = sub.add_parser("push", help="push a fused model folder to the Hub (writes its card if missing)")
    push.add_argument("folder", help="a folder written by `hf-fusion merge`")
    push.add_argument("repo", type=repo_id, help="target repo (org/name, or name under your account)")
    push.add_argument("--overwrite", action="store_true", help="commit over files already on the target branch")
    _add_push_options(push)
    _add_common(push)

    card = sub.add_parser("card", help="(re)write a fused model's README.md from its recipe and evaluation report")
    card.add_argument("folder", help="a folder written by `hf-fusion merge`")
    card.add_argument("--repo-id", help="the repo the card's usage snippet loads (default: the folder)")
    _add_common(card)

    space = sub.add_parser("space", help="start the Gradio app (merge and compare in the browser) on this machine")
    space.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    space.add_argument("--port", type=positive_int, default=7860, help="port (default: 7860)")
    space.add_argument("--concurrency", type=positive_int, default=None,
                       help="jobs run at once (default: HF_FUSION_SPACE_CONCURRENCY or 1)")
    space.add_argument("--max-waiting", type=non_negative_int, default=None,
                       help="jobs that may wait for a slot; more are refused at once (default: "
                            "HF_FUSION_SPACE_MAX_WAITING or 16)")
    space.add_argument("--idle-seconds", type=positive_float, default=None,
                       help="a session's files are removed after this long without a request (default: "
                            "HF_FUSION_SPACE_IDLE_SECONDS or 900)")
    space.add_argument("--disk-budget", type=size_argument, default=None, metavar="SIZE",
                       help="disk for all sessions' files; idle sessions are evicted to stay under it (default: "
                            "HF_FUSION_SPACE_DISK_BUDGET, or half the free space, at most 20GB)")
    space.add_argument("--no-local-paths", action="store_true",
                       help="refuse local folders as models, as on a shared Space")
    _add_common(space)

    return parser


def _method_list(text: str) -> list[str]:
    """Comma-separated methods; commas inside brackets belong to a method's parameters."""
    return [t.strip() for t in re.split(r",(?![^\[]*\])", text) if t.strip()]


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


COMMON_METHOD_FLAGS = ("calibration_samples", "steps", "lr", "seed")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=positive_int, metavar="N", help="score N examples per task (a fixed, seeded subset)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="examples per forward pass, for evaluation (default 32) and data-driven methods")
    parser.add_argument("--eval-device", default="cpu", metavar="DEVICE", help="device for evaluation (default cpu)")
    parser.add_argument("--metrics", choices=["auto", "hub", "bundled"], default="auto",
                        help="metric modules from the Hub, or bundled ones (auto: bundled when HF_HUB_OFFLINE=1)")


def _add_method_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data-driven methods (Fisher, RegMean, AdaMerging, WEMoE)")
    group.add_argument("--calibration-samples", type=positive_int, metavar="N", help="examples per task for statistics")
    group.add_argument("--steps", type=non_negative_int, metavar="N", help="test-time adaptation steps")
    group.add_argument("--lr", type=finite_float, metavar="LR", help="test-time adaptation learning rate")
    group.add_argument("--seed", type=int, metavar="N", help="seed for sampling and initialisation")


def _common_method_params(args: argparse.Namespace) -> dict[str, Any]:
    """The common method flags that were given (``batch_size`` too, for methods that take one)."""
    return {k: getattr(args, k) for k in (*COMMON_METHOD_FLAGS, "batch_size") if getattr(args, k, None) is not None}


def _settings(args: argparse.Namespace) -> Any:
    from hf_fusion.tasks.base import EvalSettings

    return EvalSettings(batch_size=args.batch_size or 32, device=args.eval_device, limit=args.limit,
                        metrics=args.metrics)


def _add_push_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--revision", metavar="BRANCH", help="push to this branch (created from main if needed)")
    where.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="default: 'Fuse N models with METHOD (hf-fusion)'")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN, then `hf auth login`); never printed")


def _push_target(args: argparse.Namespace, repo: str | None) -> Any:
    if not repo:
        return None
    from hf_fusion.hub.push import PushTarget

    return PushTarget(repo, private=args.private, revision=args.revision, create_pr=args.create_pr,
                      overwrite=args.overwrite, commit_message=args.commit_message)


def _print_push(result: Any) -> None:
    if result.pr_url:
        print(f"Opened a pull request on {result.repo_id}: {result.pr_url}")
    else:
        print(f"Pushed to {result.url} ({result.commit_url})")


def _configure_logging(args: argparse.Namespace) -> None:
    """hf-fusion's own messages at INFO (DEBUG with --verbose); other libraries stay at WARNING, so their debug
    output (HTTP internals included) never reaches the terminal."""
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _format_default(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, dict, str)) else str(value)


def methods_markdown(specs: Sequence[Any]) -> str:
    """One table row per method: name and aliases, what it needs, parameters with defaults, the paper."""
    rows = ["| method (aliases) | family | data | base | parameters (defaults) | paper |", "|---|---|---|---|---|---|"]
    for s in specs:
        names = f"`{s.name}`" + (f" ({', '.join(s.aliases)})" if s.aliases else "")
        params = ", ".join(f"`{p.name}={_format_default(p.default)}`" for p in s.parameters()) or "-"
        paper = f"[{s.paper.title.split(' (')[0]}]({s.paper.url})" if s.paper else ""
        rows.append(f"| {names} | {s.family.value} | {s.data.value} | {s.base.value} | {params} | {paper} |")
    return "\n".join(rows)


def cmd_methods(args: argparse.Namespace) -> int:
    from hf_fusion.registry import all_methods, get_method

    specs = [get_method(args.name)] if args.name else all_methods()
    if args.json:
        out = [
            {
                "name": s.name, "aliases": list(s.aliases), "family": s.family.value, "data": s.data.value,
                "base": s.base.value, "summary": s.summary, "paper": s.paper.url if s.paper else None,
                "parameters": [
                    {"name": p.name, "type": p.type, "default": p.default, "range": p.range_text(),
                     "description": p.description}
                    for p in s.parameters()
                ],
            }
            for s in specs
        ]
        print(json.dumps(out, indent=2))
        return 0
    if args.markdown:
        print(methods_markdown(specs))
        return 0
    if args.name:
        s = specs[0]
        print(f"{s.name}  ({s.family.value}; data: {s.data.value}; base: {s.base.value})")
        print(f"  {s.summary}")
        if s.aliases:
            print(f"  aliases: {', '.join(s.aliases)}")
        if s.paper:
            print(f"  paper: {s.paper.title}\n         {s.paper.url}")
        for p in s.parameters():
            rng = f" {p.range_text()}" if p.range_text() else ""
            print(f"  --param {p.name}={_format_default(p.default)}  ({p.type}{rng}) {p.description}")
        return 0
    rows = [("METHOD", "FAMILY", "DATA", "BASE", "PARAMETERS (defaults)")]
    for s in specs:
        params = " ".join(f"{p.name}={_format_default(p.default)}" for p in s.parameters()) or "-"
        rows.append((s.name, s.family.value, s.data.value, s.base.value, params))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    print("\n`hf-fusion methods NAME` shows ranges, aliases and the paper.")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from hf_fusion.fusion import merge

    kwargs: dict[str, Any] = dict(args.param)
    common = _common_method_params(args)
    if common:
        from hf_fusion.registry import get_method

        if args.method:
            fields = get_method(args.method).params_model.model_fields
            common = {k: v for k, v in common.items() if k in fields or k != "batch_size"}
        kwargs = {**common, **kwargs}
    if args.max_shard_size is not None:
        kwargs["max_shard_bytes"] = args.max_shard_size
    if not args.config and not args.repo_ids and not args.pool:
        raise SystemExit("hf-fusion merge: give --repo-ids or --pool (and --method, --output), or --config RECIPE.yaml")
    if args.token:
        kwargs["token"] = args.token
    result = merge(
        args.config,
        models=args.repo_ids,
        base=args.base,
        method=args.method,
        output=args.output,
        dtype=args.dtype,
        device=args.device,
        exclude=args.exclude,
        heads=args.heads,
        pool=args.pool,
        tasks=args.tasks,
        evaluate=_settings(args) if args.evaluate else False,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
        clamp_overflow=args.clamp_overflow,
        push=_push_target(args, args.push),
        show_progress=not args.quiet,
        **kwargs,
    )
    if not args.quiet:
        n = len(result.recipe.models)
        print(
            f"Fused {n} model{'s' if n != 1 else ''} with {result.recipe.method} into {result.output} "
            f"({result.fused_tensors} tensors fused, {result.copied_tensors} copied, "
            f"{result.output_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s"
        )
    if result.evaluation is not None:
        from hf_fusion.leaderboard import to_markdown

        if not args.quiet:
            tasks = len(result.evaluation.results)
            print(f"Scored on {tasks} task{'s' if tasks != 1 else ''} in {result.evaluation_seconds:.1f} s")
        print(to_markdown(result.evaluation))
    if result.push is not None:
        _print_push(result.push)
    return 0


def cmd_pools(args: argparse.Namespace) -> int:
    from hf_fusion.catalog import get_pool, pool_names

    pools = [get_pool(n) for n in ([args.name] if args.name else pool_names())]
    if args.json:
        print(json.dumps([p.model_dump() for p in pools], indent=2))
        return 0
    if args.name:
        pool = pools[0]
        print(f"{pool.name}: {pool.description}\n  base: {pool.base}\n  source: {pool.source}")
        if pool.heads:
            print(f"  heads (kept per task): {', '.join(pool.heads)}")
        for spec in pool.tasks:
            data = spec.dataset + (f" ({spec.config})" if spec.config else "") + f" [{spec.split}]"
            print(f"  {spec.name:18s} {pool.experts[spec.name]}\n  {'':18s} {spec.kind}, {spec.metric} on {data}")
        return 0
    rows = [("POOL", "TASKS", "KIND", "BASE")]
    rows += [(p.name, str(len(p.tasks)), p.tasks[0].kind, p.base) for p in pools]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("\n`hf-fusion pools NAME` lists a pool's experts and datasets.")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_fusion.cards import CARD_FILENAME, write_card
    from hf_fusion.catalog import get_pool
    from hf_fusion.evaluation import evaluate_pool
    from hf_fusion.leaderboard import to_markdown
    from hf_fusion.fusion import fused_models
    from hf_fusion.recipe import RECIPE_FILENAME, ModelRef, Recipe
    from hf_fusion.sources import fetch, resolve

    pool = get_pool(args.pool)
    ref = ModelRef.parse(args.model)
    local_fusion = ref.is_local and (Path(ref.path) / RECIPE_FILENAME).is_file()
    if local_fusion:  # may hold one model per task in subfolders
        folder = Path(ref.path)
    else:
        fetched = fetch(resolve(ref, token=args.token, allow_pickle=False), token=args.token,
                        show_progress=not args.quiet).folder
        assert fetched is not None
        folder = fetched
    label = "fused" if (folder / RECIPE_FILENAME).is_file() else Path(args.model).name
    models = fused_models(folder, Recipe.from_yaml(folder / RECIPE_FILENAME), pool) if local_fusion else folder
    report = evaluate_pool(pool, {label: models}, tasks=args.tasks, baselines=not args.no_baselines,
                           settings=_settings(args), token=args.token, show_progress=not args.quiet)
    written = []
    if local_fusion:
        written.append(f"Wrote {report.save(folder)}")
        card_existed = (folder / CARD_FILENAME).is_file()
        written.append(f"{'Rewrote' if card_existed else 'Wrote'} {write_card(folder)} with these scores")
    if args.report:
        Path(args.report).write_text(report.model_dump_json(indent=2) + "\n")
        written.append(f"Wrote {args.report}")
    print(to_markdown(report))
    subsets = report.subset_results
    if subsets:
        counts = ", ".join(f"{r.task} {r.examples}" for r in subsets)
        print(f"\nScored a seeded sample of each task's split, not the whole split (--limit {args.limit}): {counts} "
              "examples.")
    if written and not args.quiet:
        print("\n" + "\n".join(written))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_fusion.bench import Sweep, run_bench
    from hf_fusion.catalog import get_pool

    result = run_bench(
        get_pool(args.pool), args.methods, Path(args.output), sweep=Sweep.parse(args.sweep) if args.sweep else None,
        tasks=args.tasks, settings=_settings(args), parameters=dict(args.param), common=_common_method_params(args),
        token=args.token,
        overwrite=args.overwrite, show_progress=not args.quiet,
    )
    print(result.leaderboard)
    print(f"\nReport, leaderboard and plots in {result.output}")
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    import importlib.util

    from hf_fusion.errors import FusionError

    if importlib.util.find_spec("gradio") is None:
        raise FusionError('the Space needs gradio, which is not installed: pip install "hf-fusion[space]".')
    from dataclasses import replace

    from hf_fusion.space import launch
    from hf_fusion.space.app import SpaceLimits, default_root

    limits = SpaceLimits.from_environment(default_root(), args.concurrency)
    flags = {"waiting": args.max_waiting, "idle_seconds": args.idle_seconds, "disk_budget": args.disk_budget}
    limits = replace(limits, **{k: v for k, v in flags.items() if v is not None})
    launch(host=args.host, port=args.port, limits=limits, allow_local_paths=False if args.no_local_paths else None)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_fusion.hub.push import push_merged_folder

    _print_push(push_merged_folder(Path(args.folder), _push_target(args, args.repo), token=args.token))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_fusion.cards import CARD_FILENAME, write_card

    existed = (Path(args.folder) / CARD_FILENAME).is_file()
    path = write_card(Path(args.folder), repo_id=args.repo_id)
    if not args.quiet:
        print(f"{'Rewrote' if existed else 'Wrote'} {path}")
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from hf_fusion.errors import FusionError

    try:
        commands = {"methods": cmd_methods, "merge": cmd_merge, "push": cmd_push, "card": cmd_card,
                    "pools": cmd_pools, "evaluate": cmd_evaluate, "bench": cmd_bench,
                    "space": cmd_space}
        return commands[args.command](args)
    except FusionError as err:
        print(f"hf-fusion: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno is None:  # not the file system's (a network error): say what it was, without a traceback
            print(f"hf-fusion: error: {type(err).__name__}: {err}", file=sys.stderr)
        else:
            from hf_fusion.errors import describe_os_error

            print(f"hf-fusion: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hf-fusion: interrupted; nothing was written to the output folder.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
