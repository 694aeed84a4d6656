"""`hf-fusion compare-images`: the same prompts and seeds through several diffusion models, as one labelled grid."""

from __future__ import annotations

import argparse
from typing import Any

from hf_fusion.cli.arguments import add_common, finite_float, non_negative_int, positive_int


def register(sub: Any) -> None:
    """Adds this module's commands to the ``hf-fusion`` parser."""
    compare = sub.add_parser(
        "compare-images",
        help="render the same prompts and seeds with several diffusion models: a labelled PNG grid and CLIP scores",
        description="Renders each prompt with each seed through every model (under the first model's scheduler), "
        "writes a PNG grid (a column per model, a row per prompt and seed), a JSON record beside it, and prints each "
        "model's CLIP score.",
    )
    compare.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="diffusers pipeline folders or Hub repo ids (org/name[@revision]); the first is the reference whose "
        "scheduler every model uses",
    )
    compare.add_argument(
        "--prompts", metavar="FILE", help="a UTF-8 text file, one prompt per line (blank lines skipped)"
    )
    compare.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="a prompt, repeatable (after those of --prompts)"
    )
    compare.add_argument(
        "--seed", action="append", type=non_negative_int, metavar="N", help="a seed, repeatable (default 0)"
    )
    compare.add_argument("--output", required=True, metavar="FILE.png", help="the grid; its JSON record goes beside it")
    compare.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    compare.add_argument("--guidance-scale", type=finite_float, default=7.5, help="classifier-free guidance (7.5)")
    compare.add_argument("--height", type=positive_int, default=512, help="picture height, a multiple of 8 (512)")
    compare.add_argument("--width", type=positive_int, default=512, help="picture width, a multiple of 8 (512)")
    compare.add_argument(
        "--device", default="cpu", help="device for rendering and scoring: cpu (default), cuda, cuda:N"
    )
    compare.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="pipeline dtype (float32)"
    )
    clip = compare.add_mutually_exclusive_group()
    clip.add_argument(
        "--clip-model",
        metavar="FOLDER_OR_REPO",
        help="CLIP model for the scores (default openai/clip-vit-base-patch32, read from the cache when offline)",
    )
    clip.add_argument("--no-clip-score", action="store_true", help="only render; compute no CLIP score")
    compare.add_argument("--token", help="Hub token for private models")
    compare.add_argument("--overwrite", action="store_true", help="replace an existing grid and its JSON record")
    add_common(compare)
    compare.set_defaults(run=cmd_compare_images)


def cmd_compare_images(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_fusion.images.clip import DEFAULT_CLIP_MODEL
    from hf_fusion.images.comparison import check_output, compare_images, read_prompts
    from hf_fusion.images.render import RenderSettings

    output = Path(args.output)
    check_output(output, overwrite=args.overwrite)  # before any model loads
    prompts = [*(read_prompts(Path(args.prompts)) if args.prompts else []), *args.prompt]
    settings = RenderSettings(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        device=args.device,
        dtype=args.dtype,
    )
    comparison = compare_images(
        args.models,
        prompts,
        args.seed or [0],
        settings,
        clip_model=None if args.no_clip_score else args.clip_model or DEFAULT_CLIP_MODEL,
        token=args.token,
        show_progress=not args.quiet,
    )
    picture, record = comparison.save(output, overwrite=args.overwrite)
    if comparison.clip_scores is not None:
        print(scores_table(comparison.labels, comparison.clip_scores))
    if not args.quiet:
        print(f"\nWrote {picture} and {record}")
    return 0


def scores_table(labels: list[str], scores: dict[str, float]) -> str:
    """A Markdown table of each model's mean CLIP score, in column order (the first is the reference)."""
    lines = ["| model | CLIP score |", "|---|---:|"]
    lines += [f"| {label}{' (reference)' if i == 0 else ''} | {scores[label]:.2f} |" for i, label in enumerate(labels)]
    return "\n".join(lines)
