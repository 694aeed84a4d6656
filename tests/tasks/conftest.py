"""Tiny models with tokenizers and image processors, and tiny datasets on the loopback Hub, for every task kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

from task_helpers import perturb, publish_dataset, review_texts, word_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="session")
def text_pool(tmp_path_factory, hub, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("text-heads")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = BertModel.from_pretrained(root / "base")
    for i, labels in enumerate((2, 2)):
        task = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": labels}))
        task.bert.load_state_dict(base.state_dict())
        perturb(task, seed=10 + i, scale=0.05).save_pretrained(root / f"ft{i}")
    publish_dataset(hub, "fusion-lab/reviews-a", review_texts(24, seed=1))
    publish_dataset(hub, "fusion-lab/reviews-b", review_texts(24, seed=2), split="validation")
    tasks = {
        "reviews_a": {"expert": str(root / "ft0"), "dataset": "fusion-lab/reviews-a", "split": "test"},
        "reviews_b": {"expert": str(root / "ft1"), "dataset": "fusion-lab/reviews-b", "split": "validation"},
    }
    for fields in tasks.values():
        fields.update(kind="classification", task_type="text-classification", metric="accuracy", text=["sentence"])
    (root / "pool.yaml").write_text(yaml.safe_dump({"name": "tiny-text", "base": str(root / "base"),
                                                    "heads": ["classifier.*"], "tasks": tasks}))
    return root
