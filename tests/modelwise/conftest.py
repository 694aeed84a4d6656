"""A tiny classification pool for model-wise methods: a BERT base, three fine-tuned classifiers with their own
heads, and train/test splits of tiny review datasets on the loopback Hub."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))
from modelwise_tasks import TASKS  # noqa: E402
from task_helpers import publish_splits, review_texts, tiny_bert_classifiers, word_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def cls_pool(tmp_path_factory, hub) -> Path:
    root = tmp_path_factory.mktemp("modelwise-pool")
    tiny_bert_classifiers(root, word_tokenizer(), {name: 20 + i for i, name in enumerate(TASKS)})
    tasks = {}
    for i, name in enumerate(TASKS):
        repo = publish_splits(
            hub,
            f"fusion-lab/mw-{name}",
            {"train": review_texts(20, seed=30 + i), "test": review_texts(12, seed=40 + i)},
        )
        tasks[name] = {
            "expert": str(root / name),
            "dataset": repo,
            "split": "test",
            "kind": "classification",
            "task_type": "text-classification",
            "metric": "accuracy",
            "text": ["sentence"],
        }
    (root / "pool.yaml").write_text(
        yaml.safe_dump(
            {"name": "tiny-modelwise", "base": str(root / "base"), "heads": ["classifier.*"], "tasks": tasks}
        )
    )
    return root
