"""`hf-fusion merge`, `push` and `card`: make a fused model, send it to the Hub, (re)write its card."""

from __future__ import annotations

import argparse
from typing import Any

from hf_fusion.cli.arguments import (
    add_common,
    add_eval_options,
    add_method_data_options,
    add_push_options,
    add_tokenizer_options,
    comma_list,
    common_method_params,
    eval_settings,
    parse_param,
    positive_int,
    print_push,
    push_target,
    repo_id,
    size_argument,
)


def register(sub: Any) -> None:
    """Adds this module's commands to the ``hf-fusion`` parser."""
    merge = sub.add_parser(
        "merge",
        help="fuse models into an output folder",
        description="Fuse models with any registered method. Flags override the fields of --config.",
    )
    merge.add_argument("--config", metavar="RECIPE.yaml", help="recipe file (the output keeps a copy)")
    merge.add_argument(
        "--repo-ids",
        nargs="+",
        metavar="MODEL",
        help="models to fuse: Hub repo ids (org/name[@revision]) or local folders",
    )
    merge.add_argument("--base", metavar="MODEL", help="the pretrained model the others were fine-tuned from")
    merge.add_argument("--method", help="fusion method (see `hf-fusion methods`)")
    merge.add_argument(
        "--param",
        action="append",
        type=parse_param,
        default=[],
        metavar="NAME=VALUE",
        help="method parameter, repeatable (e.g. --param scaling_factor=0.3); a list of numbers is a gradient over "
        "the layers (--param 't=[0,0.5,1]')",
    )
    merge.add_argument(
        "--param-for",
        nargs=2,
        action="append",
        default=[],
        metavar=("FILTER", "NAME=VALUE"),
        help="a parameter's value for tensors whose name contains FILTER, repeatable, first match wins; other "
        "tensors take the --param value (e.g. --param-for self_attn 't=[0,0.5,1]')",
    )
    merge.add_argument("--output", metavar="FOLDER", help="where to write the fused model")
    merge.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16"],
        help="output dtype of floating-point tensors (default: as the reference model)",
    )
    merge.add_argument("--device", help="compute device: cpu (default), cuda, cuda:N")
    merge.add_argument(
        "--exclude",
        nargs="+",
        metavar="PATTERN",
        help="tensor-name globs copied unfused from the base (e.g. 'classifier.*')",
    )
    merge.add_argument(
        "--heads",
        nargs="+",
        metavar="PATTERN",
        help="tensor-name globs of per-task heads, left out: the output is the fused backbone",
    )
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder, and files on an existing Hub branch with --push",
    )
    merge.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load .bin/.pt pickle checkpoints (can run code; only for models you trust)",
    )
    merge.add_argument(
        "--allow-nonfinite",
        action="store_true",
        default=None,
        help="fuse tensors holding NaN or inf instead of refusing them (carried through to the output)",
    )
    merge.add_argument(
        "--clamp-overflow",
        action="store_true",
        default=None,
        help="clamp fused values beyond the output dtype's range instead of refusing them",
    )
    merge.add_argument(
        "--max-shard-size", type=size_argument, default=None, metavar="SIZE", help="largest output shard (default 5GB)"
    )
    add_tokenizer_options(merge)
    merge.add_argument(
        "--components",
        type=comma_list,
        metavar="C1,C2",
        help="diffusers pipelines: fuse only these components (unet,text_encoder...); the rest come from the base",
    )
    merge.add_argument(
        "--variant",
        metavar="NAME",
        help="diffusers pipelines: read the weights of this variant (fp16) where a component has them",
    )
    merge.add_argument(
        "--output-format",
        choices=["dense", "adapter"],
        help="dense model (default), or for a pool of LoRA adapters one peft LoRA adapter on the base",
    )
    merge.add_argument(
        "--rank",
        type=positive_int,
        metavar="R",
        help="adapter output: the rank of factorised (non-linear) merges, or a linear merge's exact adapter "
        "truncated to it (default: the adapters' largest rank, resp. exact)",
    )
    merge.add_argument("--pool", help="a catalog pool (see `hf-fusion pools`) or pool file: its base, experts, heads")
    merge.add_argument(
        "--tasks", type=comma_list, metavar="T1,T2", help="only these tasks (and their experts) of the pool"
    )
    merge.add_argument("--evaluate", action="store_true", help="score the fused model on the pool's tasks")
    add_eval_options(merge)
    add_method_data_options(merge)
    merge.add_argument(
        "--push", metavar="REPO", type=repo_id, help="push the fused model to this Hub repo (org/name or name)"
    )
    add_push_options(merge)
    add_common(merge)
    merge.set_defaults(run=cmd_merge)

    push = sub.add_parser("push", help="push a fused model folder to the Hub (writes its card if missing)")
    push.add_argument("folder", help="a folder written by `hf-fusion merge`")
    push.add_argument("repo", type=repo_id, help="target repo (org/name, or name under your account)")
    push.add_argument("--overwrite", action="store_true", help="commit over files already on the target branch")
    add_push_options(push)
    add_common(push)
    push.set_defaults(run=cmd_push)

    card = sub.add_parser("card", help="(re)write a fused model's README.md from its recipe and evaluation report")
    card.add_argument("folder", help="a folder written by `hf-fusion merge`")
    card.add_argument("--repo-id", help="the repo the card's usage snippet loads (default: the folder)")
    add_common(card)
    card.set_defaults(run=cmd_card)


def cmd_merge(args: argparse.Namespace) -> int:
    from hf_fusion.fusion import merge

    if not args.config and not args.repo_ids and not args.pool:
        raise SystemExit("hf-fusion merge: give --repo-ids or --pool (and --method, --output), or --config RECIPE.yaml")
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
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        components=args.components,
        variant=args.variant,
        output_format=args.output_format,
        rank=args.rank,
        evaluate=eval_settings(args) if args.evaluate else False,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
        clamp_overflow=args.clamp_overflow,
        push=push_target(args, args.push),
        show_progress=not args.quiet,
        mixed_precision=args.mixed_precision,
        **_merge_keywords(args),
    )
    _print_merge(result, quiet=args.quiet)
    return 0


def _merge_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The method's parameters (``--param`` over the common method flags), the shard size and the token."""
    kwargs: dict[str, Any] = dict(args.param)
    kwargs.update(filtered_params(args.param_for, kwargs, args.config))
    common = common_method_params(args)
    if common:
        from pathlib import Path

        from hf_fusion.fusion.validate import recipe_file_fields
        from hf_fusion.registry import flag_parameters, get_method

        method = args.method or (recipe_file_fields(Path(args.config))["method"] if args.config else None)
        if method is None:
            raise SystemExit("hf-fusion merge: --method is needed (or --config RECIPE.yaml that names one)")
        kwargs = {**flag_parameters([get_method(method)], common)[0], **kwargs}
    if args.max_shard_size is not None:
        kwargs["max_shard_bytes"] = args.max_shard_size
    if args.token:
        kwargs["token"] = args.token
    return kwargs


def filtered_params(pairs: list[list[str]], plain: dict[str, Any], config: str | None) -> dict[str, Any]:
    """``--param-for FILTER NAME=VALUE`` as conditions, in the order given, ending with the parameter's plain value
    (from ``--param`` or the recipe file) for the tensors no filter matches."""
    conditions: dict[str, list[dict[str, Any]]] = {}
    for text_filter, assignment in pairs:
        if not text_filter.strip():
            raise SystemExit("hf-fusion merge: --param-for needs a non-empty FILTER (a part of tensor names)")
        try:
            name, value = parse_param(assignment)
        except argparse.ArgumentTypeError as err:
            raise SystemExit(f"hf-fusion merge: --param-for {text_filter}: {err}") from None
        conditions.setdefault(name, []).append({"filter": text_filter, "value": value})
    if not conditions:
        return {}
    from pathlib import Path

    from hf_fusion.fusion.validate import recipe_file_fields

    recorded = recipe_file_fields(Path(config))["parameters"] if config else {}
    for name, items in conditions.items():
        fallback = plain.get(name, recorded.get(name))
        if fallback is not None:
            items.append({"value": fallback})
    return conditions


def _print_merge(result: Any, *, quiet: bool) -> None:
    if not quiet:
        n = len(result.recipe.models)
        print(
            f"Fused {n} model{'s' if n != 1 else ''} with {result.recipe.method} into {result.output} "
            f"({result.fused_tensors} tensors fused, {result.copied_tensors} copied, "
            f"{result.output_bytes / 1e6:.1f} MB) in {result.seconds:.1f} s"
        )
    if result.evaluation is not None:
        from hf_fusion.reports.leaderboard import to_markdown

        if not quiet:
            tasks = len(result.evaluation.results)
            print(f"Scored on {tasks} task{'s' if tasks != 1 else ''} in {result.evaluation_seconds:.1f} s")
        print(to_markdown(result.evaluation))
    if result.push is not None:
        print_push(result.push)


def cmd_push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_fusion.hub.push import push_merged_folder

    print_push(push_merged_folder(Path(args.folder), push_target(args, args.repo), token=args.token))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_fusion.cards import CARD_FILENAME, write_card

    existed = (Path(args.folder) / CARD_FILENAME).is_file()
    path = write_card(Path(args.folder), repo_id=args.repo_id)
    if not args.quiet:
        print(f"{'Rewrote' if existed else 'Wrote'} {path}")
    return 0
