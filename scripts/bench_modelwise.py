#!/usr/bin/env python
"""Time and peak memory of every model-wise method (and a data-free reference) on a task pool, one fresh
`hf-fusion merge` process per method.

Model-wise methods load whole models and run forward (and backward) passes, so their cost is compute, not the
tensor streaming that `scripts/bench_merge.py` measures. Reported, in one run:
  io floor        read every file of the base model and the experts once and write one base-sized output (no torch)
  import floor    starting Python and importing torch and transformers, which every method pays
  hf-fusion       `hf-fusion merge --pool POOL --method M` per method (fusion and save, no evaluation);
                  wall time, the process's own peak RSS (``os.wait4``) and the size of the fused folder

``--steps`` and ``--calibration-samples`` reach only the methods that take them; the rest run at their defaults
(FusionBench's). The page cache is warmed first, so every run reads from memory.

    HF_HUB_OFFLINE=1 python scripts/bench_modelwise.py --pool minilm-text3 --steps 200 \
        --markdown bench_results/modelwise.md --json bench_results/modelwise.json
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
from bench_merge import IO_FLOOR, Measurement, measure  # noqa: E402

METHODS = ("task_arithmetic,simple_ensemble,weighted_ensemble,max_model_predictor,fisher_merging,regmean,"
           "regmean_plusplus,task_wise_adamerging,layer_wise_adamerging,weight_ensembling_moe,"
           "sparse_weight_ensembling_moe,smile_upscaling,mixtral_upscaling,model_recombination")

# Runs in a child so that this process stays small (a forked child starts with its parent's resident set).
DESCRIBE = '''
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
'''


def folder_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="minilm-text3")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--steps", type=int, help="test-time adaptation steps (default: each method's own)")
    parser.add_argument("--calibration-samples", type=int, help="examples per task (default: each method's own)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    names = [m for m in args.methods.split(",") if m]
    described = subprocess.run([sys.executable, "-c", DESCRIBE, args.pool, ",".join(names)], check=True,
                               capture_output=True, text=True)
    info = json.loads(described.stdout.strip().splitlines()[-1])
    common = {"steps": args.steps, "calibration_samples": args.calibration_samples}
    scratch = Path(tempfile.mkdtemp(prefix="hf-fusion-modelwise-"))
    out_bytes = os.path.getsize(info["base_weights"])
    io_argv = [sys.executable, "-c", IO_FLOOR, *info["files"], str(scratch / "io.bin"), str(out_bytes)]
    subprocess.run(io_argv[:-1] + ["0"], check=True)  # warm the page cache
    results: list[tuple[Measurement, str, float]] = [
        (measure("io floor", "read pool + write output", info["experts"], io_argv), "", 0.0),
        (measure("import floor", "import torch, transformers", 0,
                 [sys.executable, "-c", "import torch, transformers"]), "", 0.0),
    ]
    for name in names:
        method = info["methods"][name]
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in common.items()
                 if value is not None and key in method["fields"]]
        out = scratch / name
        argv = [sys.executable, "-m", "hf_fusion", "merge", "--quiet", "--pool", args.pool, "--method", name,
                "--output", str(out), *flags]
        m = measure("hf-fusion", name, info["experts"], argv)
        results.append((m, method["data"], folder_megabytes(out) if out.exists() else 0.0))
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
        ratio = f"{m.seconds / reference:.1f}" if reference and m.name == "hf-fusion" else ""
        size_text = f"{size:.0f}" if size else ""
        lines.append(f"| {m.name} | {m.method} | {data} | {time_text} | {m.peak_rss_mb:.0f} | {size_text} | "
                     f"{m.seconds / floor:.0f} | {ratio} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{**asdict(m), "data": data, "fused_mb": round(size, 1)}
                                         for m, data, size in results], indent=2))
    return 0 if all(m.ok for m, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
