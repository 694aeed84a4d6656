"""Argument types and option groups the commands share: strict values (refused by the parser before anything runs)
and the flags several commands take."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any


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


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step (DEBUG level)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only errors")


def method_list(text: str) -> list[str]:
    """Comma-separated methods; commas inside brackets belong to a method's parameters."""
    return [t.strip() for t in re.split(r",(?![^\[]*\])", text) if t.strip()]


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


COMMON_METHOD_FLAGS = ("calibration_samples", "steps", "lr", "seed")


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit", type=positive_int, metavar="N", help="score N examples per task (a fixed, seeded subset)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="examples per forward pass, for evaluation (default 32) and data-driven methods",
    )
    parser.add_argument(
        "--eval-device", metavar="DEVICE", help="device for evaluation (default: --device where given, else cpu)"
    )
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="autocast dtype for evaluation and test-time adaptation (default no: the weights' own precision)",
    )
    parser.add_argument(
        "--device-map",
        choices=["auto", "balanced", "balanced_low_0", "sequential"],
        help="place each evaluated model across GPUs, CPU and disk with accelerate (models larger than one GPU)",
    )
    parser.add_argument(
        "--max-memory",
        type=max_memory_argument,
        metavar="0:40GiB,cpu:200GiB",
        help="with --device-map: the most each device may hold (GPU index or cpu); the rest is offloaded to disk",
    )
    parser.add_argument(
        "--no-score-cache",
        action="store_true",
        help="score every model again instead of reusing cached scores of the same weights and settings",
    )
    parser.add_argument(
        "--metrics",
        choices=["auto", "hub", "bundled"],
        default="auto",
        help="metric modules from the Hub, or bundled ones (auto: bundled when HF_HUB_OFFLINE=1)",
    )


def add_method_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data-driven methods (Fisher, RegMean, AdaMerging, WEMoE)")
    group.add_argument("--calibration-samples", type=positive_int, metavar="N", help="examples per task for statistics")
    group.add_argument("--steps", type=non_negative_int, metavar="N", help="test-time adaptation steps")
    group.add_argument("--lr", type=finite_float, metavar="LR", help="test-time adaptation learning rate")
    group.add_argument("--seed", type=int, metavar="N", help="seed for sampling and initialisation")


def common_method_params(args: argparse.Namespace) -> dict[str, Any]:
    """The common method flags that were given (``batch_size`` too, for methods that take one)."""
    return {k: getattr(args, k) for k in (*COMMON_METHOD_FLAGS, "batch_size") if getattr(args, k, None) is not None}


def max_memory_argument(text: str) -> dict[int | str, int]:
    """``DEVICE:SIZE,...`` (``0:40GiB,cpu:200GiB``): GPU indices or ``cpu``, each with a size."""
    from hf_fusion.sizes import parse_size

    limits: dict[int | str, int] = {}
    for item in comma_list(text):
        device, sep, size = item.partition(":")
        device = device.strip().lower()
        if not sep or not (device == "cpu" or device.isdigit()):
            raise argparse.ArgumentTypeError(f"takes DEVICE:SIZE items (GPU index or cpu), got {item!r}")
        key: int | str = int(device) if device.isdigit() else device
        if key in limits:
            raise argparse.ArgumentTypeError(f"names {device} twice")
        try:
            limits[key] = parse_size(size.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    if not limits:
        raise argparse.ArgumentTypeError("names no device")
    return limits


def eval_settings(args: argparse.Namespace) -> Any:
    """Evaluation settings from the flags, checked before anything is read: evaluation runs on ``--eval-device``,
    else on ``--device``, or where ``--device-map`` places it."""
    from hf_fusion.runtime import check_mixed_precision, current, launched_processes
    from hf_fusion.tasks.base import EvalSettings, compute_device

    device = args.eval_device or getattr(args, "device", None) or "cpu"
    if args.max_memory and not args.device_map:
        raise SystemExit("hf-fusion: --max-memory needs --device-map (auto, balanced or sequential)")
    if args.device_map:
        device = _placement_device(args, device, launched_processes())
    else:
        device = current().device(device)  # a GPU that is not there is refused before any download
    settings = EvalSettings(
        batch_size=args.batch_size or 32,
        device=device,
        limit=args.limit,
        metrics=args.metrics,
        mixed_precision=args.mixed_precision,
        device_map=args.device_map,
        max_memory=args.max_memory,
        score_cache=not args.no_score_cache,
    )
    check_mixed_precision(settings.mixed_precision, compute_device(settings))
    return settings


def _placement_device(args: argparse.Namespace, device: str, processes: int) -> str:
    """With ``--device-map`` accelerate places each layer, models are built and inputs start on the CPU; the map is
    one process's (it spreads one model over every GPU it sees)."""
    if processes > 1:
        raise SystemExit(
            "hf-fusion: --device-map spreads each model over all GPUs from one process; launch one process with it "
            f"(this run has {processes})"
        )
    explicit = args.eval_device or (getattr(args, "device", None) if args.command == "evaluate" else None)
    if explicit not in (None, "cpu"):
        raise SystemExit(f"hf-fusion: --device-map places models itself; leave out the device {explicit!r}")
    gpus = [key for key in (args.max_memory or {}) if isinstance(key, int)]
    if gpus:
        import torch

        count = torch.cuda.device_count()
        if max(gpus) >= count:
            raise SystemExit(f"hf-fusion: --max-memory names GPU {max(gpus)}, and this machine has {count}")
    return "cpu"


def add_push_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--revision", metavar="BRANCH", help="push to this branch (created from main if needed)")
    where.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="default: 'Fuse N models with METHOD (hf-fusion)'")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN, then `hf auth login`); never printed")


def push_target(args: argparse.Namespace, repo: str | None) -> Any:
    if not repo:
        return None
    from hf_fusion.hub.push import PushTarget

    return PushTarget(
        repo,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        overwrite=args.overwrite,
        commit_message=args.commit_message,
    )


def print_push(result: Any) -> None:
    if result.pr_url:
        print(f"Opened a pull request on {result.repo_id}: {result.pr_url}")
    else:
        print(f"Pushed to {result.url} ({result.commit_url})")


def add_tokenizer_options(parser: argparse.ArgumentParser) -> None:
    """``--tokenizer`` and ``--chat-template`` of ``merge``: the recipe fields of the same names."""
    parser.add_argument(
        "--tokenizer",
        metavar="base|union|MODEL",
        help="the output's vocabulary: the base's, the union of every input's, or a model's (embeddings re-indexed)",
    )
    parser.add_argument(
        "--chat-template",
        metavar="auto|MODEL|TEMPLATE",
        help="the output's chat template: the inputs' most common, a model's, or a literal Jinja template",
    )
