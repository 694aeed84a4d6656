"""Fusing Hub models: pinned revisions, exactly the needed files, and errors before any weight is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as ref
import torch
from hub_helpers import publish

import hf_fusion
from hf_fusion.errors import IncompatibleModelsError
from hf_fusion.hub.errors import HubAccessError


def _weight_gets(hub, since: int) -> list[str]:
    """Whole-file weight downloads (header reads are Range requests for the first bytes)."""
    return [
        p
        for m, p, _, rng in hub.state.requests[since:]
        if m == "GET" and "/resolve/" in p and p.endswith(".safetensors") and rng is None
    ]


def test_hub_models_fuse_like_their_local_copies(hub, hub_pool, tmp_path: Path) -> None:
    base, experts = hub_pool["local"]
    from_hub = hf_fusion.merge(
        models=hub_pool["experts"], base=hub_pool["base"], method="ties", output=tmp_path / "hub", show_progress=False
    )
    hf_fusion.merge(
        models=[str(e) for e in experts], base=str(base), method="ties", output=tmp_path / "local", show_progress=False
    )
    assert (tmp_path / "hub" / "model.safetensors").read_bytes() == (
        tmp_path / "local" / "model.safetensors"
    ).read_bytes()
    pinned = from_hub.recipe
    assert pinned.base.commit == hub_pool["commits"][hub_pool["base"]]
    assert [m.commit for m in pinned.models] == [hub_pool["commits"][e] for e in hub_pool["experts"]]
    saved = hf_fusion.Recipe.from_yaml(tmp_path / "hub" / "fusion_recipe.yaml")
    assert saved.models[0].commit == hub_pool["commits"][hub_pool["experts"][0]]


def test_only_needed_files_are_downloaded(hub, tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    folder = tmp_path / "noisy"
    folder.mkdir()
    for f in experts[0].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "training_args.bin").write_bytes(b"\x80pickle")
    (folder / "optimizer.pt").write_bytes(b"\x80pickle" * 100)
    (folder / "vocab.txt").write_text("[PAD]\n")
    publish(hub, "fusion-lab/noisy-ft", folder)
    hf_fusion.merge(
        models=["fusion-lab/noisy-ft", str(experts[1])],
        method="simple_average",
        output=tmp_path / "o",
        show_progress=False,
    )
    fetched = [p for m, p, _, _ in hub.state.requests if m == "GET" and p.startswith("/fusion-lab/noisy-ft/resolve/")]
    names = {p.rsplit("/", 1)[1] for p in fetched}
    assert {"model.safetensors", "config.json", "vocab.txt"} <= names
    assert not names & {"training_args.bin", "optimizer.pt"}
    assert (tmp_path / "o" / "vocab.txt").is_file()


def test_revisions_are_honoured_and_pinned(hub, hub_pool, tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    publish(hub, "fusion-lab/moving", experts[0])
    first = hub.state.repos[("model", "fusion-lab/moving")].branches["main"]
    hub.state.repos[("model", "fusion-lab/moving")].branches["v1"] = first
    hub.state.upload("fusion-lab/moving", {"model.safetensors": (experts[2] / "model.safetensors").read_bytes()})
    args = dict(base=hub_pool["base"], method="task_arithmetic", show_progress=False)
    old = hf_fusion.merge(models=["fusion-lab/moving@v1", hub_pool["experts"][1]], output=tmp_path / "v1", **args)
    by_sha = hf_fusion.merge(
        models=[f"fusion-lab/moving@{first}", hub_pool["experts"][1]], output=tmp_path / "sha", **args
    )
    new = hf_fusion.merge(models=["fusion-lab/moving", hub_pool["experts"][1]], output=tmp_path / "main", **args)
    read = lambda name: (tmp_path / name / "model.safetensors").read_bytes()  # noqa: E731
    assert read("v1") == read("sha") != read("main")
    assert old.recipe.models[0].revision == "v1" and old.recipe.models[0].commit == first
    assert by_sha.recipe.models[0].commit == first
    assert new.recipe.models[0].commit != first
    expected = ref.task_arithmetic(ref.load_state(base), [ref.load_state(experts[0]), ref.load_state(experts[1])], 0.3)
    fused = ref.load_state(tmp_path / "v1")
    for k, v in expected.items():
        torch.testing.assert_close(fused[k].double(), v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "models, message",
    [
        (
            ["fusion-lab/does-not-exist"],
            r"fusion-lab/does-not-exist was not found on http://127\.0\.0\.1:\d+: check the id, or if it is private",
        ),
        (["fusion-lab/bert-ft0@no-such-branch"], r"fusion-lab/bert-ft0 has no revision 'no-such-branch'"),
    ],
)
def test_missing_repo_or_revision(hub, hub_pool, tmp_path: Path, models, message) -> None:
    since = len(hub.state.requests)
    with pytest.raises(HubAccessError, match=message):
        hf_fusion.merge(
            models=models + [hub_pool["experts"][1]],
            base=hub_pool["base"],
            method="ties",
            output=tmp_path / "o",
            show_progress=False,
        )
    assert not (tmp_path / "o").exists() and _weight_gets(hub, since) == []


def test_private_and_gated_repos(hub, tokens, tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    publish(hub, "alice/private-ft", experts[0], private=True)
    publish(hub, "fusion-lab/gated-ft", experts[1], gated=True)
    args = dict(method="simple_average", show_progress=False)
    with pytest.raises(HubAccessError, match="alice/private-ft was not found .* if it is private, pass --token"):
        hf_fusion.merge(models=["alice/private-ft", str(experts[2])], output=tmp_path / "a", **args)
    result = hf_fusion.merge(
        models=["alice/private-ft", str(experts[2])], output=tmp_path / "b", token=tokens["write"], **args
    )
    assert result.recipe.models[0].commit
    with pytest.raises(HubAccessError, match="fusion-lab/gated-ft is gated: accept its conditions"):
        hf_fusion.merge(models=["fusion-lab/gated-ft", str(experts[2])], output=tmp_path / "c", **args)
    with pytest.raises(HubAccessError, match="gated"):
        hf_fusion.merge(
            models=["fusion-lab/gated-ft", str(experts[2])], output=tmp_path / "d", token=tokens["write"], **args
        )
    assert not any((tmp_path / n).exists() for n in "acd")


def test_incompatible_hub_models_fail_from_headers(hub, hub_pool, pools, tmp_path: Path) -> None:
    _, gpt2_experts = pools["gpt2"]
    publish(hub, "fusion-lab/gpt2-ft0", gpt2_experts[0])
    since = len(hub.state.requests)
    with pytest.raises(IncompatibleModelsError, match="different architectures"):
        hf_fusion.merge(
            models=[hub_pool["experts"][0], "fusion-lab/gpt2-ft0"],
            method="simple_average",
            output=tmp_path / "o",
            show_progress=False,
        )
    assert _weight_gets(hub, since) == []


def test_shape_mismatch_fails_from_remote_headers(hub, hub_pool, tmp_path: Path) -> None:
    from toy import bert

    torch.manual_seed(0)
    bert(num_labels=5).save_pretrained(tmp_path / "five")
    publish(hub, "fusion-lab/bert-five-labels", tmp_path / "five")
    since = len(hub.state.requests)
    with pytest.raises(IncompatibleModelsError, match=r"tensor 'classifier\.(weight|bias)' has shape \[5"):
        hf_fusion.merge(
            models=[hub_pool["experts"][0], "fusion-lab/bert-five-labels"],
            base=hub_pool["base"],
            method="ties",
            output=tmp_path / "o",
            show_progress=False,
        )
    header_reads = [p for m, p, _, rng in hub.state.requests[since:] if p.endswith(".safetensors") and rng]
    assert header_reads and not (tmp_path / "o").exists()


def test_dropped_connections_are_retried(hub, hub_pool, tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    publish(hub, "fusion-lab/flaky-ft", experts[0])
    hub.state.drops["fusion-lab/flaky-ft/model.safetensors"] = 3
    hf_fusion.merge(
        models=["fusion-lab/flaky-ft", str(experts[1])],
        method="simple_average",
        output=tmp_path / "o",
        show_progress=False,
    )
    hf_fusion.merge(
        models=[str(experts[0]), str(experts[1])],
        method="simple_average",
        output=tmp_path / "local",
        show_progress=False,
    )
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == (
        tmp_path / "local" / "model.safetensors"
    ).read_bytes()
    assert hub.state.drops["fusion-lab/flaky-ft/model.safetensors"] == 0


@pytest.mark.slow
def test_a_dead_download_gives_a_clear_error(hub, tmp_path: Path, bert_pool) -> None:
    base, experts = bert_pool
    publish(hub, "fusion-lab/dead-ft", experts[0])
    hub.state.dead.add("fusion-lab/dead-ft/model.safetensors")
    with pytest.raises(
        HubAccessError, match=r"cannot download fusion-lab/dead-ft@\w+: .* did not answer .* after retries"
    ):
        hf_fusion.merge(
            models=["fusion-lab/dead-ft", str(experts[1])],
            method="simple_average",
            output=tmp_path / "o",
            show_progress=False,
        )
    assert not (tmp_path / "o").exists()


def test_offline_mode_uses_the_cache(hub, hub_pool, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    hf_fusion.merge(
        models=hub_pool["experts"][:2], method="simple_average", output=tmp_path / "online", show_progress=False
    )
    cmd = [sys.executable, "-m", "hf_fusion", "merge", "--quiet", "--method", "simple_average", "--repo-ids"]
    ok = subprocess.run(
        cmd + hub_pool["experts"][:2] + ["--output", str(tmp_path / "offline")], env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "online" / "model.safetensors").read_bytes() == (
        tmp_path / "offline" / "model.safetensors"
    ).read_bytes()
    missing = subprocess.run(
        cmd + ["fusion-lab/never-downloaded", hub_pool["experts"][0], "--output", str(tmp_path / "x")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1
    assert "fusion-lab/never-downloaded is not in the local cache and the Hub cannot be used" in missing.stderr


def test_lora_adapter_repo_as_an_expert(hub, hub_pool, tmp_path: Path, bert_pool) -> None:
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    base, experts = bert_pool
    task = BertForSequenceClassification.from_pretrained(base)
    adapter = get_peft_model(task, LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    adapter.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = hub_pool["base"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    publish(hub, "fusion-lab/bert-lora", tmp_path / "adapter")
    args = dict(base=hub_pool["base"], method="task_arithmetic", show_progress=False)
    from_hub = hf_fusion.merge(models=["fusion-lab/bert-lora", hub_pool["experts"][1]], output=tmp_path / "hub", **args)
    hf_fusion.merge(models=[str(tmp_path / "adapter"), hub_pool["experts"][1]], output=tmp_path / "local", **args)
    assert (tmp_path / "hub" / "model.safetensors").read_bytes() == (
        tmp_path / "local" / "model.safetensors"
    ).read_bytes()
    assert from_hub.recipe.models[0].commit
    assert not (tmp_path / "hub" / "adapter_config.json").exists()
