#!/usr/bin/env python
"""Benchmark adapter outputs (`hf-fusion merge --output-format adapter`) against peft's `add_weighted_adapter`, in
one run: the largest difference of the fused deltas where the math agrees, wall time and peak RSS.

Workloads:
  minilm-text3   the built-in pool: all-MiniLM-L6-v2 (22.7M parameters, float32) and 3 rank-8 LoRA adapters on
                 every linear layer of its encoder. Both tools read the same copies of the adapters, prepared
                 untimed for a feature-extraction base (the `bert.` prefix and the per-task classifier heads
                 dropped, since one adapter output has no per-task heads).
  llama-r16x8    generated once in bench_workload/adapters: a Llama-shaped base (hidden 2048, MLP 5632, 32 heads
                 with 4 key-value heads, 4 layers, vocabulary 32000: 307M parameters, bfloat16) and 8 rank-16 LoRA
                 adapters on q/k/v/o/gate/up/down of every layer (A ~ N(0, 1/in), B ~ N(0, 0.02^2), lora_alpha 32).

Combinations, each tool with weights 1 and, for the SVD ones, rank R (16 for the Llama pool, 8 for minilm):
  cat            peft `cat` | hf-fusion task_arithmetic (scaling_factor 1), exact concatenation
  svd            peft `svd` | hf-fusion task_arithmetic (scaling_factor 1) --rank R (QR of the concatenated factors)
  ties_svd       peft `ties_svd` (density 0.2, majority sign by total) | hf-fusion ties_merging with the same math:
                 threshold 20 within each tensor (threshold_scope tensor, keep_count exact), mean of the agreeing
                 values (merge_func mean), sign + where the elected sum is 0 (zero_sign positive), scaling_factor 1,
                 then --rank R (randomised SVD where the rank is small beside the module, see
                 hf_fusion.adapters.extract.factorise)
  dare_ties_svd  peft `dare_ties_svd` (density 0.5) | hf-fusion dare_ties (sparsity_ratio 0.5, nothing trimmed,
                 same sign election and mean): the random drop masks differ between the tools by design, so only
                 the energy kept is compared, not the values
Each run is a fresh process (wall time includes interpreter start, imports, loading and saving; peak RSS is the
child's own maximum resident set, from wait4), page cache warmed first. peft loads the base (bfloat16 for Llama, as
stored), PeftModel.from_pretrained the first adapter and load_adapter the others, add_weighted_adapter, then
save_pretrained of the new adapter only. hf-fusion runs its CLI. Differences are computed per module on the fused
update ``scale * B @ A`` of the two outputs: the largest absolute difference, relative to the largest update value,
and the ratio of their squared Frobenius norms (the energy each kept; a truncation whose r-th and (r+1)-th singular
values nearly tie may keep different directions of the same energy).
hf-fusion's ties_svd also runs on 2 and 4 adapters of the Llama pool, to read its peak memory per adapter count.

Usage:
  python scripts/bench_adapters.py --markdown bench_results/adapters.md --json bench_results/adapters.json
  python scripts/bench_adapters.py --workloads minilm-text3      (a smoke test, a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "bench_workload" / "adapters"
PEFT_PREFIX = "base_model.model."
LLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 4,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMBINATIONS = ("cat", "svd", "ties_svd", "dare_ties_svd")
TIES_DENSITY = 0.2
DARE_DENSITY = 0.5


# --- workloads (untimed) --------------------------------------------------------------------------------------------


def make_minilm(folder: Path) -> dict[str, Any]:
    """The built-in pool's adapters, prepared for a feature-extraction base (names without `bert.`, no heads)."""
    from safetensors.torch import load_file, save_file

    from hf_fusion.catalog import resolve_builtin

    base = Path(resolve_builtin("builtin:all-MiniLM-L6-v2"))
    adapters = []
    for task in ("bbc_news", "twitter_sentiment", "sms_spam"):
        source = Path(resolve_builtin(f"builtin:minilm-text3/{task}"))
        out = folder / task
        out.mkdir(parents=True, exist_ok=True)
        config = json.loads((source / "adapter_config.json").read_text())
        config.update(task_type=None, modules_to_save=None, base_model_name_or_path=str(base))
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        state = {
            k.replace(f"{PEFT_PREFIX}bert.", PEFT_PREFIX): v
            for k, v in load_file(source / "adapter_model.safetensors").items()
            if ".lora_" in k
        }
        save_file(state, out / "adapter_model.safetensors")
        adapters.append(out)
    return {"base": base, "adapters": adapters, "rank": 8, "auto_class": "AutoModel"}


def make_llama(folder: Path, count: int = 8, rank: int = 16) -> dict[str, Any]:
    """A random Llama-shaped base (bfloat16) and ``count`` random rank-``rank`` LoRA adapters on every linear layer."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    base = folder / "base"
    adapters = [folder / f"lora{i}" for i in range(count)]
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA, torch_dtype="bfloat16")).to(torch.bfloat16)
        model.save_pretrained(base)
        del model
    config = LlamaConfig(**LLAMA)
    shapes = {
        "q_proj": (config.hidden_size, config.hidden_size),
        "k_proj": (config.num_key_value_heads * config.hidden_size // config.num_attention_heads, config.hidden_size),
        "v_proj": (config.num_key_value_heads * config.hidden_size // config.num_attention_heads, config.hidden_size),
        "o_proj": (config.hidden_size, config.hidden_size),
        "gate_proj": (config.intermediate_size, config.hidden_size),
        "up_proj": (config.intermediate_size, config.hidden_size),
        "down_proj": (config.hidden_size, config.intermediate_size),
    }
    for index, out in enumerate(adapters):
        if (out / "adapter_model.safetensors").is_file():
            continue
        generator = torch.Generator().manual_seed(100 + index)
        state = {}
        for layer in range(config.num_hidden_layers):
            for name, (rows, cols) in shapes.items():
                group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                key = f"{PEFT_PREFIX}model.layers.{layer}.{group}.{name}"
                state[f"{key}.lora_A.weight"] = torch.randn(rank, cols, generator=generator) / cols**0.5
                state[f"{key}.lora_B.weight"] = torch.randn(rows, rank, generator=generator) * 0.02
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, out / "adapter_model.safetensors")
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=LLAMA_TARGETS,
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(base),
        ).save_pretrained(str(out))
    return {"base": base, "adapters": adapters, "rank": rank, "auto_class": "AutoModelForCausalLM"}


# --- runs (each in a fresh process) ---------------------------------------------------------------------------------


def hf_fusion_command(workload: dict[str, Any], combination: str, out: Path, adapters: list[Path]) -> list[str]:
    method = {
        "cat": ["task_arithmetic", "--param", "scaling_factor=1.0"],
        "svd": ["task_arithmetic", "--param", "scaling_factor=1.0"],
        "ties_svd": [
            "ties_merging",
            "--param",
            "scaling_factor=1.0",
            "--param",
            f"threshold={TIES_DENSITY * 100:g}",
            "--param",
            "threshold_scope=tensor",
            "--param",
            "keep_count=exact",
            "--param",
            "merge_func=mean",
            "--param",
            "zero_sign=positive",
        ],
        "dare_ties_svd": [
            "dare_ties",
            "--param",
            "scaling_factor=1.0",
            "--param",
            f"sparsity_ratio={1 - DARE_DENSITY:g}",
            "--param",
            "threshold=100",
            "--param",
            "threshold_scope=tensor",
            "--param",
            "merge_func=mean",
            "--param",
            "zero_sign=positive",
        ],
    }[combination]
    command = [str(Path(sys.executable).parent / "hf-fusion"), "merge", "--repo-ids", *map(str, adapters)]
    command += ["--base", str(workload["base"]), "--method", *method, "--output-format", "adapter"]
    if combination != "cat":
        command += ["--rank", str(workload["rank"])]
    return [*command, "--output", str(out), "-q"]


PEFT_RUN = """
import json, sys, torch
import transformers
from peft import PeftModel
spec = json.loads(sys.argv[1])
auto = getattr(transformers, spec["auto_class"])
base = auto.from_pretrained(spec["base"], dtype="auto")
model = PeftModel.from_pretrained(base, spec["adapters"][0], adapter_name="a0")
for i, path in enumerate(spec["adapters"][1:], 1):
    model.load_adapter(path, adapter_name=f"a{i}")
names = [f"a{i}" for i in range(len(spec["adapters"]))]
extra = {"svd_rank": spec["rank"]} if spec["combination"] != "cat" else {}
if spec["combination"] in ("ties_svd", "dare_ties_svd"):
    extra.update(density=spec["density"], majority_sign_method="total")
model.add_weighted_adapter(names, [1.0] * len(names), "fused", combination_type=spec["combination"], **extra)
model.save_pretrained(spec["out"], selected_adapters=["fused"])
"""


def run_child(command: list[str]) -> tuple[float, float]:
    """Wall seconds and the child's peak RSS in MB."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{stderr[-4000:]}")
    return wall, usage.ru_maxrss / 1024


def warm(paths: list[Path]) -> None:
    for path in paths:
        for file in path.rglob("*.safetensors") if path.is_dir() else [path]:
            with open(file, "rb") as handle:
                while handle.read(64 << 20):
                    pass


# --- comparison -----------------------------------------------------------------------------------------------------


def updates(folder: Path) -> dict[str, Any]:
    """Each module's ``scale * B @ A`` (float64) of an adapter folder, by module name without peft's prefix."""
    import torch
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    if not file.is_file():  # peft saves a selected adapter other than "default" in a subfolder
        file = next(folder.rglob("adapter_model.safetensors"))
    config = json.loads((file.parent / "adapter_config.json").read_text())
    state = load_file(file)
    found = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            rank = (config.get("rank_pattern") or {}).get(module, config["r"])
            alpha = (config.get("alpha_pattern") or {}).get(module, config["lora_alpha"])
            found[module] = (alpha / rank) * (b.double() @ a.double())
    del torch
    return found


def compare(ours: Path, theirs: Path) -> dict[str, float]:
    a, b = updates(ours), updates(theirs)
    if sorted(a) != sorted(b):
        raise RuntimeError(f"the outputs adapt different modules: {sorted(set(a) ^ set(b))[:3]}")
    largest = max(float(t.abs().max()) for t in b.values())
    difference = max(float((a[m] - b[m]).abs().max()) for m in a)
    norm = lambda d: sum(float(t.square().sum()) for t in d.values())  # noqa: E731
    return {"max_abs_diff": difference, "relative": difference / largest, "norm_ratio": norm(a) / norm(b)}


def add_differences(rows: list[dict[str, Any]]) -> None:
    """Compares each row's two outputs (after every timed run, so this process holds no tensors while children are
    measured: a child's peak RSS starts from its parent's at fork)."""
    for row in rows:
        ours, theirs = map(Path, row.pop("outputs"))
        row["difference"] = compare(ours, theirs)
        row["hf_fusion"]["energy"] = energy(ours)
        row["hf_fusion"]["dtype"], row["peft"]["dtype"] = factor_dtype(ours), factor_dtype(theirs)
        shutil.rmtree(ours)
        shutil.rmtree(theirs)


def factor_dtype(folder: Path) -> str:
    from safetensors import safe_open

    file = next(folder.rglob("adapter_model.safetensors"))
    with safe_open(file, "pt") as handle:
        return str(handle.get_slice(next(iter(handle.keys()))).get_dtype())


def energy(folder: Path) -> float | None:
    report = folder / "adapter_fusion.json"
    if not report.is_file():
        return None
    modules = json.loads(report.read_text())["modules"].values()
    return sum(m["energy"] for m in modules) / len(modules)


# --- main -----------------------------------------------------------------------------------------------------------


def bench(name: str, workload: dict[str, Any], scratch: Path) -> list[dict[str, Any]]:
    rows = []
    adapters = workload["adapters"]
    for combination in COMBINATIONS:
        warm([workload["base"], *adapters])
        ours = scratch / f"{name}-{combination}-hf-fusion"
        wall, rss = run_child(hf_fusion_command(workload, combination, ours, adapters))
        row: dict[str, Any] = {"workload": name, "combination": combination, "adapters": len(adapters)}
        row["hf_fusion"] = {"seconds": wall, "peak_rss_mb": rss}
        warm([workload["base"], *adapters])
        theirs = scratch / f"{name}-{combination}-peft"
        spec = {
            "base": str(workload["base"]),
            "adapters": [str(a) for a in adapters],
            "auto_class": workload["auto_class"],
            "combination": combination,
            "rank": workload["rank"],
            "density": TIES_DENSITY if combination == "ties_svd" else DARE_DENSITY,
            "out": str(theirs),
        }
        wall, rss = run_child([sys.executable, "-c", PEFT_RUN, json.dumps(spec)])
        row["peft"] = {"seconds": wall, "peak_rss_mb": rss}
        row["outputs"] = [str(ours), str(theirs)]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def memory_by_count(workload: dict[str, Any], scratch: Path) -> list[dict[str, Any]]:
    rows = []
    for count in (2, 4, 8):
        subset = {**workload, "adapters": workload["adapters"][:count]}
        warm([workload["base"], *subset["adapters"]])
        out = scratch / f"count-{count}"
        wall, rss = run_child(hf_fusion_command(subset, "ties_svd", out, subset["adapters"]))
        rows.append({"adapters": count, "seconds": wall, "peak_rss_mb": rss})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out)
    return rows


def markdown(rows: list[dict[str, Any]], counts: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | combination | hf-fusion s | peft s | hf-fusion peak MB | peft peak MB | max abs diff "
        "| relative | norm ratio | energy kept (hf-fusion) | factors (hf-fusion / peft) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        d, ours, theirs = r["difference"], r["hf_fusion"], r["peft"]
        dtypes = f"{ours['dtype']} / {theirs['dtype']}"
        same_math = r["combination"] != "dare_ties_svd"
        diff = f"{d['max_abs_diff']:.2e}" if same_math else "random masks"
        rel = f"{d['relative']:.2e}" if same_math else "-"
        kept = f"{ours['energy']:.4f}" if ours["energy"] is not None else ""
        lines.append(
            f"| {r['workload']} | {r['combination']} | {ours['seconds']:.1f} | {theirs['seconds']:.1f} "
            f"| {ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | {diff} | {rel} | {d['norm_ratio']:.6f} "
            f"| {kept} | {dtypes} |"
        )
    if counts:
        lines += ["", "| adapters (llama-r16x8, ties_svd) | hf-fusion s | hf-fusion peak MB |", "|---:|---:|---:|"]
        lines += [f"| {c['adapters']} | {c['seconds']:.1f} | {c['peak_rss_mb']:.0f} |" for c in counts]
    return "\n".join(lines) + "\n"


def make_in_child(name: str, folder: Path) -> dict[str, Any]:
    """Writes the workload in a separate process (untimed) and returns its description: this process stays small."""
    done = subprocess.run(
        [sys.executable, __file__, "make", name, str(folder)], check=True, capture_output=True, text=True
    )
    workload = json.loads(done.stdout.strip().splitlines()[-1])
    return {**workload, "base": Path(workload["base"]), "adapters": [Path(a) for a in workload["adapters"]]}


def main() -> None:
    if sys.argv[1:2] == ["make"]:
        name, folder = sys.argv[2], Path(sys.argv[3])
        workload = make_minilm(folder) if name == "minilm-text3" else make_llama(folder)
        print(
            json.dumps({**workload, "base": str(workload["base"]), "adapters": [str(a) for a in workload["adapters"]]})
        )
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["minilm-text3", "llama-r16x8"])
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    counts: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-adapters-", dir=ROOT / "bench_workload") as tmp:
        scratch = Path(tmp)
        for name in args.workloads:
            if name not in ("minilm-text3", "llama-r16x8"):
                raise SystemExit(f"unknown workload {name!r}")
            folder = scratch / "minilm" if name == "minilm-text3" else WORKLOAD / "llama-r16x8"
            workload = make_in_child(name, folder)
            rows += bench(name, workload, scratch)
            if name == "llama-r16x8":
                counts = memory_by_count(workload, scratch)
        add_differences(rows)
    import peft
    import torch

    import hf_fusion

    table = markdown(rows, counts)
    print(table)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"{machine}; hf-fusion {hf_fusion.__version__}, peft {peft.__version__}\n\n{table}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows, "counts": counts}, indent=2) + "\n")


if __name__ == "__main__":
    main()
