#!/usr/bin/env python
"""Time and peak memory of every model-wise method (and a data-free reference) on a task pool, one fresh
`hf-fusion merge` process per method.

Model-wise methods load whole models and run forward (and backward) passes, so their cost is compute, not the
tensor streaming that `scripts/bench_merge.py` measures. Reported, in one run:
  io floor        read every file of the base model and the experts once and write one base-sized output (no torch)
  import floor    starting Python and importing torch and transformers, which every method pays
  hf-fusion       `hf-fusion merge --pool POOL --method M` per method (fusion and save, no evaluation);
                  wall time, the process's own peak RSS (``os.wait4``) and the size of the fused folder
  fusion_bench    FusionBench's RegMean (its generic algorithm with its GPT-2 hook loop, bound to BERT classifiers:
                  nn.Linear modules, each task's own head), if --fusion-bench-python points at a venv with fusion-bench.
                  FusionBench takes dense models and tokenised datasets, so they are prepared first, untimed:
                  each LoRA expert merged into a full classifier (peft), each task's calibration examples (the same
                  seeded subset hf-fusion reads) tokenised to one length. Its timing therefore leaves out the LoRA
                  densification and tokenisation that hf-fusion's includes.

``--steps`` and ``--calibration-samples`` reach only the methods that take them; the rest run at their defaults
(FusionBench's). The page cache is warmed first, so every run reads from memory.

    HF_HUB_OFFLINE=1 python scripts/bench_modelwise.py --pool minilm-text3 --steps 200 \
        --markdown bench_results/modelwise.md --json bench_results/modelwise.json \
        [--fusion-bench-python .bench/fusion_bench/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import IO_FLOOR, Measurement, measure, write_report  # noqa: E402

METHODS = (
    "task_arithmetic,simple_ensemble,weighted_ensemble,max_model_predictor,fisher_merging,regmean,"
    "regmean_plusplus,task_wise_adamerging,layer_wise_adamerging,weight_ensembling_moe,"
    "sparse_weight_ensembling_moe,smile_upscaling,mixtral_upscaling,model_recombination"
)

# Runs in a child so that this process stays small (a forked child starts with its parent's resident set).
DESCRIBE = """
import json, os, sys
from hf_fusion.catalog import get_pool, resolve_builtin
from hf_fusion.registry import get_method
pool = get_pool(sys.argv[1])
folders = [resolve_builtin(pool.base)] + [resolve_builtin(ref) for ref in pool.experts.values()]
files = [os.path.join(root, name) for folder in folders for root, _, names in os.walk(folder) for name in names
         if not name.startswith(".")]
methods = {}
for name in sys.argv[2].split(","):
    method = get_method(name)
    methods[name] = {"fields": sorted(method.params_model.model_fields), "data": str(method.data.value)}
print(json.dumps({"files": files, "base_weights": os.path.join(folders[0], "model.safetensors"),
                  "experts": len(pool.experts), "methods": methods}))
"""


# Prepares FusionBench's inputs (hf-fusion venv): dense classifiers and tokenised calibration sets, per task.
PREPARE_FOR_FUSION_BENCH = """
import json, sys
from pathlib import Path
from peft import PeftModel
from transformers import AutoTokenizer, BertForSequenceClassification
from hf_fusion.catalog import get_pool, resolve_builtin
from hf_fusion.tasks.data import load_examples
pool, out, samples = get_pool(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
base = resolve_builtin(pool.base)
tokenizer = AutoTokenizer.from_pretrained(base)
BertForSequenceClassification.from_pretrained(base, num_labels=2).bert.save_pretrained(out / "base")
tasks = {}
for spec in pool.tasks:
    folder = resolve_builtin(pool.experts[spec.name])
    labels = json.loads((Path(folder) / "config.json").read_text())["id2label"]
    classifier = BertForSequenceClassification.from_pretrained(base, num_labels=len(labels))
    PeftModel.from_pretrained(classifier, folder).merge_and_unload().save_pretrained(out / spec.name)
    data = load_examples(spec.model_copy(update={"split": spec.calibration_split}), limit=samples)
    encoded = tokenizer(list(data[spec.text[0]]), padding="longest", truncation=True, max_length=spec.max_length)
    import datasets
    datasets.Dataset.from_dict({k: encoded[k] for k in ("input_ids", "attention_mask")}).save_to_disk(
        str(out / f"{spec.name}-calibration"))
    tasks[spec.name] = spec.max_length
print(json.dumps(sorted(tasks)))
"""

# Runs FusionBench's RegMean (fusion-bench venv) on the prepared models; saves the merged backbone.
FUSION_BENCH_REGMEAN = '''
import sys
from pathlib import Path
import datasets
from torch import nn
from transformers import BertForSequenceClassification, BertModel
from fusion_bench.method.regmean.gpt2_regmean import RegMeanAlgorithmForGPT2
from fusion_bench.modelpool import BaseModelPool

root, out, tasks, samples = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])


class RegMeanForBert(RegMeanAlgorithmForGPT2):
    """FusionBench's hook loop and closed form; only the module type and the task heads are BERT's."""
    _include_module_type = [nn.Linear]

    def on_regmean_start(self):
        for name in self.modelpool.model_names:
            classifier = BertForSequenceClassification.from_pretrained(root / name).requires_grad_(False)
            classifier.bert = None
            self.classifiers[name] = classifier.to(self.fabric.device)

    def compute_logits(self, module, batch, task):
        self.classifiers[task].bert = module
        return self.classifiers[task](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class PreparedPool(BaseModelPool):
    """FusionBench's pool with datasets given as objects (its own loader instantiates configs)."""

    def load_train_dataset(self, dataset_name, *args, **kwargs):
        return self._train_datasets[dataset_name]


models = {"_pretrained_": BertModel.from_pretrained(root / "base")}
models.update({t: BertForSequenceClassification.from_pretrained(root / t).bert for t in tasks})
train = {t: datasets.load_from_disk(str(root / f"{t}-calibration")).with_format("torch") for t in tasks}
pool = PreparedPool(models=models, train_datasets=train)
algorithm = RegMeanForBert(num_regmean_examples=samples, exclude_param_names_regex=[], reduce_non_diagonal_ratio=0.95,
                           weight_transpose=True, cache_dir=str(root / "cache"), batch_size=16, num_workers=0)
algorithm.run(pool).save_pretrained(out)
'''


def folder_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="minilm-text3")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--steps", type=int, help="test-time adaptation steps (default: each method's own)")
    parser.add_argument("--calibration-samples", type=int, help="examples per task (default: each method's own)")
    parser.add_argument("--fusion-bench-python", type=Path, help="a venv's python with fusion-bench installed")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    names = [m for m in args.methods.split(",") if m]
    described = subprocess.run(
        [sys.executable, "-c", DESCRIBE, args.pool, ",".join(names)], check=True, capture_output=True, text=True
    )
    info = json.loads(described.stdout.strip().splitlines()[-1])
    common = {"steps": args.steps, "calibration_samples": args.calibration_samples}
    scratch = Path(tempfile.mkdtemp(prefix="hf-fusion-modelwise-"))
    out_bytes = os.path.getsize(info["base_weights"])
    io_argv = [sys.executable, "-c", IO_FLOOR, *info["files"], str(scratch / "io.bin"), str(out_bytes)]
    subprocess.run(io_argv[:-1] + ["0"], check=True)  # warm the page cache
    results: list[tuple[Measurement, str, float]] = [
        (measure("io floor", "read pool + write output", info["experts"], io_argv), "", 0.0),
        (
            measure(
                "import floor", "import torch, transformers", 0, [sys.executable, "-c", "import torch, transformers"]
            ),
            "",
            0.0,
        ),
    ]
    for name in names:
        method = info["methods"][name]
        flags = [
            f"--{key.replace('_', '-')}={value}"
            for key, value in common.items()
            if value is not None and key in method["fields"]
        ]
        out = scratch / name
        argv = [
            sys.executable,
            "-m",
            "hf_fusion",
            "merge",
            "--quiet",
            "--pool",
            args.pool,
            "--method",
            name,
            "--output",
            str(out),
            *flags,
        ]
        m = measure("hf-fusion", name, info["experts"], argv)
        results.append((m, method["data"], folder_megabytes(out) if out.exists() else 0.0))
    if args.fusion_bench_python and "regmean" in names:
        samples = args.calibration_samples or 256
        prepared = subprocess.run(
            [sys.executable, "-c", PREPARE_FOR_FUSION_BENCH, args.pool, str(scratch / "fb"), str(samples)],
            check=True,
            capture_output=True,
            text=True,
        )
        tasks = json.loads(prepared.stdout.strip().splitlines()[-1])
        out = scratch / "fb-regmean"
        m = measure(
            "fusion_bench",
            "regmean",
            info["experts"],
            [
                str(args.fusion_bench_python),
                "-c",
                FUSION_BENCH_REGMEAN,
                str(scratch / "fb"),
                str(out),
                ",".join(tasks),
                str(samples),
            ],
        )
        results.append((m, info["methods"]["regmean"]["data"], folder_megabytes(out) if out.exists() else 0.0))
    subprocess.run(["rm", "-rf", str(scratch)], check=True)

    floor = results[0][0].seconds
    reference = next((m.seconds for m, _, _ in results if m.method == "task_arithmetic" and m.ok), None)
    settings = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in common.items() if v is not None) or "defaults"
    lines = [
        f"Pool {args.pool} ({info['experts']} experts), {settings}; {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}. One fresh `hf-fusion merge` process per method (fusion and save, no "
        "evaluation); wall time includes interpreter start and imports, peak RSS is the process's own maximum.",
        "",
        "| tool | method | data | wall time (s) | peak RSS (MB) | fused folder (MB) | x I/O floor | x task_arithmetic |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for m, data, size in results:
        time_text = f"{m.seconds:.2f}" if m.ok else f"failed ({m.note})"
        ratio = f"{m.seconds / reference:.1f}" if reference and m.name in ("hf-fusion", "fusion_bench") else ""
        size_text = f"{size:.0f}" if size else ""
        lines.append(
            f"| {m.name} | {m.method} | {data} | {time_text} | {m.peak_rss_mb:.0f} | {size_text} | "
            f"{m.seconds / floor:.0f} | {ratio} |"
        )
    write_report(
        lines,
        [{**asdict(m), "data": data, "fused_mb": round(size, 1)} for m, data, size in results],
        args.markdown,
        args.json,
    )
    return 0 if all(m.ok for m, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
