"""``--output-format adapter``: a pool of LoRA adapters fused into one peft adapter, checked against the dense merge
and against the adapters' own factors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hub_helpers import publish
from huggingface_hub import snapshot_download
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from hf_fusion.catalog import resolve_builtin
from hf_fusion.cli import main
from hf_fusion.errors import IncompatibleModelsError, ParameterError, RecipeError
from hf_fusion.fusion import merge

POOL = "minilm-text3"
EXPERTS = [f"builtin:minilm-text3/{task}" for task in ("bbc_news", "twitter_sentiment", "sms_spam")]
PREFIX = "base_model.model."
TEXTS = ["the match ended in a draw after extra time", "WIN a free cruise now, reply YES", "markets fell sharply"]


@pytest.fixture(scope="module")
def base_folder() -> Path:
    return Path(resolve_builtin("builtin:all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dense and adapter outputs of the pool, made once: task arithmetic (exact, and truncated to rank 8) and TIES
    (factorised to rank 16)."""
    root = tmp_path_factory.mktemp("adapter-outputs")
    runs = {
        "ta_dense": {"method": "task_arithmetic"},
        "ta_adapter": {"method": "task_arithmetic", "output_format": "adapter"},
        "ta_rank8": {"method": "task_arithmetic", "output_format": "adapter", "rank": 8},
        "ties_dense": {"method": "ties_merging"},
        "ties_adapter": {"method": "ties_merging", "output_format": "adapter", "rank": 16},
    }
    for name, fields in runs.items():
        merge(pool=POOL, output=root / name, show_progress=False, **fields)
    return {name: root / name for name in runs}


def _hidden(model: torch.nn.Module, base_folder: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state


def _deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Each module's ``scale * B @ A`` as peft applies it (scale from ``lora_alpha`` / ``r`` and the patterns)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    state = load_file(adapter / "adapter_model.safetensors")
    deltas = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            b = state[f"{PREFIX}{module}.lora_B.weight"]
            rank = config["rank_pattern"].get(module, config["r"])
            alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
            deltas[module] = (alpha / rank) * (b.double() @ a.double())
    return deltas


def test_task_arithmetic_adapter_is_the_dense_merge(outputs, base_folder: Path) -> None:
    adapter = outputs["ta_adapter"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 24 and config["lora_alpha"] == 24  # three rank-8 adapters, concatenated
    report = json.loads((adapter / "adapter_fusion.json").read_text())
    assert report["route"] == "exact" and all(m["energy"] == 1.0 for m in report["modules"].values())
    assert not (adapter / "config.json").exists()  # an adapter folder, not a model folder

    dense = AutoModel.from_pretrained(outputs["ta_dense"]).eval()
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_folder), adapter).eval()
    expected = _hidden(dense, base_folder)
    assert torch.allclose(_hidden(peft_model, base_folder), expected, atol=2e-5)


def test_exact_adapter_is_the_weighted_sum_of_the_experts_factors(outputs) -> None:
    """Independently of the engine: 0.3 * sum_t (alpha_t / r_t) B_t A_t from the experts' own files."""
    fused = _deltas(outputs["ta_adapter"])
    expected: dict[str, torch.Tensor] = {}
    for ref in EXPERTS:
        folder = Path(resolve_builtin(ref))
        config = json.loads((folder / "adapter_config.json").read_text())
        state = load_file(folder / "adapter_model.safetensors")
        for key, a in state.items():
            if ".lora_A." in key:
                module = re.sub(r"^base_model\.model\.(bert\.)?", "", key.split(".lora_A.")[0])
                b = state[key.replace(".lora_A.", ".lora_B.")]
                update = 0.3 * config["lora_alpha"] / config["r"] * (b.double() @ a.double())
                expected[module] = expected.get(module, 0) + update
    assert sorted(fused) == sorted(expected)
    for module, delta in expected.items():
        assert torch.allclose(fused[module], delta, atol=1e-6), module


def test_adapter_loads_with_load_adapter(outputs, base_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own adapter API (PeftAdapterMixin.load_adapter) gives the dense merge's outputs too."""
    import transformers.integrations.peft as integration

    monkeypatch.setattr(integration, "check_peft_version", lambda min_version: None)
    model = AutoModel.from_pretrained(base_folder)
    model.load_adapter(str(outputs["ta_adapter"]))
    model.eval()
    expected = _hidden(AutoModel.from_pretrained(outputs["ta_dense"]).eval(), base_folder)
    assert torch.allclose(_hidden(model, base_folder), expected, atol=2e-5)


def test_truncated_linear_adapter_is_the_best_low_rank_approximation(outputs) -> None:
    exact, truncated = _deltas(outputs["ta_adapter"]), _deltas(outputs["ta_rank8"])
    report = json.loads((outputs["ta_rank8"] / "adapter_fusion.json").read_text())
    for module, delta in exact.items():
        singular = torch.linalg.svdvals(delta)
        best = float(singular[:8].square().sum() / singular.square().sum())
        assert report["modules"][module]["rank"] == 8
        assert report["modules"][module]["energy"] == pytest.approx(best, abs=1e-6)
        kept = 1 - float((delta - truncated[module]).square().sum() / delta.square().sum())
        assert kept == pytest.approx(best, abs=1e-6)


def test_factorised_adapter_matches_the_dense_delta_to_the_reported_energy(outputs, base_folder: Path) -> None:
    dense = load_file(outputs["ties_dense"] / "model.safetensors")
    base = load_file(base_folder / "model.safetensors")
    adapter = _deltas(outputs["ties_adapter"])
    report = json.loads((outputs["ties_adapter"] / "adapter_fusion.json").read_text())
    assert report["route"] == "factorised" and len(report["modules"]) == len(adapter) == 37
    for module, approx in adapter.items():
        delta = (dense[f"{module}.weight"] - base[f"{module}.weight"]).double()
        kept = 1 - float((delta - approx).square().sum() / delta.square().sum())
        assert kept == pytest.approx(report["modules"][module]["energy"], abs=1e-5), module
        assert report["modules"][module]["rank"] == 16
    # untouched tensors are not in the adapter: the dense merge left them as in the base
    for name, value in dense.items():
        if name.removesuffix(".weight") not in adapter and name in base:
            assert torch.equal(value, base[name]), name


def test_card_and_recipe_describe_the_adapter(outputs) -> None:
    card = (outputs["ties_adapter"] / "README.md").read_text()
    assert "library_name: peft" in card and "A peft LoRA adapter" in card
    assert "--output-format adapter --rank 16" in card
    recipe = (outputs["ties_adapter"] / "fusion_recipe.yaml").read_text()
    assert "output_format: adapter" in recipe and "rank: 16" in recipe
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "card", "exec"), namespace)  # the snippet runs as written
    assert isinstance(namespace["model"], PeftModel)


def test_pushed_adapter_names_its_hub_base(hub, tokens, repo_name: str, base_folder: Path, tmp_path: Path) -> None:
    """Adapters and base on the Hub: the card lists the base as ``base_model`` with relation ``adapter`` and its
    snippet, run as written, loads base and adapter from the Hub; the repo downloads again byte for byte."""
    publish(hub, "fusion-lab/minilm-base", base_folder)
    experts = []
    for ref in EXPERTS:
        name = f"fusion-lab/minilm-{ref.rsplit('/', 1)[1]}"
        publish(hub, name, Path(resolve_builtin(ref)))
        experts.append(name)
    result = merge(
        models=experts,
        base="fusion-lab/minilm-base",
        method="task_arithmetic",
        output_format="adapter",
        heads=["classifier.*"],
        output=tmp_path / "local",
        push=repo_name,
        token=tokens["write"],
        show_progress=False,
    )
    assert result.push is not None
    downloaded = Path(snapshot_download(repo_name, token=tokens["read"], cache_dir=tmp_path / "cache"))
    for file in result.files:
        assert (downloaded / file).read_bytes() == (tmp_path / "local" / file).read_bytes(), file
    card = (downloaded / "README.md").read_text()
    assert "base_model: fusion-lab/minilm-base" in card and "base_model_relation: adapter" in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'PeftModel.from_pretrained(base, "{repo_name}")' in code
    namespace: dict[str, object] = {}
    exec(compile(code, "card", "exec"), namespace)
    assert isinstance(namespace["model"], PeftModel)


def test_cli_writes_an_adapter(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    argv = ["merge", "--pool", POOL, "--method", "ties_merging", "--output-format", "adapter", "--rank", "4"]
    assert main([*argv, "--output", str(out), "-q"]) == 0
    assert "LoRA adapter of rank 4 (factorised fused deltas" in (out / "fusion_recipe.yaml").read_text()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


@pytest.fixture
def narrow_adapter(tmp_path: Path) -> Path:
    """sms_spam's adapter cut down to its query and value modules (a different set of target modules)."""
    source = Path(resolve_builtin(EXPERTS[2]))
    folder = tmp_path / "narrow"
    shutil.copytree(source, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["query", "value"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(folder / "adapter_model.safetensors")
    kept = {k: v for k, v in state.items() if "lora_" not in k or ".query." in k or ".value." in k}
    save_file(kept, folder / "adapter_model.safetensors")
    return folder


def test_bad_requests_are_refused_before_any_fusion(
    bert_pool, narrow_adapter: Path, base_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "refused"
    adapter = {"output": out, "output_format": "adapter", "show_progress": False}
    base, experts = bert_pool
    with pytest.raises(RecipeError, match="full fine-tunes.*extract-lora"):
        merge(models=[str(e) for e in experts], base=str(base), method="task_arithmetic", **adapter)
    with pytest.raises(RecipeError, match="is a full model while .* is an adapter"):
        merge(
            models=[EXPERTS[0], str(base_folder)],
            base="builtin:all-MiniLM-L6-v2",
            method="task_arithmetic",
            heads=["classifier.*"],
            **adapter,
        )
    with pytest.raises(
        IncompatibleModelsError, match="different target modules: .*sms_spam|different target modules: .*narrow"
    ):
        merge(
            models=[EXPERTS[0], str(narrow_adapter)],
            base="builtin:all-MiniLM-L6-v2",
            method="ties_merging",
            heads=["classifier.*"],
            **adapter,
        )
    dora = tmp_path / "dora"
    shutil.copytree(Path(resolve_builtin(EXPERTS[1])), dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(RecipeError, match="is a DoRA adapter"):
        merge(
            models=[EXPERTS[0], str(dora)],
            base="builtin:all-MiniLM-L6-v2",
            method="task_arithmetic",
            heads=["classifier.*"],
            **adapter,
        )
    with pytest.raises(ParameterError, match="--rank 1000 is larger than module"):
        merge(pool=POOL, method="ties_merging", rank=1000, **adapter)
    with pytest.raises(RecipeError, match="one model per input model"):
        merge(pool=POOL, method="tall_masks", **adapter)
    with pytest.raises(RecipeError, match="new architecture"):
        merge(pool=POOL, method="weight_ensembling_moe", **adapter)
    with pytest.raises(RecipeError, match="--rank sets the rank of an adapter output"):
        merge(pool=POOL, method="ties_merging", output=out, rank=8, show_progress=False)
    assert not out.exists()


def test_averages_are_exact_only_when_affine(tmp_path: Path, base_folder: Path) -> None:
    """The mean of models sharing a base is the base plus the mean task vector: exact, as are weights summing to 1.
    Other unnormalised weights also scale the base, which no adapter carries: refused."""
    merge(pool=POOL, method="simple_average", output=tmp_path / "dense", show_progress=False)
    merge(pool=POOL, method="simple_average", output=tmp_path / "mean", output_format="adapter", show_progress=False)
    assert json.loads((tmp_path / "mean" / "adapter_fusion.json").read_text())["route"] == "exact"
    dense, base = load_file(tmp_path / "dense" / "model.safetensors"), load_file(base_folder / "model.safetensors")
    for module, delta in _deltas(tmp_path / "mean").items():
        fused = dense[f"bert.{module}.weight"]  # without a base input the output takes the experts' task names
        expected = (fused - base[f"{module}.weight"]).double()
        assert torch.allclose(delta, expected, atol=1e-6), module
    merge(
        pool=POOL,
        method="weighted_average",
        weights=[0.2, 0.3, 0.5],
        normalize=False,
        output=tmp_path / "sum",
        output_format="adapter",
        show_progress=False,
    )
    assert json.loads((tmp_path / "sum" / "adapter_fusion.json").read_text())["route"] == "exact"
    with pytest.raises(RecipeError, match="scale the whole base"):
        merge(
            pool=POOL,
            method="weighted_average",
            normalize=False,
            output=tmp_path / "scaled",
            output_format="adapter",
            show_progress=False,
        )


def test_excluded_modules_are_left_out_of_the_adapter(tmp_path: Path, base_folder: Path) -> None:
    """``exclude`` keeps the base's weights in a dense merge; the adapter then carries no factors there."""
    fields = {"pool": POOL, "method": "task_arithmetic", "exclude": ["*.query.weight"], "show_progress": False}
    merge(output=tmp_path / "dense", **fields)
    merge(output=tmp_path / "adapter", output_format="adapter", **fields)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] and not [m for m in config["target_modules"] if m.endswith(".query")]
    report = json.loads((tmp_path / "adapter" / "adapter_fusion.json").read_text())
    assert len(report["excluded"]) == 6 and all(m.endswith("attention.self.query") for m in report["excluded"])
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_folder), tmp_path / "adapter").eval()
    expected = _hidden(AutoModel.from_pretrained(tmp_path / "dense").eval(), base_folder)
    assert torch.allclose(_hidden(peft_model, base_folder), expected, atol=2e-5)


def test_a_16_bit_base_does_not_round_the_fused_deltas(tmp_path: Path, base_folder: Path) -> None:
    """The factorised route reads the adapters' updates in float32 over a bfloat16 base, so the fused deltas are
    those of the float32 base (the task vectors do not depend on the base's precision), not rounded to bfloat16."""
    half = tmp_path / "base-bf16"
    shutil.copytree(base_folder, half)
    state = load_file(base_folder / "model.safetensors")
    save_file(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}, half / "model.safetensors"
    )
    fields = {"models": EXPERTS, "heads": ["classifier.*"], "method": "ties_merging", "show_progress": False}
    for name, base in (("full", str(base_folder)), ("half", str(half))):
        merge(base=base, output=tmp_path / name, output_format="adapter", rank=16, **fields)
    full, half_deltas = _deltas(tmp_path / "full"), _deltas(tmp_path / "half")
    for module, delta in full.items():
        # rounding the updates to the base's bfloat16 spacing would move them by about their own size
        assert float((half_deltas[module] - delta).norm() / delta.norm()) < 1e-3, module


@pytest.fixture
def adapters_with_saved_norm(tmp_path: Path, base_folder: Path) -> list[Path]:
    """The pool's adapters, each also training the embeddings' LayerNorm (saved whole, as ``modules_to_save``)."""
    base = load_file(base_folder / "model.safetensors")
    folders = []
    for index, ref in enumerate(EXPERTS):
        folder = tmp_path / f"norm-{index}"
        shutil.copytree(Path(resolve_builtin(ref)), folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config["modules_to_save"] = [*config["modules_to_save"], "embeddings.LayerNorm"]
        (folder / "adapter_config.json").write_text(json.dumps(config))
        state = load_file(folder / "adapter_model.safetensors")
        generator = torch.Generator().manual_seed(index)
        for param in ("weight", "bias"):
            value = base[f"embeddings.LayerNorm.{param}"]
            state[f"{PREFIX}bert.embeddings.LayerNorm.{param}"] = value + 0.05 * torch.randn(
                value.shape, generator=generator
            )
        save_file(state, folder / "adapter_model.safetensors")
        folders.append(folder)
    return folders


@pytest.mark.parametrize("method,rank", [("task_arithmetic", None), ("ties_merging", 16)])
def test_modules_the_adapters_save_whole_are_fused_and_saved_whole(
    adapters_with_saved_norm: list[Path], base_folder: Path, tmp_path: Path, method: str, rank: int | None
) -> None:
    """A module every adapter trains whole is fused by the method like any tensor and saved whole
    (``modules_to_save``); the exact adapter then gives the dense merge's outputs."""
    fields = {
        "models": [str(f) for f in adapters_with_saved_norm],
        "base": "builtin:all-MiniLM-L6-v2",
        "heads": ["classifier.*"],
        "method": method,
        "show_progress": False,
    }
    merge(output=tmp_path / "dense", **fields)
    merge(output=tmp_path / "adapter", output_format="adapter", rank=rank, **fields)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embeddings.LayerNorm"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    for param in ("weight", "bias"):
        assert torch.allclose(saved[f"{PREFIX}embeddings.LayerNorm.{param}"], dense[f"embeddings.LayerNorm.{param}"])
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_folder), tmp_path / "adapter").eval()
    if rank is None:
        expected = _hidden(AutoModel.from_pretrained(tmp_path / "dense").eval(), base_folder)
        assert torch.allclose(_hidden(peft_model, base_folder), expected, atol=2e-5)
    norm = peft_model.base_model.model.embeddings.LayerNorm  # peft's wrapper holds the saved copy
    assert torch.equal(norm.modules_to_save["default"].weight, saved[f"{PREFIX}embeddings.LayerNorm.weight"])
