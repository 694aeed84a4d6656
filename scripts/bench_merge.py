#!/usr/bin/env python
"""Benchmark `hf-fusion merge` on a BERT-base-sized workload against the I/O floor and peer tools.

Every measurement runs in a fresh process; wall time includes interpreter start and imports, peak memory is the
child's own maximum resident set (``os.wait4``). The page cache is warmed first, so every run reads from memory.

Reported, in one run:
  io floor        read every input byte once, write one output, into a reused buffer (no torch)
  numpy floor     a plain sliced numpy task-arithmetic pass into preallocated buffers (no torch)
  import floor    starting Python and importing torch, which every torch-based tool pays
  hf-fusion       `hf-fusion merge` per method, and peak memory for 2, 4 and 8 models (--scaling)
  mergekit        `mergekit-yaml`, if --mergekit-python points at a venv with mergekit
  fusion_bench    FusionBench's algorithms, if --fusion-bench-python points at a venv with fusion-bench

Peers live in their own venvs, with torch pinned to the CPU wheel:
  python -m venv .bench/mergekit && .bench/mergekit/bin/pip install -c constraints.txt torch==2.13.0 mergekit==0.1.5
  python -m venv .bench/fusion_bench && .bench/fusion_bench/bin/pip install -c constraints.txt torch==2.13.0 fusion-bench
mergekit 0.1.5 (and its main branch as of 2026-06) crashes on every BERT checkpoint: plan.py concatenates a list with
the tuple of a weight's aliases. Fix that one expression in the venv's copy before measuring:
  sed -i 's/\\[w_in.name\\] + (w_in.aliases or \\[\\])/[w_in.name] + list(w_in.aliases or [])/' \
      .bench/mergekit/lib/python3.*/site-packages/mergekit/plan.py

Usage:
  python scripts/bench_merge.py --workload bench_workload --markdown bench_results/merge.md \
      [--mergekit-python .bench/mergekit/bin/python] [--fusion-bench-python .bench/fusion_bench/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BERT_BASE = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    type_vocab_size=2,
)


@dataclass
class Measurement:
    name: str
    method: str
    models: int
    seconds: float
    peak_rss_mb: float
    ok: bool
    note: str = ""


def bert_base_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of BertModel (bert-base-uncased sizes), without building the model."""
    h, i, v = BERT_BASE["hidden_size"], BERT_BASE["intermediate_size"], BERT_BASE["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (v, h),
        "embeddings.position_embeddings.weight": (BERT_BASE["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (BERT_BASE["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for layer in range(BERT_BASE["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"] = (h, h)
            shapes[p + name + ".bias"] = (h,)
        shapes[p + "attention.output.LayerNorm.weight"] = (h,)
        shapes[p + "attention.output.LayerNorm.bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (i, h)
        shapes[p + "intermediate.dense.bias"] = (i,)
        shapes[p + "output.dense.weight"] = (h, i)
        shapes[p + "output.dense.bias"] = (h,)
        shapes[p + "output.LayerNorm.weight"] = (h,)
        shapes[p + "output.LayerNorm.bias"] = (h,)
    shapes["pooler.dense.weight"] = (h, h)
    shapes["pooler.dense.bias"] = (h,)
    return shapes


def make_workload(root: Path, experts: int) -> tuple[Path, list[Path]]:
    """A random BERT-base 'pretrained' model and fine-tuned variants (base + small noise), fp32 safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    marker = root / f"workload-bert-base-{experts}.json"
    base_dir = root / "base"
    expert_dirs = [root / f"ft{i}" for i in range(experts)]
    if marker.is_file():
        return base_dir, expert_dirs
    shapes = bert_base_shapes()
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "num_attention_heads": 12,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        **BERT_BASE,
    }
    rng = np.random.default_rng(0)
    base = {k: (rng.standard_normal(s, dtype=np.float32) * 0.05) for k, s in shapes.items()}
    for folder, state in [(base_dir, base)] + [(d, None) for d in expert_dirs]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        if (folder / "model.safetensors").is_file():
            continue
        if state is None:
            state = {k: v + rng.standard_normal(v.shape, dtype=np.float32) * 0.002 for k, v in base.items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        print(f"  wrote {folder}", flush=True)
    marker.write_text(json.dumps({"experts": experts, "shapes": len(shapes)}))
    return base_dir, expert_dirs


IO_FLOOR = textwrap.dedent("""
    import os, sys
    inputs, output, out_bytes = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    with open(output, "wb", buffering=0) as f:
        left = out_bytes
        while left:
            left -= f.write(view[: min(left, len(buf))])
""")

NUMPY_FLOOR = textwrap.dedent("""
    import json, os, struct, sys
    import numpy as np
    base, experts, output, lam = sys.argv[1], sys.argv[2:-2], sys.argv[-2], 0.3
    def header(path):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            return json.loads(f.read(n)), 8 + n
    files = [base] + experts
    fds = [os.open(p, os.O_RDONLY) for p in files]
    heads = [header(p) for p in files]
    names = [k for k in heads[0][0] if k != "__metadata__"]
    slice_elems = 1 << 20
    bufs = [np.empty(slice_elems, np.float32) for _ in files]
    acc = np.empty(slice_elems, np.float32)
    hdr = {"__metadata__": {"format": "pt"}}
    off = 0
    for k in names:
        n = heads[0][0][k]["data_offsets"][1] - heads[0][0][k]["data_offsets"][0]
        hdr[k] = {"dtype": "F32", "shape": heads[0][0][k]["shape"], "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(hdr).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(out, struct.pack("<Q", len(raw)) + raw)
    for k in names:
        total = (heads[0][0][k]["data_offsets"][1] - heads[0][0][k]["data_offsets"][0]) // 4
        for start in range(0, total, slice_elems):
            m = min(slice_elems, total - start)
            for fd, (h, data), buf in zip(fds, heads, bufs):
                os.preadv(fd, [memoryview(buf[:m])], data + h[k]["data_offsets"][0] + 4 * start)
            np.copyto(acc[:m], bufs[1][:m])
            for b in bufs[2:]:
                np.add(acc[:m], b[:m], out=acc[:m])
            np.multiply(bufs[0][:m], 1 - lam * len(experts), out=bufs[0][:m])
            np.multiply(acc[:m], lam, out=acc[:m])
            np.add(acc[:m], bufs[0][:m], out=acc[:m])
            os.write(out, memoryview(acc[:m]))
""")


def _mk_models(ex, **params):  # noqa: ANN001, ANN003
    return [{"model": str(e), "parameters": dict(params)} for e in ex]


# hf-fusion method -> mergekit config at the same hyper-parameters (methods mergekit lacks are not run there)
MERGEKIT_CONFIG = {
    "simple_average": lambda base, ex: {"merge_method": "linear", "models": _mk_models(ex, weight=1.0)},
    "task_arithmetic": lambda base, ex: {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": _mk_models(ex, weight=0.3),
    },
    "ties_merging": lambda base, ex: {
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"normalize": False},
        "models": _mk_models(ex, weight=0.3, density=0.2),
    },
    "breadcrumbs": lambda base, ex: {
        "merge_method": "breadcrumbs",
        "base_model": str(base),
        "parameters": {"normalize": False},
        "models": _mk_models(ex, weight=0.3, density=0.9, gamma=0.01),
    },
    "della": lambda base, ex: {
        "merge_method": "della",
        "base_model": str(base),
        "parameters": {"lambda": 1.0},
        "models": _mk_models(ex, weight=1.0, density=0.7, epsilon=0.1),
    },
    "model_stock": lambda base, ex: {"merge_method": "model_stock", "base_model": str(base), "models": _mk_models(ex)},
    "karcher_mean": lambda base, ex: {"merge_method": "karcher", "models": _mk_models(ex)},
}

# FusionBench's WUDI runs autograd through n (out x out) products per step: hours per BERT-base on a CPU, so not run
FUSION_BENCH_METHODS = {
    "simple_average",
    "task_arithmetic",
    "ties_merging",
    "tsv_merging",
    "iso_c",
    "iso_cts",
    "magmax",
    "model_stock",
}
FUSION_BENCH_RUNNER = textwrap.dedent("""
    import sys
    from transformers import AutoModel
    from fusion_bench.modelpool import BaseModelPool
    method, base, out, experts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    spec = {"_pretrained_": {"_target_": "transformers.AutoModel.from_pretrained", "pretrained_model_name_or_path": base}}
    for i, e in enumerate(experts):
        spec[f"ft{i}"] = {"_target_": "transformers.AutoModel.from_pretrained", "pretrained_model_name_or_path": e}
    pool = BaseModelPool(spec)
    import fusion_bench.method as fbm
    algorithms = {
        "simple_average": lambda: fbm.SimpleAverageAlgorithm(),
        "task_arithmetic": lambda: fbm.TaskArithmeticAlgorithm(scaling_factor=0.3),
        "ties_merging": lambda: fbm.TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[],
                                                         merge_func="sum"),
        "tsv_merging": lambda: fbm.TaskSingularVectorMerging(alpha=1.0),
        "iso_c": lambda: fbm.ISO_C_Merge(scaling_factor=1.0),
        "iso_cts": lambda: fbm.ISO_CTS_Merge(scaling_factor=1.0, common_space_fraction=0.8),
        "wudi_merging": lambda: fbm.WUDIMerging(iter_num=400),
        "magmax": lambda: fbm.MagMaxAlgorithm(scaling_factor=0.5),
        "model_stock": lambda: fbm.ModelStock(ignore_keys=[], model_save_path=None),
    }
    algo = algorithms[method]()
    model = algo.run(pool)
    model.save_pretrained(out)
""")


def measure(name: str, method: str, models: int, argv: list[str], env: dict[str, str] | None = None) -> Measurement:
    """Runs argv in a fresh process; wall time and the child's own peak RSS (via wait4).

    Dirty pages from earlier runs are flushed first, so their writeback does not steal CPU from this one.
    """
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    stderr = proc.stderr.read() if proc.stderr else b""  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    ok = os.waitstatus_to_exitcode(status) == 0
    note = "" if ok else stderr.decode(errors="replace").strip().splitlines()[-1][:200] if stderr else "failed"
    m = Measurement(name, method, models, round(seconds, 2), round(usage.ru_maxrss / 1024, 1), ok, note)
    print(
        f"  {name:12s} {method:22s} models={models} {m.seconds:7.2f} s {m.peak_rss_mb:8.1f} MB"
        + ("" if ok else f"  FAILED: {note}"),
        flush=True,
    )
    return m


def write_report(lines: list[str], rows: list[dict], markdown: Path | None, json_path: Path | None) -> None:
    """Prints the markdown table and writes it, and the raw rows as JSON, where asked."""
    table = "\n".join(lines)
    print("\n" + table)
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(table + "\n")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=2))


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--make-workload":
        make_workload(Path(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=Path, default=Path("bench_workload"))
    parser.add_argument("--experts", type=int, default=4, help="fine-tuned models in the main comparison")
    parser.add_argument("--methods", default="simple_average,task_arithmetic,ties_merging")
    parser.add_argument("--scaling", default="2,4,8", help="model counts for the memory-flatness runs ('' to skip)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept")
    parser.add_argument("--mergekit-python", type=Path)
    parser.add_argument("--fusion-bench-python", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    methods = [m for m in args.methods.split(",") if m]
    scaling = [int(n) for n in args.scaling.split(",") if n]
    most = max([args.experts, *scaling])
    print(f"workload: base + {most} BERT-base-sized fp32 models in {args.workload}", flush=True)
    # generated in a child process: a parent that grew large would inflate every child's peak RSS (fork copies it)
    subprocess.run([sys.executable, __file__, "--make-workload", str(args.workload), str(most)], check=True)
    base, experts = make_workload(args.workload.resolve(), most)  # absolute: peers read relative ids as Hub repos
    main_experts = experts[: args.experts]
    inputs = [str(p / "model.safetensors") for p in [base, *main_experts]]
    out_bytes = os.path.getsize(inputs[0])
    scratch = Path(tempfile.mkdtemp(prefix="hf-fusion-bench-", dir=args.workload))
    results: list[Measurement] = []

    def best(make) -> Measurement:  # noqa: ANN001
        runs = [make() for _ in range(max(1, args.repeat))]
        return min(runs, key=lambda r: (not r.ok, r.seconds))

    def fresh(name: str) -> Path:
        path = scratch / name
        subprocess.run(["rm", "-rf", str(path)], check=True)
        return path

    print("warming the page cache", flush=True)
    for _ in range(2):
        subprocess.run(
            [
                sys.executable,
                "-c",
                IO_FLOOR,
                *[str(p / "model.safetensors") for p in [base, *experts]],
                str(fresh("warm.bin")),
                "0",
            ],
            check=True,
        )

    results.append(
        best(
            lambda: measure(
                "io floor",
                "read inputs + write output",
                len(main_experts),
                [sys.executable, "-c", IO_FLOOR, *inputs, str(fresh("io.bin")), str(out_bytes)],
            )
        )
    )
    results.append(
        best(
            lambda: measure(
                "numpy floor",
                "task_arithmetic",
                len(main_experts),
                [sys.executable, "-c", NUMPY_FLOOR, *inputs, str(fresh("np.safetensors")), "0"],
            )
        )
    )
    results.append(
        best(lambda: measure("import floor", "python -c 'import torch'", 0, [sys.executable, "-c", "import torch"]))
    )
    cli = [sys.executable, "-m", "hf_fusion", "merge", "--quiet"]
    for method in methods:
        results.append(
            best(
                lambda: measure(
                    "hf-fusion",
                    method,
                    len(main_experts),
                    cli
                    + [
                        "--repo-ids",
                        *map(str, main_experts),
                        "--base",
                        str(base),
                        "--method",
                        method,
                        "--output",
                        str(fresh(f"hf-{method}")),
                    ],
                )
            )
        )
    for n in scaling:
        if n == args.experts:
            continue
        for method in methods:
            results.append(
                best(
                    lambda: measure(
                        "hf-fusion",
                        method,
                        n,
                        cli
                        + [
                            "--repo-ids",
                            *map(str, experts[:n]),
                            "--base",
                            str(base),
                            "--method",
                            method,
                            "--output",
                            str(fresh(f"hf-{method}-{n}")),
                        ],
                    )
                )
            )
    if args.mergekit_python:
        import yaml

        for method in [m for m in methods if m in MERGEKIT_CONFIG]:
            cfg = scratch / f"mergekit-{method}.yaml"
            cfg.write_text(yaml.safe_dump({**MERGEKIT_CONFIG[method](base, main_experts), "dtype": "float32"}))
            results.append(
                best(
                    lambda: measure(
                        "mergekit",
                        method,
                        len(main_experts),
                        [
                            str(args.mergekit_python),
                            "-m",
                            "mergekit.scripts.run_yaml",
                            str(cfg),
                            str(fresh(f"mk-{method}")),
                        ],
                    )
                )
            )
    if args.fusion_bench_python:
        runner = scratch / "fusion_bench_runner.py"
        runner.write_text(FUSION_BENCH_RUNNER)
        for method in [m for m in methods if m in FUSION_BENCH_METHODS]:
            results.append(
                best(
                    lambda: measure(
                        "fusion_bench",
                        method,
                        len(main_experts),
                        [
                            str(args.fusion_bench_python),
                            str(runner),
                            method,
                            str(base),
                            str(fresh(f"fb-{method}")),
                            *map(str, main_experts),
                        ],
                    )
                )
            )
    subprocess.run(["rm", "-rf", str(scratch)], check=True)

    floor = next(r for r in results if r.name == "io floor")
    np_floor = next(r for r in results if r.name == "numpy floor")
    lines = [
        f"Workload: base + {args.experts} BERT-base-sized models (110M parameters, fp32 safetensors, "
        f"{out_bytes / 1e6:.0f} MB each), warm page cache; {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}. Wall time includes interpreter start and imports; peak RSS is the "
        "process's own maximum resident set.",
        "",
        "| tool | method | models | wall time (s) | peak RSS (MB) | x I/O floor | x numpy floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        time_text = f"{r.seconds:.2f}" if r.ok else f"failed ({r.note})"
        lines.append(
            f"| {r.name} | {r.method} | {r.models} | {time_text} | {r.peak_rss_mb:.0f} | "
            f"{r.seconds / floor.seconds:.1f} | {r.seconds / np_floor.seconds:.1f} |"
        )
    write_report(lines, [asdict(r) for r in results], args.markdown, args.json)
    return 0 if all(r.ok for r in results if r.name in ("hf-fusion", "io floor", "numpy floor")) else 1


if __name__ == "__main__":
    sys.exit(main())
