"""Deploy the hf-fusion Space from a checkout: ``spaces/`` plus the ``hf_fusion`` package, in one commit.

    python scripts/deploy_space.py you/hf-fusion [--private] [--token T]

The Space installs ``spaces/requirements.txt`` (the package's own dependencies) and runs ``app.py``, which imports
the ``hf_fusion`` folder uploaded beside it, so the Space runs this checkout's code and needs no release on PyPI.
The model card templates are uploaded with the package, under ``hf_fusion/model_cards/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

ROOT = Path(__file__).resolve().parents[1]
SKIP_PARTS = {"__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def space_files(root: Path = ROOT) -> dict[str, Path]:
    """path in the Space repo -> file on disk."""
    files: dict[str, Path] = {}

    def add_tree(folder: Path, prefix: str) -> None:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not SKIP_PARTS & set(path.parts) and path.suffix not in SKIP_SUFFIXES:
                files[f"{prefix}{path.relative_to(folder).as_posix()}"] = path

    add_tree(root / "spaces", "")
    add_tree(root / "hf_fusion", "hf_fusion/")
    return {k: v for k, v in files.items() if not k.startswith("screenshots/")}


def deploy(repo_id: str, *, private: bool = False, token: str | None = None, root: Path = ROOT) -> str:
    from hf_fusion.hub.auth import require_token
    from hf_fusion.hub.errors import hub_errors

    token = require_token(token, "deploying the Space")
    api = HfApi()
    with hub_errors(repo_id, None, "deploy the Space"):
        url = api.create_repo(
            repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True, token=token
        )
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in space_files(root).items()
        ]
        api.create_commit(
            url.repo_id, operations, commit_message="Deploy the hf-fusion Space", repo_type="space", token=token
        )
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_id", help="the Space: name or namespace/name")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    args = parser.parse_args(argv)
    from hf_fusion.errors import FusionError

    try:
        print(f"Deployed to {deploy(args.repo_id, private=args.private, token=args.token)}")
    except FusionError as err:
        print(f"deploy_space: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
