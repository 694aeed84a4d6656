"""Time AdaMerging (task- and layer-wise) and WEMoE per test-time step on CPU and, where present, on a GPU.

The pool is built locally so the script runs anywhere without the Hub or the demo data: an all-MiniLM-L6-v2-shaped
BERT base (384 wide, 6 layers), three classifiers fine-tuned from it (Gaussian noise on every weight, own heads) and
random word sentences as each task's unlabelled test split. Each method runs ``--steps`` steps through
``hf_fusion.merge`` (load, adapt, save), once untimed to warm up; the report gives seconds per step and the
GPU/CPU ratio.

    python scripts/bench_adaptation.py --steps 50 --devices cpu,cuda --out bench_results/adaptation.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import yaml

METHODS = ("task_wise_adamerging", "layer_wise_adamerging", "weight_ensembling_moe")
WORDS = "the a movie film plot story good bad great awful news sport tech money game team win lose market".split()


def build_pool(root: Path, num_tasks: int = 3, examples: int = 256) -> Path:
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = BertModel.from_pretrained(root / "base")
    rng = random.Random(0)
    tasks = {}
    for t in range(num_tasks):
        model = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": 3 + t}))
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(root / f"task{t}")
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(8, 48))) for _ in range(examples)]
        data = datasets.Dataset.from_dict({"text": texts, "label": [i % (3 + t) for i in range(examples)]})
        (root / f"data{t}" / "data").mkdir(parents=True)
        data.to_parquet(str(root / f"data{t}" / "data" / "test-00000-of-00001.parquet"))
        tasks[f"task{t}"] = {
            "expert": str(root / f"task{t}"),
            "dataset": str(root / f"data{t}"),
            "split": "test",
            "kind": "classification",
            "task_type": "text-classification",
            "metric": "accuracy",
            "text": ["text"],
        }
    pool = root / "pool.yaml"
    pool.write_text(
        yaml.safe_dump({"name": "minilm-shaped", "base": str(root / "base"), "heads": ["classifier.*"], "tasks": tasks})
    )
    return pool


def time_method(pool: Path, method: str, device: str, steps: int, out: Path) -> float:
    import hf_fusion

    hf_fusion.merge(
        pool=str(pool),
        method=method,
        output=out / f"warm-{method}-{device}",
        device=device,
        steps=2,
        overwrite=True,
        show_progress=False,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    hf_fusion.merge(
        pool=str(pool),
        method=method,
        output=out / f"{method}-{device}",
        device=device,
        steps=steps,
        overwrite=True,
        show_progress=False,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="bench_results/adaptation.json")
    args = parser.parse_args()
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = build_pool(root)
        for method in args.methods.split(","):
            for device in devices:
                total = time_method(pool, method, device, args.steps, root)
                # the same run with 0 steps isolates the fixed cost (loading, task vectors, saving)
                fixed = time_method(pool, method, device, 0, root)
                per_step = (total - fixed) / args.steps
                results.setdefault(method, {})[device] = per_step
                print(
                    f"{method:24s} {device:5s} total {total:7.2f} s, fixed {fixed:6.2f} s, "
                    f"{per_step * 1000:8.1f} ms/step",
                    flush=True,
                )
    summary = {
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "seconds_per_step": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
