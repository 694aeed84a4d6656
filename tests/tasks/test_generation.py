"""Text-to-text (exact match, Spearman) and causal LM perplexity, against direct computations."""

from __future__ import annotations

import math
import re
import string
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from scipy.stats import spearmanr
from task_helpers import perturb, publish_dataset, review_texts, tiny_gpt2_pool
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

import hf_fusion
from hf_fusion.catalog import get_pool
from hf_fusion.errors import FusionError
from hf_fusion.tasks.base import EvalSettings
from hf_fusion.tasks.evaluate import evaluate_pool

PROMPT = "review : {sentence} is it positive or negative ?"
SIMILARITY = "first : {sentence1} second : {sentence2} how similar are they from 0 to 5 ?"


def train(
    model: T5ForConditionalGeneration, tokenizer, prompts: list[str], targets: list[str], seed: int, steps: int = 80
) -> T5ForConditionalGeneration:
    """A few seconds of training, so the expert really answers its task (random models emit junk)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs = tokenizer(prompts, padding=True, return_tensors="pt")
    labels = tokenizer(targets, padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def similarity_pairs(n: int) -> datasets.Dataset:
    words = ["good movie", "bad movie", "great film", "awful film", "the cat sat", "the dog ran"]
    rows = [(words[i % 6], words[(i * 5 + 1) % 6], float((i * 7) % 6)) for i in range(n)]
    return datasets.Dataset.from_dict(
        {"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows], "label": [r[2] for r in rows]}
    )


@pytest.fixture(scope="module")
def t5_pool(tmp_path_factory, hub, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=3,
    )
    base = T5ForConditionalGeneration(config)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    reviews, pairs = review_texts(20, seed=4), similarity_pairs(20)
    examples = [
        (
            [PROMPT.format(sentence=s) for s in reviews["sentence"]],
            [["negative", "positive"][y] for y in reviews["label"]],
        ),
        (
            [SIMILARITY.format(sentence1=a, sentence2=b) for a, b in zip(pairs["sentence1"], pairs["sentence2"])],
            [f"{y:.1f}" for y in pairs["label"]],
        ),
    ]
    for i, (prompts, targets) in enumerate(examples):
        model = T5ForConditionalGeneration(config)
        model.load_state_dict(base.state_dict())
        train(model, tokenizer, prompts, targets, seed=30 + i).save_pretrained(root / f"ft{i}")
    publish_dataset(hub, "fusion-lab/t2t-reviews", reviews)
    publish_dataset(hub, "fusion-lab/t2t-pairs", pairs)
    tasks = {
        "sentiment": {
            "expert": str(root / "ft0"),
            "metric": "exact_match",
            "dataset": "fusion-lab/t2t-reviews",
            "prompt": PROMPT,
            "targets": ["negative", "positive"],
        },
        "similarity": {
            "expert": str(root / "ft1"),
            "metric": "spearmanr",
            "dataset": "fusion-lab/t2t-pairs",
            "prompt": SIMILARITY,
            "targets": "{:.1f}",
        },
    }
    for fields in tasks.values():
        fields.update(kind="text_to_text", task_type="text2text-generation", calibration_split="test")
    (root / "pool.yaml").write_text(yaml.safe_dump({"base": str(root / "base"), "tasks": tasks}))
    return root


@torch.no_grad()
def generations(folder: Path, tokenizer, prompts: list[str]) -> list[str]:
    model = T5ForConditionalGeneration.from_pretrained(folder).eval()
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    return tokenizer.batch_decode(
        model.generate(**encoded, max_new_tokens=8, do_sample=False), skip_special_tokens=True
    )


def test_text_to_text(t5_pool: Path, tokenizer, tmp_path: Path) -> None:
    result = hf_fusion.merge(
        pool=str(t5_pool / "pool.yaml"),
        method="task_arithmetic",
        scaling_factor=0.5,
        output=tmp_path / "fused",
        evaluate=EvalSettings(metrics="bundled", batch_size=32),
        show_progress=False,
    )
    sentiment, similarity = result.evaluation.results
    assert sentiment.scores["individual"] > 0.5 and similarity.scores["individual"] is not None  # trained experts
    reviews, pairs = review_texts(20, seed=4), similarity_pairs(20)
    folders = {"fused": tmp_path / "fused", "pretrained": t5_pool / "base"}
    for label, folder in {**folders, "individual": t5_pool / "ft0"}.items():
        texts = generations(folder, tokenizer, [PROMPT.format(sentence=s) for s in reviews["sentence"]])
        targets = [["negative", "positive"][y] for y in reviews["label"]]
        expected = sum(t.strip().lower().strip("?.,: ") == g for t, g in zip(texts, targets)) / len(targets)
        assert sentiment.scores[label] == pytest.approx(expected), label
    for label, folder in {**folders, "individual": t5_pool / "ft1"}.items():
        prompts = [SIMILARITY.format(sentence1=a, sentence2=b) for a, b in zip(pairs["sentence1"], pairs["sentence2"])]
        numbers = [re.search(r"-?\d+(?:\.\d+)?", t) for t in generations(folder, tokenizer, prompts)]
        predicted = [float(m.group()) if m else 0.0 for m in numbers]
        expected = spearmanr(predicted, list(pairs["label"])).statistic
        got = similarity.scores[label]  # undefined (constant predictions) is recorded as None
        assert (got is None and math.isnan(expected)) or got == pytest.approx(expected), label


@torch.no_grad()
def ensemble_answers(folders: list[Path], tokenizer, prompts: list[str], end: int = 3) -> list[str]:
    """Greedy decoding on the mean of the members' next-token logits: the ensemble, computed from its members."""
    members = [T5ForConditionalGeneration.from_pretrained(f).eval() for f in folders]
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    decoded = torch.zeros((len(prompts), 1), dtype=torch.long)  # decoder_start_token_id
    for _ in range(8):
        logits = torch.stack([m(**encoded, decoder_input_ids=decoded).logits[:, -1] for m in members]).mean(dim=0)
        decoded = torch.cat([decoded, logits.argmax(dim=-1)[:, None]], dim=1)
    texts = []
    for row in decoded[:, 1:].tolist():
        texts.append(tokenizer.decode(row[: row.index(end)] if end in row else row, skip_special_tokens=True))
    return texts


def test_an_ensemble_of_text_to_text_models_answers_with_the_mean_logits(
    t5_pool: Path, tokenizer, tmp_path: Path
) -> None:
    result = hf_fusion.merge(
        pool=str(t5_pool / "pool.yaml"),
        method="simple_ensemble",
        output=tmp_path / "ens",
        evaluate=EvalSettings(metrics="bundled", batch_size=7),
        show_progress=False,
    )
    reviews = review_texts(20, seed=4)
    answers = ensemble_answers(
        [t5_pool / "ft0", t5_pool / "ft1"], tokenizer, [PROMPT.format(sentence=s) for s in reviews["sentence"]]
    )
    targets = [["negative", "positive"][y] for y in reviews["label"]]
    # exact match as the metric defines it: case and punctuation removed, then compared whole (". negative" misses)
    normalised = [a.strip().lower().translate(str.maketrans("", "", string.punctuation)) for a in answers]
    expected = sum(a == t for a, t in zip(normalised, targets)) / len(targets)
    assert result.evaluation.results[0].scores["fused"] == pytest.approx(expected)


def test_data_driven_methods_fuse_text_to_text_models(t5_pool: Path, tmp_path: Path, monkeypatch) -> None:
    from hf_fusion.tasks.base import TaskContext
    from hf_fusion.tasks.text_to_text import TextToText
    from hf_fusion.tasks.weights import ModelUnderTest

    pool = get_pool(str(t5_pool / "pool.yaml"))
    sentiment, similarity = (
        TextToText(
            spec,
            TaskContext(t5_pool / "base", ModelUnderTest(spec.name, t5_pool / f"ft{i}"), ()),
            EvalSettings(batch_size=4),
        )
        for i, spec in enumerate(pool.tasks)
    )
    inputs = sentiment.encode(sentiment.data[:4])
    model = T5ForConditionalGeneration.from_pretrained(t5_pool / "ft0").eval()
    with torch.no_grad():
        full = model(**inputs, decoder_input_ids=torch.zeros((4, 1), dtype=torch.long)).logits[:, 0]
        first = [ids[0] for ids in sentiment.tokenizer(["negative", "positive"], add_special_tokens=False)["input_ids"]]
        torch.testing.assert_close(sentiment.logits(model, inputs), full[:, first])  # class logits, as a classifier's
        assert similarity.logits(model, similarity.encode(similarity.data[:4])).shape[-1] == model.config.vocab_size

    for method, params in {
        "regmean": {"calibration_samples": 6},
        "layer_wise_adamerging": {"steps": 2},
        "weight_ensembling_moe": {"steps": 2},
    }.items():
        result = hf_fusion.merge(
            pool=str(t5_pool / "pool.yaml"),
            method=method,
            output=tmp_path / method,
            evaluate=EvalSettings(metrics="bundled", batch_size=8),
            show_progress=False,
            **params,
        )
        assert result.evaluation.results[0].scores["fused"] is not None, method
    assert T5ForConditionalGeneration.from_pretrained(tmp_path / "regmean").config.d_model == 32
    with pytest.raises(FusionError, match="encoder-decoder"):
        hf_fusion.merge(
            pool=str(t5_pool / "pool.yaml"), method="regmean_plusplus", output=tmp_path / "rpp", show_progress=False
        )
    monkeypatch.setattr("hf_fusion.methods.fisher_merging.MAX_CLASSES", 10)  # the tiny vocabulary stands for 32k
    with pytest.raises(FusionError, match="one backward pass per class"):
        hf_fusion.merge(
            pool=str(t5_pool / "pool.yaml"),
            method="fisher_merging",
            calibration_samples=2,
            output=tmp_path / "fisher",
            show_progress=False,
        )
    assert not (tmp_path / "rpp").exists() and not (tmp_path / "fisher").exists()


def test_causal_lm_perplexity(hub, tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=2, eos_token_id=3
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    perturb(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), seed=5).save_pretrained(tmp_path / "ft")
    texts = ["the cat sat on the mat", "the dog ran fast", "a good movie", "the cat ran on the mat ."]
    publish_dataset(hub, "fusion-lab/lm-text", datasets.Dataset.from_dict({"text": texts}))
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        yaml.safe_dump(
            {
                "base": str(tmp_path / "base"),
                "tasks": {
                    "lm": {
                        "expert": str(tmp_path / "ft"),
                        "kind": "causal_lm",
                        "task_type": "text-generation",
                        "metric": "perplexity",
                        "dataset": "fusion-lab/lm-text",
                        "text": ["text"],
                    }
                },
            }
        )
    )
    report = evaluate_pool(
        get_pool(str(pool)), {"candidate": tmp_path / "ft"}, settings=EvalSettings(batch_size=3), show_progress=False
    )
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "ft").eval()
    nll = tokens = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            nll += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert report.results[0].scores["candidate"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert report.results[0].scores["individual"] == report.results[0].scores["candidate"]


def test_data_driven_methods_fuse_language_models(hub, tokenizer, tmp_path: Path) -> None:
    corpora = {
        "cats": ["the cat sat on the mat", "a cat ran", "the cat sat"],
        "films": ["a good movie", "the bad film", "a great film ."],
    }
    pool = tiny_gpt2_pool(tmp_path, hub, tokenizer, corpora, "lm")

    result = hf_fusion.merge(
        pool=str(pool),
        method="simple_ensemble",
        output=tmp_path / "ens",
        evaluate=EvalSettings(batch_size=2),
        show_progress=False,
    )
    members = [GPT2LMHeadModel.from_pretrained(tmp_path / name).eval() for name in corpora]
    nll = tokens = 0.0
    with torch.no_grad():
        for text in corpora["cats"]:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            logits = torch.stack([m(ids).logits for m in members]).mean(dim=0)[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            tokens += ids.shape[1] - 1
    assert result.evaluation.results[0].scores["fused"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)

    for method, params in {
        "regmean_plusplus": {"calibration_samples": 3},
        "layer_wise_adamerging": {"steps": 2},
        "weight_ensembling_moe": {"steps": 2},
    }.items():
        result = hf_fusion.merge(
            pool=str(pool),
            method=method,
            output=tmp_path / method,
            show_progress=False,
            evaluate=EvalSettings(batch_size=2),
            **params,
        )
        assert all(math.isfinite(r.scores["fused"]) for r in result.evaluation.results), method
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "layer_wise_adamerging")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
