"""Push a fused model folder: one commit with weights, config, tokenizer, recipe and card together.

The target is checked before any fusion work (token, namespace, existing files), so a merge never runs only to be
refused at the end; an existing branch with files is only committed over with ``overwrite``.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants

from hf_fusion.errors import FusionError
from hf_fusion.hub.auth import require_token
from hf_fusion.hub.errors import HubAccessError, PushError, hub_errors
from hf_fusion.model_files import output_file_patterns
from hf_fusion.recipe import RECIPE_FILENAME, Recipe

log = logging.getLogger(__name__)

KEEP_ON_OVERWRITE = {".gitattributes"}


@dataclass(frozen=True)
class PushTarget:
    """Where a fused model goes on the Hub."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    overwrite: bool = False
    commit_message: str | None = None

    @property
    def branch(self) -> str:
        return self.revision or constants.DEFAULT_REVISION


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    url: str
    commit_url: str
    pr_url: str | None


def _qualified(repo_id: str, user: str) -> str:
    return repo_id if "/" in repo_id else f"{user}/{repo_id}"


def check_target(target: PushTarget, token: str | None) -> PushTarget:
    """Checks the token, the namespace and existing files; returns the target with a fully qualified repo id."""
    resolved = require_token(token, "pushing")
    api = HfApi()
    with hub_errors(target.repo_id, target.revision, "check the push target"):
        who = api.whoami(token=resolved)
        user = who["name"]
        orgs = {o.get("name") for o in who.get("orgs") or []}
        repo_id = _qualified(target.repo_id, user)
        namespace = repo_id.split("/")[0]
        if namespace != user and namespace not in orgs:
            raise PushError(f"the token belongs to {user!r}, who cannot create repos under {namespace!r}.")
        if not api.repo_exists(repo_id, token=resolved):
            return PushTarget(
                repo_id, target.private, target.revision, target.create_pr, target.overwrite, target.commit_message
            )
        refs = api.list_repo_refs(repo_id, token=resolved)
        branches = {b.name for b in refs.branches}
        if target.branch in branches and not target.create_pr and not target.overwrite:
            existing = set(api.list_repo_files(repo_id, revision=target.branch, token=resolved)) - KEEP_ON_OVERWRITE
            if existing:
                raise PushError(
                    f"{repo_id} already has {len(existing)} file(s) on branch {target.branch!r}; pass --overwrite to "
                    "replace them (the Hub keeps the history), --create-pr to propose the change, or --revision for "
                    "another branch."
                )
        if target.create_pr and target.branch not in branches:
            raise PushError(f"cannot open a pull request against {repo_id}@{target.branch}: no such branch.")
    return PushTarget(
        repo_id, target.private, target.revision, target.create_pr, target.overwrite, target.commit_message
    )


def push_folder(folder: Path, target: PushTarget, *, token: str | None, default_message: str) -> PushResult:
    """Creates the repo (and branch) if needed and uploads ``folder`` in a single commit."""
    resolved = require_token(token, "pushing")
    api = HfApi()
    retry = f"hf-fusion push {folder} {target.repo_id}" + (f" --revision {target.revision}" if target.revision else "")
    try:
        with hub_errors(target.repo_id, target.revision, "push to"):
            repo_url = api.create_repo(target.repo_id, private=target.private, exist_ok=True, token=resolved)
            if target.revision and not target.create_pr:
                api.create_branch(target.repo_id, branch=target.revision, exist_ok=True, token=resolved)
            delete = ["*"] if target.overwrite and not target.create_pr else None
            patterns = output_file_patterns()
            _log_left_out(folder, patterns)
            info = api.upload_folder(
                repo_id=target.repo_id,
                folder_path=folder,
                revision=target.revision,
                commit_message=target.commit_message or default_message,
                create_pr=target.create_pr,
                delete_patterns=delete,
                allow_patterns=patterns,
                ignore_patterns=[".*", "*/.*"],
                token=resolved,
            )
    except HubAccessError as err:
        raise PushError(f"{err} The fused model is intact in {folder}; retry with: {retry}") from None
    return PushResult(target.repo_id, str(repo_url), info.commit_url, info.pr_url)


def _log_left_out(folder: Path, patterns: list[str]) -> None:
    """Names the files of ``folder`` that are not pushed: only what hf-fusion writes into an output goes up."""
    left = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    left = [
        name
        for name in left
        if not name.startswith(".")
        and "/." not in name
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    ]
    if left:
        log.warning("not pushed (not a file hf-fusion writes into an output): %s", ", ".join(left[:20]))


def push_message(recipe: Recipe) -> str:
    """The commit message of a fused model's push."""
    return f"Fuse {len(recipe.models)} models with {recipe.method} (hf-fusion)"


def push_merged_folder(
    folder: Path, target: PushTarget, *, token: str | None, rewrite_card: bool = False
) -> PushResult:
    """Pushes a folder written by ``hf-fusion merge``: the target is checked first, the card is written (naming the
    repo) when missing or when ``rewrite_card``, then everything goes up in one commit."""
    from hf_fusion.cards import CARD_FILENAME, write_card

    if not (folder / RECIPE_FILENAME).is_file():
        raise FusionError(f"{folder} is not a folder written by hf-fusion merge (no {RECIPE_FILENAME}).")
    target = check_target(target, token)
    if rewrite_card or not (folder / CARD_FILENAME).is_file():
        write_card(folder, repo_id=target.repo_id)
    recipe = Recipe.from_yaml(folder / RECIPE_FILENAME)
    return push_folder(folder, target, token=token, default_message=push_message(recipe))
