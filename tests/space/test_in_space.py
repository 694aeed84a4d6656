"""The app as it runs on a Space: sign-in button, the OAuth token as the only push credential, no local paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from gradio_client.exceptions import AppError


@pytest.fixture(scope="module")
def space_mode_url(tmp_path_factory: pytest.TempPathFactory, tokens) -> Iterator[str]:
    from hf_fusion.space import serving

    patch = pytest.MonkeyPatch()
    patch.setenv("HF_TOKEN", tokens["write"])  # gradio's local stand-in for Space OAuth wants a machine login
    try:
        with serving(root=tmp_path_factory.mktemp("space-mode"), in_space=True, allow_local_paths=True) as url:
            yield url
    finally:
        patch.undo()


def test_in_a_space_the_handlers_take_the_oauth_token_and_never_the_local_one(
    space_mode_url: str, bert_pool, tmp_path: Path
) -> None:
    from gradio_client import Client

    client = Client(space_mode_url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    api = client.view_api(return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in api["/merge"]["parameters"]] == ["input_0", "input_1", "input_2"]
    base, experts = bert_pool
    recipe = yaml.safe_dump({"method": "simple_average", "models": [str(e) for e in experts]})
    status, *_ = client.predict(recipe, False, 0, api_name="/merge")  # inputs, OAuth and progress line up
    assert "Merged 3 models" in status
    # HF_TOKEN is set on this machine (see the fixture), yet a visitor who has not signed in cannot push with it
    with pytest.raises(AppError, match="sign in"):
        client.predict("alice/anything", True, False, api_name="/push")
