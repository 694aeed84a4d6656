"""The Space driven over HTTP with gradio_client: merges, pushes, comparisons, validation errors and Stop."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest
import reference as ref
import torch
import yaml
from gradio_client.exceptions import AppError
from huggingface_hub import HfApi, ModelCard, snapshot_download
from toy import example_inputs
from transformers import AutoModelForSequenceClassification


def _recipe(**fields: object) -> str:
    return yaml.safe_dump(fields, sort_keys=False)


def _unzip(archive: str, into: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        zf.extractall(into)
    top = {n.split("/")[0] for n in names}
    assert len(top) == 1, names
    return into / top.pop()


def test_merge_tiny_models_through_the_api(client, bert_pool, tmp_path: Path) -> None:
    base, experts = bert_pool
    recipe = _recipe(
        method="task_arithmetic", models=[str(e) for e in experts], base=str(base), parameters={"scaling_factor": 0.4}
    )
    status, log, scores, archive, card = client.predict(recipe, False, 0, api_name="/merge")
    assert "Merged 3 models with **task_arithmetic**" in status
    assert "fusing" in log and "fused" in log
    assert scores is None or not scores.get("data")
    folder = _unzip(archive, tmp_path / "unzipped")
    expected = ref.task_arithmetic(ref.load_state(base), [ref.load_state(e) for e in experts], 0.4)
    merged = ref.load_state(folder)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-5, atol=1e-6)
    model = AutoModelForSequenceClassification.from_pretrained(folder)  # a from_pretrained-ready folder
    reference_model = AutoModelForSequenceClassification.from_pretrained(base)
    loaded = reference_model.load_state_dict({k: v.float() for k, v in expected.items()}, strict=False)
    assert not loaded.unexpected_keys
    inputs = example_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference_model(**inputs).logits, rtol=1e-4, atol=1e-5)
    assert "task_arithmetic" in card and "---" not in card.splitlines()[0]


@pytest.mark.parametrize(
    ("recipe", "evaluate", "message"),
    [
        (_recipe(method="ties_mergin", models=["a/b"], base="a/c"), False, "did you mean 'ties_merging'"),
        (
            _recipe(method="task_arithmetic", models=["a/b"], base="a/c", parameters={"scaling_factor": 50}),
            False,
            "scaling_factor",
        ),
        (_recipe(method="task_arithmetic", models=["a/b"]), False, "needs a base"),
        (
            _recipe(method="task_arithmetic", models=["a/b"], base="a/c", parameters={"lambda_": 1}),
            False,
            "unknown parameter 'lambda_'",
        ),
        ("method: [unclosed", False, "not valid YAML"),
        (_recipe(method="task_arithmetic", models=["a/b"], base="a/c"), True, "scoring needs a pool"),
    ],
)
def test_bad_recipes_fail_with_the_validation_message(client, recipe: str, evaluate: bool, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(AppError) as caught:
        client.predict(recipe, evaluate, 0, api_name="/merge")
    assert message.lower() in str(caught.value).lower()
    assert time.perf_counter() - started < 10  # refused in the request, before anything is fetched


def test_unknown_hub_model_names_the_repo(client) -> None:
    recipe = _recipe(method="task_arithmetic", models=["fusion-lab/does-not-exist"], base="fusion-lab/bert-base")
    with pytest.raises(AppError, match="fusion-lab/does-not-exist"):
        client.predict(recipe, False, 0, api_name="/merge")


def test_merge_hub_models_then_push_private(client, hub, hub_pool, tokens, repo_name, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", tokens["write"])  # outside a Space the app pushes with the local token
    recipe = _recipe(method="ties_merging", models=hub_pool["experts"], base=hub_pool["base"])
    status, _, _, archive, _ = client.predict(recipe, False, 0, api_name="/merge")
    assert "Merged 3 models" in status
    local = _unzip(archive, tmp_path / "unzipped")

    pushed = client.predict(repo_name, True, False, api_name="/push")
    assert f"Pushed to [{repo_name}]" in pushed and "(private)" in pushed
    api = HfApi()
    assert api.model_info(repo_name, token=tokens["write"]).private is True
    remote = Path(snapshot_download(repo_name, token=tokens["write"], cache_dir=tmp_path / "cache"))
    for path in local.iterdir():
        if path.name != "README.md":  # the card is rewritten with the repo id before the push
            assert (remote / path.name).read_bytes() == path.read_bytes(), path.name
    card = ModelCard.load(remote / "README.md")
    assert set(card.data.base_model) == {*hub_pool["experts"], hub_pool["base"]}
    assert repo_name in card.text
    assert tokens["write"] not in (remote / "README.md").read_text()
    with pytest.raises(AppError, match="already has"):  # an existing repo is not overwritten unless asked
        client.predict(repo_name, True, False, api_name="/push")
    assert "Pushed to" in client.predict(repo_name, True, True, api_name="/push")


def test_push_needs_a_merge_in_this_session_and_a_token(client, space_url, bert_pool, monkeypatch) -> None:
    from gradio_client import Client

    with pytest.raises(AppError, match="run a merge first"):
        client.predict("alice/anything", True, False, api_name="/push")
    base, experts = bert_pool
    client.predict(_recipe(method="simple_average", models=[str(e) for e in experts]), False, 0, api_name="/merge")
    other = Client(space_url, verbose=False, analytics_enabled=False, download_files=False)
    with pytest.raises(AppError, match="run a merge first"):  # another user's merge is not theirs to push
        other.predict("alice/anything", True, False, api_name="/push")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    with pytest.raises(AppError, match="token"):
        client.predict("alice/anything", True, False, api_name="/push")


@pytest.mark.slow
def test_compare_returns_a_leaderboard_with_plots(client) -> None:
    status, log, board, bars, lines = client.predict(
        "minilm-text3", ["task_arithmetic", "ties_merging"], "scaling_factor=0.3,0.6", 24, api_name="/compare"
    )
    assert "Compared 4 fused model(s) on 3 task(s)" in status
    headers, data = board["headers"], board["data"]
    assert headers == ["model", "bbc_news", "twitter_sentiment", "sms_spam", "average", "normalized"]
    labels = [row[0] for row in data]
    assert labels == [
        "pretrained",
        "individual",
        "task_arithmetic[scaling_factor=0.3]",
        "task_arithmetic[scaling_factor=0.6]",
        "ties_merging[scaling_factor=0.3]",
        "ties_merging[scaling_factor=0.6]",
    ]
    individual = data[1]
    for row in data:
        scores = row[1:4]
        assert row[4] == pytest.approx(sum(scores) / 3, abs=0.06)
        assert row[5] == pytest.approx(100 * sum(s / e for s, e in zip(scores, individual[1:4])) / 3, abs=0.2)
    styling = board["metadata"]["styling"]
    fused_rows = range(2, len(data))
    best_average = max(data[i][4] for i in fused_rows)
    assert all(("bold" in styling[i][4]) == (data[i][4] == best_average) for i in fused_rows)
    assert not any(styling[0]) and not any(styling[1])  # baselines are not ranked
    for image in (bars, lines):
        assert Path(image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_stop_really_stops_the_job(client, space_root: Path) -> None:
    job = client.submit(
        "minilm-text3",
        ["task_arithmetic", "ties_merging", "simple_average"],
        "scaling_factor=0.1:1.0:0.1",
        0,
        api_name="/compare",
    )
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the job is inside the engine or the evaluation
        outputs = job.outputs()
        if outputs and ("fusing" in (outputs[-1][1] or "")):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the comparison never started")
    started = time.perf_counter()
    assert "Stopping" in client.predict(api_name="/stop")
    status, log, board, bars, lines = job.result(timeout=60)
    assert time.perf_counter() - started < 20
    assert "stopped" in status and "stop requested" in log
    assert board is None or not board.get("data")
    leftovers = [p for p in space_root.rglob("*") if p.name.startswith(".hf-fusion-tmp-")]
    assert leftovers == []
