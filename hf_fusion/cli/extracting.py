"""`hf-fusion extract-lora`: a fine-tuned or merged model's difference from its base, as a peft LoRA adapter."""

from __future__ import annotations

import argparse
from typing import Any

from hf_fusion.cli.arguments import add_common, add_push_options, positive_int, print_push, push_target, repo_id


def fraction(text: str) -> float:
    """A share in (0, 1]: the energy ``--rank-threshold`` keeps."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def register(sub: Any) -> None:
    """Adds this module's commands to the ``hf-fusion`` parser."""
    extract = sub.add_parser(
        "extract-lora",
        help="turn a fine-tune or a merge into a LoRA adapter of its base (peft format)",
        description="Factorises each linear layer's difference from the base by truncated SVD and writes a peft "
        "LoRA adapter folder (adapter_model.safetensors, adapter_config.json, README.md, and extraction.json with "
        "the energy kept per module). Other changed modules (norms, heads) are saved whole (modules_to_save).",
    )
    extract.add_argument("model", metavar="MODEL", help="the fine-tuned or merged model: a local folder or Hub repo id")
    extract.add_argument("--base", required=True, metavar="BASE", help="its base model: a local folder or Hub repo id")
    extract.add_argument("--rank", required=True, type=positive_int, metavar="R", help="LoRA rank (the most kept)")
    extract.add_argument("--output", required=True, metavar="FOLDER", help="where to write the adapter")
    extract.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default), cuda, cuda:N")
    extract.add_argument(
        "--rank-threshold",
        type=fraction,
        metavar="SHARE",
        help="per module, the smallest rank keeping this share of the squared singular values (e.g. 0.99), "
        "at most --rank",
    )
    extract.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="GLOB",
        help="tensor or module name globs left as in the base (e.g. 'lm_head' '*.layer.0.*')",
    )
    extract.add_argument(
        "--embeddings", action="store_true", help="factorise embedding matrices too (else saved whole if changed)"
    )
    extract.add_argument(
        "--push", metavar="REPO", type=repo_id, help="push the adapter to this Hub repo (org/name or name)"
    )
    extract.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder, and files on an existing Hub branch with --push",
    )
    add_push_options(extract)
    add_common(extract)
    extract.set_defaults(run=cmd_extract_lora)


def cmd_extract_lora(args: argparse.Namespace) -> int:

    from hf_fusion.adapters import extract_lora

    target = push_target(args, args.push)
    if target is not None:
        from hf_fusion.hub.push import check_target

        target = check_target(target, args.token)  # before any tensor is read
    from pathlib import Path

    from hf_fusion.output import check_output_folder
    from hf_fusion.runtime import LOCAL

    check_output_folder(Path(args.output), overwrite=args.overwrite)  # before any download
    device = LOCAL.device(args.device)  # a GPU that is not there, too
    model, base = (_local_folder(path, args) for path in (args.model, args.base))
    result = extract_lora(
        model,
        base,
        rank=args.rank,
        output=args.output,
        rank_threshold=args.rank_threshold,
        device=device,
        exclude=args.exclude,
        embeddings=args.embeddings,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
        card_load_path=target.repo_id if target is not None else None,
        base_name=_name(args.base),
        model_name=_name(args.model),
    )
    print(result.summary())
    if target is not None:
        from hf_fusion.hub.push import push_folder

        pushed = push_folder(
            result.output,
            target,
            token=args.token,
            default_message=f"LoRA adapter extracted from {args.model} (hf-fusion)",
        )
        print_push(pushed)
    return 0


def _local_folder(path: str, args: argparse.Namespace) -> str:
    """A local folder as it is; a Hub repo id (``org/name@revision``) resolved and downloaded into the cache, with
    the same checks as merge inputs (safetensors only)."""
    from pathlib import Path

    if Path(path).expanduser().is_dir():
        return path
    from hf_fusion.recipe import ModelRef
    from hf_fusion.sources import fetch, resolve

    source = resolve(ModelRef.parse(path), token=args.token, allow_pickle=False)
    return str(fetch(source, token=args.token, show_progress=not args.quiet).folder)


def _name(path: str) -> str:
    """How the adapter names a model: a local folder as given, a Hub id without its ``@revision`` (peft and the
    Hub's ``base_model`` take a repo id)."""
    from pathlib import Path

    from hf_fusion.recipe import ModelRef

    return path if Path(path).expanduser().is_dir() else ModelRef.parse(path).path
