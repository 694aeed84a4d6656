"""A tiny classification pool for model-wise methods: a BERT base, three fine-tuned classifiers with their own
heads, and train/test splits of tiny review datasets on the loopback Hub."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))
from task_helpers import perturb, review_texts, word_tokenizer  # noqa: E402

from modelwise_tasks import TASKS  # noqa: E402


@pytest.fixture(scope="session")
def cls_pool(tmp_path_factory, hub) -> Path:
    root = tmp_path_factory.mktemp("modelwise-pool")
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = BertModel.from_pretrained(root / "base")
    tasks = {}
    for i, name in enumerate(TASKS):
        task = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": 2}))
        task.bert.load_state_dict(base.state_dict())
        perturb(task, seed=20 + i, scale=0.05).save_pretrained(root / name)
        repo = f"fusion-lab/mw-{name}"
        files = {}
        for split, (n, seed) in {"train": (20, 30 + i), "test": (12, 40 + i)}.items():
            buffer = io.BytesIO()
            review_texts(n, seed=seed).to_parquet(buffer)
            files[f"data/{split}-00000-of-00001.parquet"] = buffer.getvalue()
        hub.state.create(repo, "dataset")
        hub.state.upload(repo, files, repo_type="dataset")
        tasks[name] = {"expert": str(root / name), "dataset": repo, "split": "test", "kind": "classification",
                       "task_type": "text-classification", "metric": "accuracy", "text": ["sentence"]}
    (root / "pool.yaml").write_text(yaml.safe_dump({"name": "tiny-modelwise", "base": str(root / "base"),
                                                    "heads": ["classifier.*"], "tasks": tasks}))
    return root
