"""A public Space (no local paths) as a hostile visitor tries it, over HTTP with gradio_client.

Each request names something on the server's disk through a door the recipe offers (``builtin:``, ``base:``, a pool
file, a folder, a relative path that looks like a repo id, the Compare tab's pool) and must be refused before
anything is read or created, with a message that never carries the server file's content.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError
from public_server import serve_public

from hf_fusion.catalog import PoolError, resolve_builtin
from hf_fusion.errors import RecipeError
from hf_fusion.space.visitor import check_model_reference, check_pool_name, check_visitor_recipe

SECRET = "SECRET-7f3a9c-do-not-serve"


@pytest.fixture(scope="module")
def server_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder on the 'server' that looks like a model and holds secrets, and a pool file that is a secret."""
    folder = tmp_path_factory.mktemp("server-private")
    (folder / "config.json").write_text(f'{{"model_type": "bert", "note": "{SECRET}"}}')
    (folder / "credentials.json").write_text(SECRET)
    (folder / "pool.yaml").write_text(f"{SECRET}: [unclosed\n")
    (folder / "other.yaml").write_text(yaml.safe_dump({"name": SECRET, "base": "x", "tasks": {}}))
    return folder


@pytest.fixture(scope="module")
def public_space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """The app as a public Space runs it (only Hub ids, catalog pools, built-in models), with its own gradio cache."""
    from hf_fusion.space import SpaceLimits

    cache, sessions = tmp_path_factory.mktemp("gradio-cache"), tmp_path_factory.mktemp("sessions")
    with serve_public(sessions, cache, SpaceLimits(running=1, waiting=2, idle_seconds=600, disk_budget=10**10)) as url:
        yield url, sessions, cache


def _created(*folders: Path) -> list[Path]:
    """Every file or folder the app made where it keeps sessions and served files."""
    return [p for folder in folders for p in folder.rglob("*")]


def _recipe(**fields: object) -> str:
    return yaml.safe_dump(fields, sort_keys=False)


def hostile_recipes(private: Path) -> list[tuple[str, str]]:
    outside = os.path.relpath(private, Path.cwd())
    return [
        (_recipe(method="simple_average", models=[f"builtin:{private}"]), "not a built-in model name"),
        (
            _recipe(method="simple_average", models=["builtin:../../../../../../" + str(private).lstrip("/")]),
            "not a built-in model name",
        ),
        (_recipe(method="simple_average", models=["builtin:minilm-text3/../../../../etc"]), "not a built-in model"),
        (
            _recipe(method="task_arithmetic", models=["builtin:minilm-text3/bbc_news"], base=f"builtin:{private}"),
            "not a built-in model name",
        ),
        (
            _recipe(method="task_arithmetic", models=["builtin:minilm-text3/bbc_news"], base=str(private)),
            "cannot be used on this Space",
        ),
        (_recipe(method="simple_average", models=[str(private), "org/model"]), "cannot be used on this Space"),
        (_recipe(method="simple_average", models=[{"path": str(private)}]), "cannot be used on this Space"),
        (_recipe(method="simple_average", models=["~/.cache/huggingface"]), "cannot be used on this Space"),
        (_recipe(method="simple_average", models=[outside]), "cannot be used on this Space"),
        (_recipe(method="simple_average", models=["tests/conftest.py"]), "cannot be used on this Space"),
        (_recipe(method="ties_merging", pool=str(private / "pool.yaml")), "not a catalog pool"),
        (_recipe(method="ties_merging", pool=str(private / "other.yaml")), "not a catalog pool"),
        (_recipe(method="ties_merging", pool="/etc/passwd"), "not a catalog pool"),
        (
            _recipe(method="ties_merging", pool=str(private / "pool.yaml"), models=["org/a", "org/b"], base="org/c"),
            "not a catalog pool",
        ),
    ]


def test_hostile_recipes_are_refused_without_echo_and_create_nothing(
    public_space, server_files: Path, tmp_path: Path
) -> None:
    url, sessions, cache = public_space
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    for recipe, message in hostile_recipes(server_files):
        with pytest.raises(AppError) as caught:
            client.predict(recipe, False, 0, api_name="/merge")
        text = str(caught.value)
        assert message in text, (recipe, text)
        assert SECRET not in text and "credentials" not in text
    assert _created(sessions, cache / "hf-fusion") == []  # refused requests made no folder, no file


def test_the_compare_tab_takes_only_catalog_pools(public_space, server_files: Path, tmp_path: Path) -> None:
    url, sessions, cache = public_space
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    for pool in (str(server_files / "pool.yaml"), "/etc/passwd", "../../etc/passwd"):
        with pytest.raises(AppError) as caught:
            client.predict(pool, ["task_arithmetic"], "", 4, api_name="/compare")
        assert SECRET not in str(caught.value) and "root:" not in str(caught.value)
    assert _created(sessions, cache / "hf-fusion") == []


def test_the_builtin_pool_and_its_references_still_merge(public_space, tmp_path: Path) -> None:
    url, sessions, cache = public_space
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    recipe = _recipe(
        method="task_arithmetic",
        pool="minilm-text3",
        models=["builtin:minilm-text3/bbc_news", "builtin:minilm_text3/sms_spam"],
        base="builtin:all-MiniLM-L6-v2",
        heads=["classifier.*"],
        parameters={"scaling_factor": 0.3},
    )
    status, *_ = client.predict(recipe, False, 0, api_name="/merge")
    assert "Merged 2 models" in status


def test_builtin_names_never_leave_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hf_fusion.catalog as catalog

    root = tmp_path / "builtin"
    (root / "pool" / "expert").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "pool" / "escape").symlink_to(outside)  # a link inside the package that points out of it
    monkeypatch.setattr(catalog, "builtin_root", lambda: root.resolve())
    assert Path(resolve_builtin("builtin:pool/expert")) == (root / "pool" / "expert").resolve()
    for name in (
        "builtin:pool/escape",
        f"builtin:{outside}",
        "builtin:pool/../../outside",
        "builtin:pool",
        "builtin:pool/expert/..",
        "builtin:",
        "builtin:pool/expert/x",
        "builtin:.hidden/x",
    ):
        with pytest.raises(PoolError, match="not a built-in model name"):
            resolve_builtin(name)
        with pytest.raises(RecipeError):
            check_model_reference(name)
        if str(outside) not in name:
            assert str(outside) not in _message(name)  # where a link leads is not told


def _message(name: str) -> str:
    try:
        resolve_builtin(name)
    except PoolError as err:
        return str(err)
    return ""


def test_what_a_visitor_may_name() -> None:
    for accepted in (
        "org/model",
        "model",
        "org/model@v1.0",
        "org/model@refs/pr/1",
        "builtin:minilm-text3/bbc_news",
        {"path": "org/model", "revision": "main"},
    ):
        check_model_reference(accepted)
    for refused in (
        "",
        "  ",
        "/etc",
        "./x",
        "../x",
        "~/x",
        "org/../x",
        "org//x",
        "a/b/c",
        "org/model@",
        7,
        None,
        "x" * 300,
        "C:\\Windows",
        "org/mo del",
    ):
        with pytest.raises(RecipeError, match="cannot be used on this Space"):
            check_model_reference(refused)
    assert check_pool_name(" minilm-text3 ") == "minilm-text3"
    for pool in ("/etc/passwd", "minilm-text3.yaml", "", None, ["minilm-text3"]):
        with pytest.raises(RecipeError, match="not a catalog pool"):
            check_pool_name(pool)
    check_visitor_recipe({"method": "x", "models": "org/a", "base": "builtin:all-MiniLM-L6-v2"})
    long = "/" + "a" * 500
    with pytest.raises(RecipeError) as caught:
        check_visitor_recipe({"models": [long]})
    assert len(str(caught.value)) < 300  # the visitor's own input comes back shortened


def test_unexpected_errors_keep_their_details_on_a_public_server() -> None:
    from hf_fusion.space.app import _user_error

    leak = OSError(f"[Errno 2] No such file: '/srv/private/{SECRET}'")
    assert SECRET not in str(_user_error(leak, public=True))
    assert "OSError" in str(_user_error(leak, public=True))
    assert SECRET in str(_user_error(leak, public=False))  # a local app shows the whole message


def test_recipe_bombs_and_bad_numbers_are_refused_in_the_request(public_space, tmp_path: Path) -> None:
    url, sessions, cache = public_space
    before = _created(sessions, cache / "hf-fusion")
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    laughs = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    laughs += "method: weighted_average\nmodels: [org/a, org/b]\nparameters: {weights: *i}\n"
    cases = [
        (laughs, False, 0, "aliases"),
        ("method: simple_average\nmodels: [org/a]\n# " + "x" * 70_000, False, 0, "at most 65,536"),
        (RECIPE_POOL, True, -1, "examples per task|less than minimum value"),  # gradio or the app
    ]
    for recipe, evaluate, limit, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(recipe, evaluate, limit, api_name="/merge")
    with pytest.raises(AppError, match="at most 48 per comparison"):
        client.predict(
            "minilm-text3", ["task_arithmetic", "ties_merging"], "scaling_factor=0.01:1.0:0.01", 4, api_name="/compare"
        )
    with pytest.raises(AppError, match="at most 1000"):
        client.predict("minilm-text3", ["task_arithmetic"], "scaling_factor=0:1e12:1e-12", 4, api_name="/compare")
    assert _created(sessions, cache / "hf-fusion") == before


RECIPE_POOL = "method: task_arithmetic\npool: minilm-text3\n"


def test_examples_per_task_must_be_a_whole_number_of_zero_or_more() -> None:
    from hf_fusion.space.app import eval_settings

    assert eval_settings(0).limit is None and eval_settings(16.0).limit == 16 and eval_settings(None).limit is None
    for bad in (-1, float("nan"), float("inf"), 2.5, True, "12"):
        with pytest.raises(RecipeError, match="examples per task"):
            eval_settings(bad)
