"""extract-lora: a fine-tune minus its base as a peft LoRA adapter that peft loads back into the fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_helpers import publish
from huggingface_hub import snapshot_download
from peft import PeftModel
from safetensors.torch import load_file
from toy import bert, example_inputs, gpt2
from transformers import BertForSequenceClassification, GPT2LMHeadModel, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from hf_fusion.adapters import ExtractionResult, choose_rank, extract_lora, factorise
from hf_fusion.cli import main
from hf_fusion.errors import IncompatibleModelsError, OutputExistsError, ParameterError, RecipeError

PREFIX = "base_model.model."


def _rank2(out: int, inp: int, generator: torch.Generator) -> torch.Tensor:
    return 0.05 * torch.randn(out, 2, generator=generator) @ torch.randn(2, inp, generator=generator)


def _fine_tune(model: PreTrainedModel, *, seed: int, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Adds a known rank-2 delta to every Linear/Conv1D weight (but ``skip``); returns the deltas as ``[out, in]``."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and name.rpartition(".")[2] not in skip:
                weight = module.weight
                out, inp = (weight.shape[1], weight.shape[0]) if isinstance(module, Conv1D) else weight.shape
                delta = _rank2(out, inp, g)
                weight += delta.T if isinstance(module, Conv1D) else delta
                deltas[name] = delta
    return deltas


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A BERT classifier base and a fine-tune: rank-2 deltas on the linear layers, plus a changed LayerNorm, a
    changed bias of a linear layer, and a changed classifier head."""
    root = tmp_path_factory.mktemp("extract-bert")
    torch.manual_seed(0)
    base = bert(num_labels=3)
    base.save_pretrained(root / "base")
    deltas = _fine_tune(base, seed=1, skip=("classifier",))
    with torch.no_grad():
        base.bert.encoder.layer[0].output.LayerNorm.weight += 0.1
        base.bert.encoder.layer[1].intermediate.dense.bias += 0.05
        base.classifier.weight += 0.2
    base.save_pretrained(root / "tuned")
    return root / "tuned", root / "base", deltas


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("extract-gpt2")
    torch.manual_seed(0)
    base = gpt2()
    base.save_pretrained(root / "base")
    deltas = _fine_tune(base, seed=2, skip=("lm_head",))  # lm_head is tied to the embeddings
    with torch.no_grad():
        base.transformer.wpe.weight += _rank2(32, 32, torch.Generator().manual_seed(3))
    base.save_pretrained(root / "tuned")
    return root / "tuned", root / "base", deltas


def _extract(model: Path, base: Path, output: Path, rank: int, **kwargs) -> ExtractionResult:
    return extract_lora(model, base, rank=rank, output=output, show_progress=False, **kwargs)


def _logits(model: torch.nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**example_inputs(arch)).logits


def test_factorise_recovers_a_low_rank_delta_and_reports_the_energy() -> None:
    g = torch.Generator().manual_seed(0)
    delta = _rank2(48, 32, g)
    exact = factorise(delta, 2)
    assert exact.rank == 2 and exact.a.shape == (2, 32) and exact.b.shape == (48, 2)
    assert (exact.b @ exact.a - delta).abs().max() < 1e-5
    assert exact.energy == pytest.approx(1.0, abs=1e-6)
    one = factorise(delta, 1)
    residual = float((delta.double() - (one.b @ one.a).double()).square().sum() / delta.double().square().sum())
    assert residual == pytest.approx(1 - one.energy, abs=1e-5)
    assert 0.5 < one.energy < 1.0
    assert factorise(delta, 8, threshold=0.999).rank == 2  # the rest of the spectrum is rounding noise
    values = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9/14, 13/14, 1
    assert [choose_rank(values, 4, t) for t in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]
    assert choose_rank(values, 2, 1.0) == 2


def test_randomised_factorisation_is_used_only_where_it_is_as_accurate() -> None:
    """On a decaying spectrum the randomised range finder keeps the exact SVD's energy and best approximation; on a
    flat one (a delta that is not low rank) the default falls back to the exact SVD, while forcing it loses energy."""
    generator = torch.Generator().manual_seed(0)
    decaying = sum(
        torch.randn(200, 4, generator=generator) @ torch.randn(4, 300, generator=generator) * 0.2**i for i in range(6)
    )
    flat = torch.randn(200, 300, generator=generator)
    exact, fast = factorise(decaying, 4, randomized=False), factorise(decaying, 4, randomized=True)
    assert fast.energy == pytest.approx(exact.energy, abs=1e-6)
    assert torch.allclose(fast.b @ fast.a, exact.b @ exact.a, atol=1e-4)
    kept = 1 - float((decaying - fast.b @ fast.a).square().sum() / decaying.square().sum())
    assert kept == pytest.approx(fast.energy, abs=1e-5)  # the reported energy is that of the factors returned
    forced, default, full = (factorise(flat, 4, randomized=r) for r in (True, None, False))
    assert forced.energy < full.energy - 1e-3
    assert default.energy == full.energy


def test_rank_2_extraction_of_a_bert_classifier_loads_back_as_the_fine_tune(bert_pair, tmp_path: Path) -> None:
    tuned, base, deltas = bert_pair
    out = tmp_path / "lora"
    result = _extract(tuned, base, out, 2)
    assert {m.name for m in result.modules} == set(deltas)
    assert all(m.rank == 2 and m.energy == pytest.approx(1.0, abs=1e-6) for m in result.modules)
    assert sorted(result.saved_whole) == ["bert.encoder.layer.0.output.LayerNorm", "classifier"]

    weights = load_file(out / "adapter_model.safetensors")
    for name, delta in deltas.items():
        a, b = weights[f"{PREFIX}{name}.lora_A.weight"], weights[f"{PREFIX}{name}.lora_B.weight"]
        assert a.shape == (2, delta.shape[1]) and b.shape == (delta.shape[0], 2)
        assert (b @ a - delta).abs().max() < 1e-5, name
    assert f"{PREFIX}bert.encoder.layer.1.intermediate.dense.base_layer.bias" in weights
    assert f"{PREFIX}classifier.weight" in weights

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 2
    assert sorted(config["target_modules"]) == sorted(deltas)
    assert config["base_model_name_or_path"] == str(base) and config["task_type"] == "SEQ_CLS"
    assert config["bias"] == "lora_only"
    report = json.loads((out / "extraction.json").read_text())
    assert report["modules"]["bert.pooler.dense"]["energy"] == pytest.approx(1.0, abs=1e-6)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "base_model_relation: adapter" in card and str(base) in card

    expected = _logits(BertForSequenceClassification.from_pretrained(tuned).eval(), "bert")
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), out).eval()
    assert torch.allclose(_logits(peft_model, "bert"), expected, atol=1e-5)


def test_gpt2_conv1d_layers_and_embeddings_load_back_as_the_fine_tune(gpt2_pair, tmp_path: Path) -> None:
    tuned, base, deltas = gpt2_pair
    out = tmp_path / "lora"
    result = _extract(tuned, base, out, 2)
    assert {m.name for m in result.modules} == set(deltas) and result.saved_whole == ["transformer.wpe"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    expected = _logits(GPT2LMHeadModel.from_pretrained(tuned).eval(), "gpt2")
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), out).eval()
    assert torch.allclose(_logits(peft_model, "gpt2"), expected, atol=1e-5)

    result = _extract(tuned, base, tmp_path / "embeddings", 2, embeddings=True)
    assert "transformer.wpe" in {m.name for m in result.modules} and not result.saved_whole
    weights = load_file(tmp_path / "embeddings" / "adapter_model.safetensors")
    assert weights[f"{PREFIX}transformer.wpe.lora_embedding_A"].shape == (2, 32)
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), tmp_path / "embeddings").eval()
    assert torch.allclose(_logits(peft_model, "gpt2"), expected, atol=1e-5)


def test_rank_1_keeps_the_reported_energy_and_thresholds_set_per_module_ranks(bert_pair, tmp_path: Path) -> None:
    tuned, base, deltas = bert_pair
    result = _extract(tuned, base, tmp_path / "r1", 1)
    weights = load_file(tmp_path / "r1" / "adapter_model.safetensors")
    for module in result.modules:
        delta = deltas[module.name].double()
        approx = (
            weights[f"{PREFIX}{module.name}.lora_B.weight"] @ weights[f"{PREFIX}{module.name}.lora_A.weight"]
        ).double()
        residual = float((delta - approx).square().sum() / delta.square().sum())
        assert residual == pytest.approx(1 - module.energy, abs=1e-5), module.name
        assert module.energy < 1.0

    result = _extract(tuned, base, tmp_path / "t", 4, rank_threshold=0.999)
    assert {m.rank for m in result.modules} == {2}
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == config["alpha_pattern"]
    assert set(config["rank_pattern"].values()) == {2}
    expected = _logits(BertForSequenceClassification.from_pretrained(tuned).eval(), "bert")
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), tmp_path / "t").eval()
    assert torch.allclose(_logits(peft_model, "bert"), expected, atol=1e-5)


def test_refusals_come_before_anything_is_written(bert_pair, gpt2_pair, tmp_path: Path) -> None:
    tuned, base, _ = bert_pair
    with pytest.raises(ParameterError, match=r"--rank 40 is larger than module 'bert\.encoder\..+' .*at most 32"):
        _extract(tuned, base, tmp_path / "big", 40)
    assert not (tmp_path / "big").exists()
    with pytest.raises(IncompatibleModelsError, match="tensor 'transformer"):
        _extract(gpt2_pair[0], base, tmp_path / "mixed", 2)
    assert not (tmp_path / "mixed").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _extract(tuned, base, existing, 2)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    _extract(tuned, base, existing, 2, overwrite=True)
    assert not (existing / "keep.txt").exists() and (existing / "adapter_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_writes_the_adapter_and_prints_a_summary(bert_pair, tmp_path: Path, capsys) -> None:
    tuned, base, _ = bert_pair
    out = tmp_path / "cli"
    argv = ["extract-lora", str(tuned), "--base", str(base), "--rank", "2", "--output", str(out), "-q"]
    assert main([*argv, "--exclude", "*.pooler.*"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA module(s) at rank 2" in printed and "lowest 1.0000" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert "bert.pooler.dense" not in config["target_modules"]
    assert main(argv) == 1  # the folder exists now
    assert "--overwrite" in capsys.readouterr().err
    assert main(["extract-lora", "org/model", "--base", str(base), "--rank", "2", "--output", str(tmp_path / "x")]) == 1
    assert "org/model was not found" in capsys.readouterr().err  # not a folder: a Hub id, looked up there


def test_cli_push_uploads_a_loadable_adapter(bert_pair, hub, tokens, repo_name: str, tmp_path: Path, capsys) -> None:
    tuned, base, _ = bert_pair
    out = tmp_path / "pushed"
    argv = ["extract-lora", str(tuned), "--base", str(base), "--rank", "2", "--output", str(out), "-q"]
    assert main([*argv, "--push", "bob/adapter", "--token", tokens["write"]]) == 1  # refused before any work
    assert "cannot create repos under 'bob'" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--push", repo_name, "--token", tokens["write"]]) == 0
    assert f"Pushed to {hub.endpoint}/{repo_name}" in capsys.readouterr().out
    downloaded = Path(snapshot_download(repo_name, token=tokens["read"], cache_dir=tmp_path / "cache"))
    assert sorted(p.name for p in downloaded.iterdir() if not p.name.startswith(".")) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", "extraction.json", "README.md"]
    )
    expected = _logits(BertForSequenceClassification.from_pretrained(tuned).eval(), "bert")
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), downloaded).eval()
    assert torch.allclose(_logits(peft_model, "bert"), expected, atol=1e-5)
    assert f'PeftModel.from_pretrained(base, "{repo_name}")' in (downloaded / "README.md").read_text()


def test_cli_reads_hub_models(bert_pair, hub, tokens, tmp_path: Path, capsys) -> None:
    """MODEL and --base may be Hub ids: downloaded like merge inputs, named by their ids in the adapter."""
    tuned, base, _ = bert_pair
    publish(hub, "fusion-lab/extract-tuned", tuned)
    publish(hub, "fusion-lab/extract-base", base)
    out = tmp_path / "from-hub"
    argv = ["extract-lora", "fusion-lab/extract-tuned", "--base", "fusion-lab/extract-base@main", "--rank", "2"]
    assert main([*argv, "--output", str(out), "-q"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "fusion-lab/extract-base"
    assert 'base_model: "fusion-lab/extract-base"' in (out / "README.md").read_text()
    expected = _logits(BertForSequenceClassification.from_pretrained(tuned).eval(), "bert")
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), out).eval()
    assert torch.allclose(_logits(peft_model, "bert"), expected, atol=1e-5)


def test_a_missing_gpu_is_refused_before_anything_is_written(bert_pair, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    tuned, base, _ = bert_pair
    with pytest.raises(RecipeError, match="no CUDA device is available"):
        _extract(tuned, base, tmp_path / "gpu", 2, device="cuda")
    assert not (tmp_path / "gpu").exists()


@pytest.mark.gpu
def test_extraction_on_a_gpu_matches_the_cpu(bert_pair, tmp_path: Path) -> None:
    tuned, base, _ = bert_pair
    on_cpu = _extract(tuned, base, tmp_path / "cpu", 2)
    on_gpu = _extract(tuned, base, tmp_path / "gpu", 2, device="cuda")
    assert [m.rank for m in on_gpu.modules] == [m.rank for m in on_cpu.modules]
    for cpu, gpu in zip(on_cpu.modules, on_gpu.modules):
        assert gpu.energy == pytest.approx(cpu.energy, abs=1e-5)
    expected = _logits(BertForSequenceClassification.from_pretrained(tuned).eval(), "bert")
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), tmp_path / "gpu").eval()
    assert torch.allclose(_logits(peft_model, "bert"), expected, atol=1e-4)
