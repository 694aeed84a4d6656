"""Helpers for the task tests: a word-level tokenizer, perturbations, and tiny datasets on the loopback Hub."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import torch
import yaml
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

WORDS = (
    "a photo of the color red green blue an image showing picture good bad movie review is it positive "
    "negative yes no great awful film plot reply how similar are they from 0 to 5 first second story text "
    "the cat sat on mat dog ran fast"
).split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with BOS/EOS/PAD/UNK, loadable by AutoTokenizer."""
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS) | {".", ",", "?", ":", "'"}))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", pair="[BOS] $A [EOS] $B:1 [EOS]:1", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def publish_dataset(hub, repo_id: str, dataset: datasets.Dataset, split: str = "test") -> str:
    """Puts a dataset on the loopback Hub as one parquet file (what load_dataset reads for real)."""
    return publish_splits(hub, repo_id, {split: dataset})


def publish_splits(hub, repo_id: str, splits: dict[str, datasets.Dataset]) -> str:
    """Puts a dataset with several splits on the loopback Hub, one parquet file per split."""
    files = {}
    for split, dataset in splits.items():
        buffer = io.BytesIO()
        dataset.to_parquet(buffer)
        files[f"data/{split}-00000-of-00001.parquet"] = buffer.getvalue()
    hub.state.create(repo_id, "dataset")
    hub.state.upload(repo_id, files, repo_type="dataset")
    return repo_id


def tiny_bert_classifiers(root: Path, tokenizer: PreTrainedTokenizerFast, experts: dict[str, int]) -> None:
    """A tiny BERT base in ``root/base`` (with the tokenizer) and, per ``folder: seed``, a two-class classifier
    fine-tuned from it (a seeded perturbation; its own head)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = BertModel.from_pretrained(root / "base")
    for folder, seed in experts.items():
        task = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": 2}))
        task.bert.load_state_dict(base.state_dict())
        perturb(task, seed=seed, scale=0.05).save_pretrained(root / folder)


def color_images(n: int, seed: int) -> datasets.Dataset:
    """Noisy solid-colour squares labelled red/green/blue."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % 3
        pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        pixels[..., label] += 180
        images.append(Image.fromarray(pixels))
        labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "green", "blue"])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def review_texts(n: int, seed: int) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    good, bad = ["good movie", "great film", "good plot"], ["bad movie", "awful film", "bad plot"]
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        texts.append(str(rng.choice(good if label else bad)) + " review")
        labels.append(label)
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    return datasets.Dataset.from_dict({"sentence": texts, "label": labels}, features=features)


def tiny_gpt2_pool(
    root: Path, hub, tokenizer: PreTrainedTokenizerFast, corpora: dict[str, list[str]], prefix: str
) -> Path:
    """A tiny GPT-2 base in ``root/base`` and, per ``task: texts``, a language model fine-tuned from it (a seeded
    perturbation) with its texts as a dataset on the loopback Hub (``fusion-lab/<prefix>-<task>``); returns the pool
    file, whose tasks score perplexity and calibrate on their test split."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tasks = {}
    for i, (name, texts) in enumerate(corpora.items()):
        perturb(GPT2LMHeadModel.from_pretrained(root / "base"), seed=7 + i).save_pretrained(root / name)
        publish_dataset(hub, f"fusion-lab/{prefix}-{name}", datasets.Dataset.from_dict({"text": texts}))
        tasks[name] = {
            "expert": str(root / name),
            "kind": "causal_lm",
            "task_type": "text-generation",
            "metric": "perplexity",
            "dataset": f"fusion-lab/{prefix}-{name}",
            "text": ["text"],
            "calibration_split": "test",
        }
    pool = root / "pool.yaml"
    pool.write_text(yaml.safe_dump({"base": str(root / "base"), "tasks": tasks}))
    return pool
