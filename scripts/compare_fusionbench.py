#!/usr/bin/env python
"""hf-fusion's data-free methods against FusionBench's own implementations, on generated pools.

Two pools of a tiny BERT (a random base and 3 fine-tunes, float32):
  full-rank   every tensor moved by dense Gaussian noise (each task matrix has full rank)
  low-rank    each linear weight moved by a rank-2 update B @ A, nothing else (as LoRA experts are)
Each method runs with its defaults in hf-fusion (this interpreter) and in FusionBench (its own venv, with torch
pinned to the same CPU wheel), and the two fused models are compared tensor by tensor. Printed per method and pool:
the largest absolute difference, and the difference of the fused updates relative to FusionBench's,
||(hf - base) - (fb - base)|| / ||fb - base||, over all tensors.

Usage:
  python -m venv .bench/fusion_bench && .bench/fusion_bench/bin/pip install -c constraints.txt torch==2.13.0 fusion-bench
  python scripts/compare_fusionbench.py --fusion-bench-python .bench/fusion_bench/bin/python [--markdown FILE]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from bench_merge import FUSION_BENCH_METHODS, FUSION_BENCH_RUNNER
from safetensors.torch import load_file

import hf_fusion

METHODS = sorted(FUSION_BENCH_METHODS - {"simple_average"}) + ["wudi_merging"]  # WUDI is quick at this size
EXPERTS = 3
LORA_RANK = 2


def _config() -> transformers.BertConfig:
    return transformers.BertConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=120,
        max_position_embeddings=64,
    )


def make_pool(root: Path, kind: str, seed: int = 0) -> tuple[Path, list[Path]]:
    """A base and EXPERTS fine-tunes of the tiny BERT, saved with save_pretrained."""
    torch.manual_seed(seed)
    base = transformers.BertModel(_config())
    base.save_pretrained(root / "base")
    state = base.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    experts = []
    for i in range(EXPERTS):
        moved = {}
        for name, value in state.items():
            if not value.is_floating_point():
                moved[name] = value
            elif kind == "full-rank":
                moved[name] = value + 0.02 * torch.randn(value.shape, generator=g)
            elif value.dim() == 2 and "embeddings" not in name:
                rows, cols = value.shape
                update = torch.randn(rows, LORA_RANK, generator=g) @ torch.randn(LORA_RANK, cols, generator=g)
                moved[name] = value + 0.02 * update
            else:
                moved[name] = value
        expert = transformers.BertModel(_config())
        expert.load_state_dict(moved)
        expert.save_pretrained(root / f"ft{i}")
        experts.append(root / f"ft{i}")
    return root / "base", experts


def compare(hf_dir: Path, fb_dir: Path, base_dir: Path) -> dict:
    """Largest absolute difference (and its tensor), and the relative difference of the fused updates, over the
    tensors both outputs hold finite; tensors where FusionBench wrote NaN or infinities are counted apart."""
    hf, fb, base = (load_file(str(d / "model.safetensors")) for d in (hf_dir, fb_dir, base_dir))
    worst, worst_name, diff_sq, update_sq, fb_nonfinite = 0.0, "", 0.0, 0.0, []
    for name, value in fb.items():
        if name not in hf or not value.is_floating_point():
            continue
        a, b, b0 = hf[name].double(), value.double(), base[name].double()
        if not bool(torch.isfinite(b).all()):
            fb_nonfinite.append(name)
            continue
        top = float((a - b).abs().max())
        if top > worst:
            worst, worst_name = top, name
        diff_sq += float((a - b).square().sum())
        update_sq += float((b - b0).square().sum())
    return {
        "max_abs_diff": worst,
        "worst_tensor": worst_name,
        "update_diff": (diff_sq / update_sq) ** 0.5 if update_sq else 0.0,
        "fusion_bench_nonfinite": fb_nonfinite,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fusion-bench-python", type=Path, default=Path(".bench/fusion_bench/bin/python"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if not args.fusion_bench_python.exists():
        print(f"no FusionBench venv at {args.fusion_bench_python}; see --help", file=sys.stderr)
        return 2
    methods = args.methods.split(",")
    rows: dict[str, dict[str, tuple[float, float]]] = {m: {} for m in methods}
    with tempfile.TemporaryDirectory(prefix="hf-fusion-vs-fb-") as tmp:
        runner = Path(tmp) / "runner.py"
        runner.write_text(FUSION_BENCH_RUNNER)
        for kind in ("full-rank", "low-rank"):
            base, experts = make_pool(Path(tmp) / kind, kind)
            for method in methods:
                hf_out, fb_out = Path(tmp) / f"hf-{kind}-{method}", Path(tmp) / f"fb-{kind}-{method}"
                hf_fusion.merge(
                    models=[str(e) for e in experts], base=str(base), method=method, output=hf_out, show_progress=False
                )
                argv = [str(args.fusion_bench_python), str(runner), method, str(base), str(fb_out), *map(str, experts)]
                done = subprocess.run(argv, capture_output=True, text=True)
                if done.returncode:
                    print(f"FusionBench {method} on {kind} failed:\n{done.stderr[-1500:]}", file=sys.stderr)
                    return 1
                row = rows[method][kind] = compare(hf_out, fb_out, base)
                print(
                    f"{kind:9s} {method:16s} max |diff| {row['max_abs_diff']:.2e} ({row['worst_tensor']}), update "
                    f"differs by {row['update_diff']:.2e}, FusionBench non-finite in {row['fusion_bench_nonfinite']}",
                    flush=True,
                )
    lines = [
        f"Tiny BERT (hidden 48, 2 layers), {EXPERTS} fine-tunes, float32, CPU; FusionBench "
        f"{_fusion_bench_version(args.fusion_bench_python)} at the same hyper-parameters. Low-rank: rank-{LORA_RANK} "
        "updates of the linear weights only.",
        "",
        "| method | full-rank: max abs diff (tensor) | full-rank: update diff | low-rank: max abs diff (tensor) | "
        "low-rank: update diff |",
        "|---|---|---:|---|---:|",
    ]

    def cells(row: dict) -> tuple[str, str]:
        where = f" (`{row['worst_tensor']}`)" if row["max_abs_diff"] > 1e-4 else ""
        bad = row["fusion_bench_nonfinite"]
        note = f"; FusionBench NaN/inf in {len(bad)} tensor(s), left out" if bad else ""
        return f"{row['max_abs_diff']:.1e}{where}{note}", f"{row['update_diff']:.1e}"

    for method in methods:
        (fw, fr), (lw, lr) = cells(rows[method]["full-rank"]), cells(rows[method]["low-rank"])
        lines.append(f"| {method} | {fw} | {fr} | {lw} | {lr} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0


def _fusion_bench_version(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('fusion-bench'))"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
