"""`hf-fusion evaluate` and `bench`: score a model on a pool's tasks, compare methods on a pool."""

from __future__ import annotations

import argparse
from typing import Any

from hf_fusion.cli.arguments import (
    add_common,
    add_eval_options,
    add_method_data_options,
    comma_list,
    common_method_params,
    eval_settings,
    method_list,
    parse_param,
)


def register(sub: Any) -> None:
    """Adds this module's commands to the ``hf-fusion`` parser."""
    evaluate = sub.add_parser("evaluate", help="score a model on a pool's tasks, beside the base and the experts")
    evaluate.add_argument("--model", required=True, help="a fused folder, or any model folder or Hub repo id")
    evaluate.add_argument("--pool", required=True, help="catalog pool or pool file")
    evaluate.add_argument("--tasks", type=comma_list, metavar="T1,T2", help="only these tasks")
    evaluate.add_argument("--no-baselines", action="store_true", help="skip the pretrained model and the experts")
    evaluate.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    evaluate.add_argument("--token", help="Hub token for private models or datasets")
    evaluate.add_argument("--device", help="device for evaluation: cpu (default), cuda, cuda:N")
    add_eval_options(evaluate)
    add_common(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    bench = sub.add_parser("bench", help="compare methods (and a parameter sweep) on a pool: leaderboard and plots")
    bench.add_argument("--pool", required=True, help="catalog pool or pool file")
    bench.add_argument(
        "--methods",
        required=True,
        type=method_list,
        metavar="M1,M2[K=V;K=V]",
        help="methods to compare; a method may carry its own parameters in brackets",
    )
    bench.add_argument("--sweep", metavar="NAME=START:STOP:STEP", help="sweep one parameter of the methods having it")
    bench.add_argument(
        "--param",
        action="append",
        type=parse_param,
        default=[],
        metavar="NAME=VALUE",
        help="fixed method parameter, repeatable",
    )
    bench.add_argument("--tasks", type=comma_list, metavar="T1,T2", help="only these tasks")
    bench.add_argument(
        "--output",
        required=True,
        metavar="FOLDER",
        help="report folder (models under models/, each configuration's result under runs/)",
    )
    bench.add_argument(
        "--overwrite",
        action="store_true",
        help="run every configuration again, replacing fused models and results of an earlier run (without it a "
        "rerun skips the configurations already done)",
    )
    bench.add_argument(
        "--device",
        help="device for fusion, and for evaluation unless --eval-device: cpu (default), cuda, cuda:N; under "
        "several processes plain cuda is each process's own GPU",
    )
    bench.add_argument("--token", help="Hub token")
    add_eval_options(bench)
    add_method_data_options(bench)
    add_common(bench)
    bench.set_defaults(run=cmd_bench)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_fusion.cards import CARD_FILENAME, write_card
    from hf_fusion.catalog import get_pool
    from hf_fusion.fusion import fused_models
    from hf_fusion.recipe import RECIPE_FILENAME, ModelRef, Recipe
    from hf_fusion.reports.leaderboard import to_markdown
    from hf_fusion.runtime import current
    from hf_fusion.sources import fetch, resolve
    from hf_fusion.tasks.evaluate import evaluate_pool

    settings = eval_settings(args)  # flags refused before anything is read
    pool = get_pool(args.pool)
    ref = ModelRef.parse(args.model)
    local_fusion = ref.is_local and (Path(ref.path) / RECIPE_FILENAME).is_file()
    if local_fusion:  # may hold one model per task in subfolders
        folder = Path(ref.path)
    else:
        source = resolve(ref, token=args.token, allow_pickle=False)
        fetched = current().main_first(lambda: fetch(source, token=args.token, show_progress=not args.quiet).folder)
        assert fetched is not None
        folder = fetched
    label = "fused" if (folder / RECIPE_FILENAME).is_file() else Path(args.model).name
    models = fused_models(folder, Recipe.from_yaml(folder / RECIPE_FILENAME), pool) if local_fusion else folder
    report = evaluate_pool(
        pool,
        {label: models},
        tasks=args.tasks,
        baselines=not args.no_baselines,
        settings=settings,
        token=args.token,
        show_progress=not args.quiet,
    )
    written = []
    if not current().is_main:
        return 0  # the main process writes and prints the report
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
        print(
            f"\nScored a seeded sample of each task's split, not the whole split (--limit {args.limit}): {counts} "
            "examples."
        )
    if written and not args.quiet:
        print("\n" + "\n".join(written))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs the bench; under several processes (torchrun, accelerate launch) only the main one prints. Exits 1 when
    a configuration failed, after every other one's results are written."""
    import sys
    from pathlib import Path

    from hf_fusion.bench import Sweep, run_bench
    from hf_fusion.catalog import get_pool
    from hf_fusion.runtime import current

    result = run_bench(
        get_pool(args.pool),
        args.methods,
        Path(args.output),
        sweep=Sweep.parse(args.sweep) if args.sweep else None,
        tasks=args.tasks,
        settings=eval_settings(args),
        parameters=dict(args.param),
        common=common_method_params(args),
        token=args.token,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
        device=args.device or "cpu",
    )
    if current().is_main:
        print(result.leaderboard)
        print(f"\nReport, leaderboard and plots in {result.output}")
        if result.failed:
            print(
                f"hf-fusion: {len(result.failed)} configuration(s) failed: {', '.join(result.failed)}; their errors "
                f"are in {result.output / 'runs'}, and a rerun runs them again.",
                file=sys.stderr,
            )
    return 1 if result.failed else 0
