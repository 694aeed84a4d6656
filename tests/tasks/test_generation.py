"""Text-to-text (exact match, Spearman) and causal LM perplexity, against direct computations."""

from __future__ import annotations

import math
import re
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from scipy.stats import spearmanr
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from task_helpers import perturb, publish_dataset, review_texts

import hf_fusion
from hf_fusion.evaluation import evaluate_pool
from hf_fusion.catalog import get_pool
from hf_fusion.tasks.base import EvalSettings

PROMPT = "review : {sentence} is it positive or negative ?"
SIMILARITY = "first : {sentence1} second : {sentence2} how similar are they from 0 to 5 ?"


def train(model: T5ForConditionalGeneration, tokenizer, prompts: list[str], targets: list[str], seed: int,
          steps: int = 80) -> T5ForConditionalGeneration:
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
    return datasets.Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                                       "label": [r[2] for r in rows]})


@pytest.fixture(scope="module")
def t5_pool(tmp_path_factory, hub, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
    base = T5ForConditionalGeneration(config)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    reviews, pairs = review_texts(20, seed=4), similarity_pairs(20)
    examples = [
        ([PROMPT.format(sentence=s) for s in reviews["sentence"]], [["negative", "positive"][y] for y in reviews["label"]]),
        ([SIMILARITY.format(sentence1=a, sentence2=b) for a, b in zip(pairs["sentence1"], pairs["sentence2"])],
         [f"{y:.1f}" for y in pairs["label"]]),
    ]
    for i, (prompts, targets) in enumerate(examples):
        model = T5ForConditionalGeneration(config)
        model.load_state_dict(base.state_dict())
        train(model, tokenizer, prompts, targets, seed=30 + i).save_pretrained(root / f"ft{i}")
    publish_dataset(hub, "fusion-lab/t2t-reviews", reviews)
    publish_dataset(hub, "fusion-lab/t2t-pairs", pairs)
    tasks = {
        "sentiment": {"expert": str(root / "ft0"), "metric": "exact_match", "dataset": "fusion-lab/t2t-reviews",
                      "prompt": PROMPT, "targets": ["negative", "positive"]},
        "similarity": {"expert": str(root / "ft1"), "metric": "spearmanr", "dataset": "fusion-lab/t2t-pairs",
                       "prompt": SIMILARITY,
                       "targets": "{:.1f}"},
    }
    for fields in tasks.values():
        fields.update(kind="text_to_text", task_type="text2text-generation")
    (root / "pool.yaml").write_text(yaml.safe_dump({"base": str(root / "base"), "tasks": tasks}))
    return root


@torch.no_grad()
def generations(folder: Path, tokenizer, prompts: list[str]) -> list[str]:
    model = T5ForConditionalGeneration.from_pretrained(folder).eval()
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    return tokenizer.batch_decode(model.generate(**encoded, max_new_tokens=8, do_sample=False), skip_special_tokens=True)


def test_text_to_text(t5_pool: Path, tokenizer, tmp_path: Path) -> None:
    result = hf_fusion.merge(pool=str(t5_pool / "pool.yaml"), method="task_arithmetic", scaling_factor=0.5,
                             output=tmp_path / "fused", evaluate=EvalSettings(metrics="bundled", batch_size=32),
                             show_progress=False)
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


def test_causal_lm_perplexity(hub, tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        bos_token_id=2, eos_token_id=3)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    perturb(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), seed=5).save_pretrained(tmp_path / "ft")
    texts = ["the cat sat on the mat", "the dog ran fast", "a good movie", "the cat ran on the mat ."]
    publish_dataset(hub, "fusion-lab/lm-text", datasets.Dataset.from_dict({"text": texts}))
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"base": str(tmp_path / "base"), "tasks": {"lm": {
        "expert": str(tmp_path / "ft"), "kind": "causal_lm", "task_type": "text-generation", "metric": "perplexity",
        "dataset": "fusion-lab/lm-text", "text": ["text"]}}}))
    report = evaluate_pool(get_pool(str(pool)), {"candidate": tmp_path / "ft"}, settings=EvalSettings(batch_size=3),
                           show_progress=False)
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "ft").eval()
    nll = tokens = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            nll += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert report.results[0].scores["candidate"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert report.results[0].scores["individual"] == report.results[0].scores["candidate"]
