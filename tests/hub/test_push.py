"""Pushing fused models: one commit, downloadable byte for byte, loadable by repo id, with a truthful card."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from toy import example_inputs
from transformers import AutoModelForSequenceClassification

import hf_fusion
from hf_fusion.hub.errors import MissingTokenError, PushError


def cli(*args: str, token: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "hf_fusion", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_merge_push_download_load_and_card(hub, hub_pool, tokens, repo_name: str, tmp_path: Path) -> None:
    experts, base = hub_pool["experts"], hub_pool["base"]
    out = cli(
        "merge",
        "--repo-ids",
        *experts,
        "--base",
        base,
        "--method",
        "task_arithmetic",
        "--output",
        str(tmp_path / "merged"),
        "--push",
        repo_name,
        "--token",
        tokens["write"],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert f"Pushed to {hub.endpoint}/{repo_name}" in out.stdout
    local = _files(tmp_path / "merged")
    assert {"model.safetensors", "config.json", "fusion_recipe.yaml", "README.md"} <= set(local)

    downloaded = Path(snapshot_download(repo_name, cache_dir=tmp_path / "fresh-cache"))
    assert _files(downloaded) == local  # every file, byte for byte

    history = HfApi().list_repo_commits(repo_name)
    assert history[0].title == "Fuse 3 models with task_arithmetic (hf-fusion)"

    model = AutoModelForSequenceClassification.from_pretrained(repo_name).eval()
    same = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**example_inputs("bert")).logits, same(**example_inputs("bert")).logits)

    card = ModelCard.load(repo_name)
    data = card.data.to_dict()
    assert data["base_model"] == [base, *experts]
    assert data["base_model_relation"] == "merge"
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert set(data["tags"]) == {"merge", "hf-fusion", "task_arithmetic"}
    for repo in [base, *experts]:
        assert hub_pool["commits"][repo][:10] in card.text
        assert f"{repo}@{hub_pool['commits'][repo]}" in card.text  # the reproduce command is pinned
    assert f'from_pretrained("{repo_name}")' in card.text
    assert "arxiv.org/abs/2212.04089" in card.text

    everything = out.stdout + out.stderr + "".join(v.decode(errors="ignore") for v in local.values())
    assert tokens["write"] not in everything


def test_verbose_logs_never_show_the_token(hub, hub_pool, tokens, repo_name: str, tmp_path: Path) -> None:
    out = cli(
        "merge",
        "--verbose",
        "--repo-ids",
        *hub_pool["experts"][:2],
        "--method",
        "simple_average",
        "--output",
        str(tmp_path / "m"),
        "--push",
        repo_name,
        "--token",
        tokens["write"],
    )
    assert out.returncode == 0, out.stderr
    assert "DEBUG hf_fusion" in out.stderr  # verbose really logs
    assert tokens["write"] not in out.stdout + out.stderr
    assert tokens["write"][-12:] not in out.stdout + out.stderr


def test_private_branch_and_pull_request(hub, hub_pool, tokens, repo_name: str, tmp_path: Path) -> None:
    experts = hub_pool["experts"][:2]
    args = dict(models=experts, method="simple_average", token=tokens["write"], show_progress=False)
    hf_fusion.merge(output=tmp_path / "a", push=hf_fusion.PushTarget(repo_name, private=True, revision="exp"), **args)
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_name, token=False)
    assert "model.safetensors" in api.list_repo_files(repo_name, revision="exp", token=tokens["write"])
    assert api.list_repo_files(repo_name, token=tokens["write"]) == [".gitattributes"]
    result = hf_fusion.merge(output=tmp_path / "b", push=hf_fusion.PushTarget(repo_name, create_pr=True), **args)
    assert result.push.pr_url and result.push.pr_url.endswith("/discussions/1")
    assert "model.safetensors" in api.list_repo_files(repo_name, revision="refs/pr/1", token=tokens["write"])
    assert api.list_repo_files(repo_name, token=tokens["write"]) == [".gitattributes"]


def test_existing_files_are_only_replaced_with_overwrite(hub, hub_pool, tokens, repo_name: str, tmp_path: Path) -> None:
    hub.state.create(repo_name)
    hub.state.upload(repo_name, {"model-00001-of-00002.safetensors": b"stale", "notes.txt": b"mine"})
    since = len(hub.state.requests)
    args = dict(models=hub_pool["experts"][:2], method="simple_average", token=tokens["write"], show_progress=False)
    with pytest.raises(PushError, match=rf"{repo_name} already has 2 file\(s\) on branch 'main'; pass --overwrite"):
        hf_fusion.merge(output=tmp_path / "a", push=repo_name, **args)
    assert not (tmp_path / "a").exists()
    assert not [p for m, p, _, r in hub.state.requests[since:] if "/resolve/" in p and r is None]  # nothing fetched
    hf_fusion.merge(output=tmp_path / "b", push=hf_fusion.PushTarget(repo_name, overwrite=True), **args)
    remote = set(HfApi().list_repo_files(repo_name))
    assert remote == {".gitattributes", *(_files(tmp_path / "b"))}  # stale shard and notes are gone


def test_missing_token_fails_before_any_work(hub, hub_pool, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    since = len(hub.state.requests)
    with pytest.raises(MissingTokenError, match="pass --token, set HF_TOKEN, or run `hf auth login`"):
        hf_fusion.merge(
            models=hub_pool["experts"][:2],
            method="simple_average",
            output=tmp_path / "o",
            push="alice/x",
            show_progress=False,
        )
    assert hub.state.requests[since:] == [] and not (tmp_path / "o").exists()


def test_foreign_namespace_is_refused_early(hub, hub_pool, tokens, tmp_path: Path) -> None:
    with pytest.raises(PushError, match="the token belongs to 'alice', who cannot create repos under 'bob'"):
        hf_fusion.merge(
            models=hub_pool["experts"][:2],
            method="simple_average",
            output=tmp_path / "o",
            push="bob/x",
            token=tokens["write"],
            show_progress=False,
        )
    assert not (tmp_path / "o").exists()


def test_refused_push_keeps_the_folder_and_says_how_to_retry(
    hub, hub_pool, tokens, repo_name: str, tmp_path: Path
) -> None:
    out = cli(
        "merge",
        "--repo-ids",
        *hub_pool["experts"][:2],
        "--method",
        "simple_average",
        "--output",
        str(tmp_path / "merged"),
        "--push",
        repo_name,
        token=tokens["read"],
    )
    assert out.returncode == 1
    assert "forbidden (403)" in out.stderr
    assert (
        f"The fused model is intact in {tmp_path / 'merged'}; retry with: hf-fusion push {tmp_path / 'merged'} {repo_name}"
        in out.stderr
    )
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert tokens["read"] not in out.stdout + out.stderr
    (tmp_path / "merged" / "README.md").unlink()
    retry = cli("push", str(tmp_path / "merged"), repo_name, token=tokens["write"])
    assert retry.returncode == 0, retry.stderr
    pushed = Path(snapshot_download(repo_name, cache_dir=tmp_path / "c"))
    assert (pushed / "model.safetensors").read_bytes() == (tmp_path / "merged" / "model.safetensors").read_bytes()
    assert f'from_pretrained("{repo_name}")' in (pushed / "README.md").read_text()  # card written for this repo


def test_push_without_output_cleans_up(hub, hub_pool, tokens, repo_name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    result = hf_fusion.merge(
        models=hub_pool["experts"][:2],
        method="simple_average",
        push=repo_name,
        token=tokens["write"],
        show_progress=False,
    )
    assert "model.safetensors" in HfApi().list_repo_files(repo_name)
    assert not result.output.exists()
    assert list(tmp_path.iterdir()) == []


def test_stored_login_is_used(hub, hub_pool, tokens, repo_name: str, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    token_file = tmp_path / "stored_token"
    token_file.write_text(tokens["write"])
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    result = hf_fusion.merge(
        models=hub_pool["experts"][:2],
        method="simple_average",
        output=tmp_path / "o",
        push=repo_name,
        show_progress=False,
    )
    assert result.push.repo_id == repo_name


def test_push_uploads_only_what_an_output_holds(hub, hub_pool, tokens, repo_name: str, tmp_path: Path) -> None:
    """Files dropped into a fused folder by hand (keys, notes, a private folder) stay on the machine."""
    folder = tmp_path / "merged"
    hf_fusion.merge(models=hub_pool["experts"][:2], method="simple_average", output=folder, show_progress=False)
    (folder / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (folder / "notes.txt").write_text("internal notes")
    (folder / "private").mkdir()
    (folder / "private" / "credentials.json").write_text("{}")
    out = cli("push", str(folder), repo_name, token=tokens["write"])
    assert out.returncode == 0, out.stderr
    assert "not pushed" in out.stderr and "id_rsa" in out.stderr
    remote = set(HfApi().list_repo_files(repo_name))
    assert remote == {".gitattributes", "config.json", "model.safetensors", "fusion_recipe.yaml", "README.md"}
