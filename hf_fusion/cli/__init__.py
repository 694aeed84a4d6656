"""The ``hf-fusion`` command line: one module per command group over shared argument types. Heavy modules (torch,
transformers) are imported only by the commands that run."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from hf_fusion.cli import extracting, fusing, images, listing, scoring, serving
from hf_fusion.cli.listing import methods_markdown
from hf_fusion.version import __version__

log = logging.getLogger("hf_fusion")

__all__ = ["build_parser", "main", "methods_markdown"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fusion",
        description="Fuse fine-tuned models (ensemble, merge, mix) into one that loads with from_pretrained.",
    )
    parser.add_argument("--version", action="version", version=f"hf-fusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (listing, fusing, extracting, scoring, images, serving):
        group.register(sub)
    return parser


def configure_logging(args: argparse.Namespace) -> None:
    """hf-fusion's own messages at INFO (DEBUG with --verbose); other libraries stay at WARNING, so their debug
    output (HTTP internals included) never reaches the terminal."""
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    )
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _main_process_speaks(args: argparse.Namespace) -> None:
    """Under several processes only the main one prints results, bars and messages; the others stay silent but
    for errors (they still reach stderr)."""
    from hf_fusion.runtime import current, launched_processes

    if launched_processes() > 1 and not current().is_main:
        args.quiet = True
        os.environ.update(HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def _finish() -> None:
    """A launched run whose command ended on every process leaves its process group together."""
    from hf_fusion.runtime import current, launched_processes

    if launched_processes() > 1:
        current().finish()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _main_process_speaks(args)
    configure_logging(args)
    from hf_fusion.allocator import keep_freed_memory

    keep_freed_memory()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from hf_fusion.errors import FusionError

    try:
        code = int(args.run(args))
        _finish()
        return code
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
