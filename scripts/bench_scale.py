#!/usr/bin/env python
"""Measure how hf-fusion scales: evaluation speed and caching on one machine, several processes, and a GPU.

``cpu`` (runs anywhere, no network; the built-in minilm-text3 pool):
  main command    the README's main command (TIES + --evaluate) from an empty score cache, then a second merge
                  of the same pool (only the fused model is scored), in fp32 and with --mixed-precision bf16
  floor           the matrix products the fused model's scoring needs, at this machine's measured float32 GEMM
                  rate: no fp32 implementation scores it faster
  evaluate        `hf-fusion evaluate` of one fused model, 1 process vs 2 processes (torchrun, gloo): seconds,
                  examples per second, identical scores
  bench           `hf-fusion bench` over 4 configurations, 1 process vs 2 processes: seconds, identical leaderboard

``gpu`` (one command, about 5 minutes on one GPU; prints a Markdown table and writes JSON):
  engine          `hf-fusion merge` task arithmetic on a base + 4 BERT-base models (fp32) and a base + 4
                  Qwen2-0.5B-shaped models (bf16), --device cuda against --device cpu, as GB/s of input read
  evaluate        minilm-text3 scored on the GPU (examples per second), fp32 and bf16
  adaptation      AdaMerging (task-, layer-wise) and WEMoE seconds per step on the GPU (scripts/bench_adaptation.py)

Every measurement runs in a fresh process: wall time includes interpreter start and imports; peak memory is the
largest resident set of the process tree (``os.wait4``).

    python scripts/bench_scale.py cpu --markdown bench_results/scale_cpu.md [--previous ../hf-fusion-0.x]
    python scripts/bench_scale.py gpu --markdown bench_results/scale_gpu.md     # on a CUDA machine
    python scripts/bench_scale.py gpu --device cpu --quick                      # smoke test of the GPU script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
BENCH_METHODS = "simple_average,task_arithmetic,ties_merging,dare_task_arithmetic"


@dataclass
class Run:
    name: str
    seconds: float
    peak_rss_mb: float
    note: str = ""
    stdout: str = ""


def run(name: str, argv: list[str], env: dict[str, str] | None = None, note: str = "") -> Run:
    """Runs ``argv`` to completion; its wall time and the largest resident set among its processes."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    out, err = process.communicate()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{err.decode()[-3000:]}")
    result = Run(name, round(seconds, 2), round(usage.ru_maxrss / 1024, 1), note, out.decode())
    print(f"{name:48s} {result.seconds:8.2f} s  {result.peak_rss_mb:8.1f} MB  {note}", flush=True)
    return result


def in_child(*args: str) -> dict:
    """One of this script's own steps (building workloads, the floor) in a child process, so this process stays
    small: a child forked from a large parent would count the parent's pages in its peak memory."""
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def engine_seconds(stdout: str) -> float:
    """The fusion's own time, as `hf-fusion merge` reports it (after start-up, imports and validation)."""
    match = re.search(r"Fused .* in ([0-9.]+) s", stdout)
    if match is None:
        raise SystemExit(f"no fusion time in: {stdout[-500:]}")
    return float(match.group(1))


def _public(r: Run) -> dict:
    return {k: v for k, v in asdict(r).items() if k != "stdout"}


def cli(*args: str, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "hf_fusion", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"] + [
        "hf_fusion",
        *args,
    ]


def scores(report: Path) -> dict[str, dict[str, float | None]]:
    return {r["task"]: r["scores"] for r in json.loads(report.read_text())["results"]}


def gemm_gflops(device: str = "cpu") -> float:
    """This machine's float32 matrix-product rate on BERT-MLP-sized products (4096 x 384 by 384 x 1536)."""
    import torch

    a, b = torch.randn(4096, 384, device=device), torch.randn(384, 1536, device=device)
    for _ in range(3):
        a @ b
    repeats = 40
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * 4096 * 384 * 1536 * repeats / (time.perf_counter() - started) / 1e9


def scoring_floor(fused: Path) -> dict[str, float]:
    """The float32 matrix-product work of scoring ``fused`` on minilm-text3 (padded tokens as the batch plan forms
    them, times two multiply-adds per linear weight), and the seconds it takes at the measured GEMM rate."""
    from safetensors import safe_open

    from hf_fusion.catalog import get_pool
    from hf_fusion.tasks.base import EvalSettings, TaskContext
    from hf_fusion.tasks.evaluate import EVALUATORS, fetch_pool

    pool = get_pool("minilm-text3")
    specs = pool.select(None)
    models = fetch_pool(pool, specs, show_progress=False)
    padded = 0
    for spec in specs:
        evaluator = EVALUATORS[spec.kind](spec, TaskContext(models.base, models.experts[spec.name]), EvalSettings())
        lengths = evaluator.example_lengths()
        padded += sum(max(lengths[i] for i in batch) * len(batch) for batch in evaluator.batch_plan)
    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        shapes = [f.get_slice(n).get_shape() for n in f.keys() if "encoder.layer." in n and n.endswith(".weight")]
    linear = sum(shape[0] * shape[1] for shape in shapes if len(shape) == 2)
    flops = 2.0 * linear * padded
    rate = gemm_gflops()
    return {
        "padded_tokens": padded,
        "linear_params": linear,
        "gflop": flops / 1e9,
        "gemm_gflops": round(rate, 1),
        "floor_s": round(flops / 1e9 / rate, 2),
    }


def pool_merge(method: str, output: Path, *extra: str) -> list[str]:
    """`hf-fusion merge` of the built-in pool with --evaluate: the README's main command for TIES."""
    return cli(
        "merge", "--pool", "minilm-text3", "--method", method, "--evaluate", "--output", str(output), "-q", *extra
    )


def cpu_suite(work: Path, previous: Path | None) -> dict:
    offline = {"HF_HUB_OFFLINE": "1"}
    runs: list[Run] = []
    if previous is not None:  # an earlier hf-fusion checkout, imported first, on the same command
        env = {**offline, "PYTHONPATH": str(previous), "HF_FUSION_CACHE": str(work / "cache-previous")}
        name = f"main command, hf-fusion at {previous.name}"
        runs.append(
            run(name, pool_merge("ties_merging", work / "previous"), env, "the same command, before this release")
        )
    for precision in ("no", "bf16"):
        cache = {**offline, "HF_FUSION_CACHE": str(work / f"cache-{precision}")}
        extra = [] if precision == "no" else ["--mixed-precision", "bf16"]
        first = pool_merge("ties_merging", work / f"ties-{precision}", *extra)
        second = pool_merge("task_arithmetic", work / f"ta-{precision}", *extra)
        runs.append(
            run(
                f"main command, empty score cache ({precision})",
                first,
                cache,
                "TIES, scores fused + pretrained + 3 experts",
            )
        )
        runs.append(
            run(
                f"second merge of the pool ({precision})", second, cache, "task arithmetic, scores only the fused model"
            )
        )
    fused = work / "ties-no"
    floor = in_child("_floor", str(fused))
    print(
        f"{'fp32 floor of scoring one model':48s} {floor['floor_s']:8.2f} s  ({floor['gflop']:.0f} GFLOP at {floor['gemm_gflops']} GFLOP/s)",
        flush=True,
    )
    examples = 501 + 500 + 500
    evaluate = {}
    for processes in (1, 2):
        report = work / f"evaluate-{processes}.json"
        args = [
            "evaluate",
            "--model",
            str(fused),
            "--pool",
            "minilm-text3",
            "--no-baselines",
            "--no-score-cache",
            "-q",
            "--report",
            str(report),
        ]
        r = run(f"evaluate one model, {processes} process(es)", cli(*args, processes=processes), offline)
        r.note = f"{examples / r.seconds:.0f} examples/s (start-up included)"
        runs.append(r)
        evaluate[processes] = scores(report)
    bench = {}
    for processes in (1, 2):
        out = work / f"bench-{processes}"
        args = [
            "bench",
            "--pool",
            "minilm-text3",
            "--methods",
            BENCH_METHODS,
            "--limit",
            "100",
            "--no-score-cache",
            "--output",
            str(out),
            "-q",
        ]
        runs.append(run(f"bench 4 configurations, {processes} process(es)", cli(*args, processes=processes), offline))
        bench[processes] = (out / "leaderboard.md").read_text()
    return {
        "runs": [_public(r) for r in runs],
        "floor": floor,
        "same_scores_1_vs_2_processes": evaluate[1] == evaluate[2],
        "same_leaderboard_1_vs_2_processes": bench[1] == bench[2],
    }


def qwen_workload(root: Path, experts: int, quick: bool) -> tuple[Path, list[Path]]:
    """A Qwen2-0.5B-shaped base (bf16, 24 layers, 896 wide, 151936-token vocabulary) and fine-tuned variants
    (base + small noise); ``quick`` keeps 2 layers and a 32000-token vocabulary for a smoke test."""
    import torch
    from safetensors.torch import save_file

    layers, vocab, hidden, inter, kv = (2, 32000, 896, 4864, 128) if quick else (24, 151936, 896, 4864, 128)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    generator = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    folders = [root / "qwen-base"] + [root / f"qwen-ft{i}" for i in range(experts)]
    for index, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        state = (
            base
            if index == 0
            else {
                k: (v.float() + torch.randn(v.shape, generator=generator) * 0.001).to(torch.bfloat16)
                for k, v in base.items()
            }
        )
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folders[0], folders[1:]


def input_bytes(base: Path, experts: list[Path]) -> int:
    return sum((folder / "model.safetensors").stat().st_size for folder in [base, *experts])


def gpu_suite(work: Path, device: str, quick: bool) -> dict:
    runs: list[Run] = []
    throughput: dict[str, dict[str, float]] = {}
    experts = 2 if quick else 4
    for shape in ("bert", "qwen"):
        made = in_child("_workload", shape, str(work / shape), str(experts), "quick" if quick else "full")
        base, models = Path(made["base"]), [Path(p) for p in made["experts"]]
        label = f"{made['label']} x{experts}"
        size = input_bytes(base, models)
        for where in dict.fromkeys(["cpu", device]):
            args = ["merge", "--repo-ids", *map(str, models), "--base", str(base), "--method", "task_arithmetic"]
            args += ["--device", where, "--output", str(work / f"out-{where}"), "--overwrite"]
            r = run(f"engine {label} on {where}", cli(*args))
            fusing = engine_seconds(r.stdout)
            rate = size / 1e9 / fusing
            r.note = f"{size / 1e9:.2f} GB read; fusion {fusing:.2f} s: {rate:.2f} GB/s"
            throughput.setdefault(label, {})[where] = round(rate, 3)
            runs.append(r)
    fused = work / "minilm-ta"
    offline = {"HF_HUB_OFFLINE": "1"}
    subprocess.run(
        cli("merge", "--pool", "minilm-text3", "--method", "task_arithmetic", "--output", str(fused), "-q"),
        env={**os.environ, **offline},
        check=True,
    )
    examples = 501 + 500 + 500
    limit = ["--limit", "64"] if quick else []
    for precision in ("no", "bf16"):
        args = [
            "evaluate",
            "--model",
            str(fused),
            "--pool",
            "minilm-text3",
            "--no-baselines",
            "--no-score-cache",
            "--device",
            device,
        ]
        args += ["--mixed-precision", precision, "--batch-size", "128", "-q", *limit]
        r = run(f"evaluate minilm-text3 on {device} ({precision})", cli(*args), offline)
        r.note = f"{(192 if quick else examples) / r.seconds:.0f} examples/s (start-up included)"
        runs.append(r)
    adaptation = work / "adaptation.json"
    steps = "2" if quick else "30"
    subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "bench_adaptation.py"),
            "--steps",
            steps,
            "--devices",
            device,
            "--out",
            str(adaptation),
        ],
        check=True,
    )
    return {
        "runs": [_public(r) for r in runs],
        "engine_gb_per_s": throughput,
        "adaptation": json.loads(adaptation.read_text()),
    }


def markdown(title: str, summary: dict) -> str:
    lines = [
        f"## {title}",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "",
        "| run | seconds | peak RSS (MB) | note |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {r['name']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['note']} |" for r in summary["runs"]]
    extra = {k: v for k, v in summary.items() if k != "runs"}
    lines += ["", "```json", json.dumps(extra, indent=2), "```", ""]
    return "\n".join(lines)


def child_step(args: list[str]) -> int:
    """The steps :func:`in_child` runs; each prints its result as JSON on its last line."""
    if args[0] == "_floor":
        print(json.dumps(scoring_floor(Path(args[1]))))
    else:  # _workload SHAPE FOLDER EXPERTS quick|full
        shape, folder, experts, size = args[1], Path(args[2]), int(args[3]), args[4]
        if shape == "bert":
            sys.path.insert(0, str(SCRIPTS))
            from bench_merge import make_workload

            base, models = make_workload(folder, experts)
            label = "bert-base (fp32)"
        else:
            base, models = qwen_workload(folder, experts, size == "quick")
            label = "qwen2-0.5b-shaped (bf16)"
        print(json.dumps({"base": str(base), "experts": [str(m) for m in models], "label": label}))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        return child_step(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["cpu", "gpu"])
    parser.add_argument("--device", default="cuda", help="gpu suite: the device to measure (cpu for a smoke test)")
    parser.add_argument("--quick", action="store_true", help="gpu suite: tiny workloads, to check the script runs")
    parser.add_argument("--previous", type=Path, help="cpu suite: an earlier hf-fusion checkout to time beside")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hf-fusion-scale-") as tmp:
        if args.suite == "cpu":
            summary = cpu_suite(Path(tmp), args.previous)
        else:
            import torch

            if args.device.startswith("cuda") and not torch.cuda.is_available():
                raise SystemExit("the gpu suite needs a CUDA device (or --device cpu --quick for a smoke test)")
            summary = gpu_suite(Path(tmp), args.device, args.quick)
            summary["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    text = markdown(f"bench_scale {args.suite}", summary)
    print(text)
    for path, content in ((args.markdown, text), (args.json, json.dumps(summary, indent=2) + "\n")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
