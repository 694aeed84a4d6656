"""What a visitor of a shared Space may name: catalog pools, Hub repo ids, and the models that ship with hf-fusion.

A public Space treats every request as hostile. This is the one check that decides what a request may point at,
run on the raw recipe before anything reads a file or creates a folder: a pool file, a local folder, a ``builtin:``
name that leads out of the package, or any other form is refused with a message that repeats only what the visitor
sent (shortened), never the content or the location of a server file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_fusion.catalog import BUILTIN_PREFIX, PoolError, pool_names, resolve_builtin
from hf_fusion.errors import RecipeError
from hf_fusion.recipe import path_exists

ACCEPTED = "a Hub repo id (org/name or org/name@revision), a catalog pool, or a built-in model (builtin:...)"


def shown(value: Any, limit: int = 80) -> str:
    """The visitor's own input, quoted and shortened, for an error message."""
    text = repr(value) if not isinstance(value, str) else repr(value.strip())
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_pool_name(name: Any) -> str:
    """A catalog pool's name; pool files and anything else are refused without being opened."""
    if not isinstance(name, str) or name.strip() not in pool_names():
        raise RecipeError(
            f"pool {shown(name)} is not a catalog pool; this Space accepts only the catalog's pools "
            "(run `hf-fusion pools` for the list), not pool files."
        )
    return name.strip()


def check_model_reference(value: Any) -> None:
    """A Hub repo id (with an optional revision) or a built-in model confined to the package; nothing on disk."""
    if isinstance(value, Mapping):
        value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"model {shown(value)} cannot be used on this Space: name {ACCEPTED}.")
    text = value.strip()
    if text.startswith(BUILTIN_PREFIX):
        try:
            resolve_builtin(text.partition("@")[0])
        except PoolError as err:
            raise RecipeError(str(err)) from None
        return
    repo_id, at, revision = text.rpartition("@") if "@" in text else (text, "", "")
    try:
        if at and not revision.strip():
            raise HFValidationError("empty revision")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise RecipeError(f"model {shown(value)} cannot be used on this Space: name {ACCEPTED}.") from None
    if path_exists(repo_id):  # the pipeline would read it from the server's disk instead of the Hub
        raise RecipeError(f"model {shown(value)} cannot be used on this Space: name {ACCEPTED}.")


def check_visitor_recipe(data: Mapping[str, Any]) -> None:
    """Refuses a recipe that names anything but catalog pools, Hub repo ids and built-in models."""
    if data.get("pool") is not None:
        check_pool_name(data["pool"])
    models = data.get("models")
    if isinstance(models, (str, Mapping)):
        models = [models]
    for model in models or []:
        check_model_reference(model)
    if data.get("base") is not None:
        check_model_reference(data["base"])
