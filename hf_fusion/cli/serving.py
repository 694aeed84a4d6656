"""`hf-fusion space`: the Gradio app on this machine."""

from __future__ import annotations

import argparse
from typing import Any

from hf_fusion.cli.arguments import add_common, non_negative_int, positive_float, positive_int, size_argument


def register(sub: Any) -> None:
    """Adds this module's commands to the ``hf-fusion`` parser."""
    space = sub.add_parser("space", help="start the Gradio app (merge and compare in the browser) on this machine")
    space.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    space.add_argument("--port", type=positive_int, default=7860, help="port (default: 7860)")
    space.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="jobs run at once (default: HF_FUSION_SPACE_CONCURRENCY or 1)",
    )
    space.add_argument(
        "--max-waiting",
        type=non_negative_int,
        default=None,
        help="jobs that may wait for a slot; more are refused at once (default: HF_FUSION_SPACE_MAX_WAITING or 16)",
    )
    space.add_argument(
        "--idle-seconds",
        type=positive_float,
        default=None,
        help="a session's files are removed after this long without a request (default: "
        "HF_FUSION_SPACE_IDLE_SECONDS or 900)",
    )
    space.add_argument(
        "--disk-budget",
        type=size_argument,
        default=None,
        metavar="SIZE",
        help="disk for all sessions' files; idle sessions are evicted to stay under it (default: "
        "HF_FUSION_SPACE_DISK_BUDGET, or half the free space, at most 20GB)",
    )
    space.add_argument(
        "--no-local-paths", action="store_true", help="refuse local folders as models, as on a shared Space"
    )
    add_common(space)
    space.set_defaults(run=cmd_space)


def cmd_space(args: argparse.Namespace) -> int:
    import importlib.util

    from hf_fusion.errors import FusionError

    if importlib.util.find_spec("gradio") is None:
        raise FusionError(
            'the Space needs gradio, which is not installed: pip install -c constraints.txt ".[space]" '
            "from a checkout of hf-fusion."
        )
    from dataclasses import replace

    from hf_fusion.space import launch
    from hf_fusion.space.app import SpaceLimits, default_root

    limits = SpaceLimits.from_environment(default_root(), args.concurrency)
    flags = {"waiting": args.max_waiting, "idle_seconds": args.idle_seconds, "disk_budget": args.disk_budget}
    limits = replace(limits, **{k: v for k, v in flags.items() if v is not None})
    launch(host=args.host, port=args.port, limits=limits, allow_local_paths=False if args.no_local_paths else None)
    return 0
