"""Tiny models with tokenizers and image processors, and tiny datasets on the loopback Hub, for every task kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from task_helpers import publish_dataset, review_texts, tiny_bert_classifiers, word_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="session")
def text_pool(tmp_path_factory, hub, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("text-heads")
    tiny_bert_classifiers(root, tokenizer, {"ft0": 10, "ft1": 11})
    publish_dataset(hub, "fusion-lab/reviews-a", review_texts(24, seed=1))
    publish_dataset(hub, "fusion-lab/reviews-b", review_texts(24, seed=2), split="validation")
    tasks = {
        "reviews_a": {"expert": str(root / "ft0"), "dataset": "fusion-lab/reviews-a", "split": "test"},
        "reviews_b": {"expert": str(root / "ft1"), "dataset": "fusion-lab/reviews-b", "split": "validation"},
    }
    for fields in tasks.values():
        fields.update(kind="classification", task_type="text-classification", metric="accuracy", text=["sentence"])
    (root / "pool.yaml").write_text(
        yaml.safe_dump({"name": "tiny-text", "base": str(root / "base"), "heads": ["classifier.*"], "tasks": tasks})
    )
    return root
