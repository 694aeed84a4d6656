#!/usr/bin/env python
"""The Qwen2-0.5B-shaped bf16 workload of scripts/bench_merge.py: generator, mergekit recipes, output comparison.

Run as a child process of bench_merge.py, so the parent stays small (a large parent inflates every child's peak RSS):
  python scripts/bench_merge_qwen2.py make FOLDER EXPERTS [--tiny]
  python scripts/bench_merge_qwen2.py compare REFERENCE_FOLDER OTHER_FOLDER     (prints one JSON object)
  python scripts/bench_merge_qwen2.py compare REF OTHER --threshold-ties BASE DENSITY FT...   (TIES: also outside
                                                                                the free top-k choices)

The models are written as safetensors directly, tensor by tensor and in slices, so generating 2.5 billion values
needs a few hundred MB of memory and no model class. A fine-tune is the bf16 base plus N(0, (NOISE * std)^2), rounded
to bf16: at NOISE = 1e-2 about 83% of the task-vector elements are non-zero after rounding (at 1e-3 only about 30%
survive bf16's 8-bit significand), so TIES trimming has real magnitudes to rank.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

SEED = 0
NOISE = 1e-2
SLICE = 1 << 23  # values generated, converted and written per step

QWEN2_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
)
# the same layout at toy sizes, for checking the benchmark itself in seconds
QWEN2_TINY = dict(
    hidden_size=64,
    num_hidden_layers=5,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)

# mergekit's own recipe format, one file per method; both tools read the same file. Each entry maps the base and the
# fine-tunes (absolute paths) to the recipe.
GRADIENT_T = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]


def _models(experts: list[str], **parameters: object) -> list[dict]:
    return [{"model": e, "parameters": dict(parameters)} for e in experts]


def _linear(base: str, experts: list[str], layers: int) -> dict:
    weights = [1.0, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1][: len(experts)]
    return {
        "merge_method": "linear",
        "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, weights)],
        "dtype": "bfloat16",
    }


def _task_arithmetic(base: str, experts: list[str], layers: int) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": _models(experts, weight=0.3),
        "dtype": "bfloat16",
    }


TIES_DENSITY = 0.2


def _ties(base: str, experts: list[str], layers: int) -> dict:
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": _models(experts, density=TIES_DENSITY, weight=1.0),
        "dtype": "bfloat16",
    }


def _slerp(base: str, experts: list[str], layers: int) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, layers]},
                    {"model": experts[0], "layer_range": [0, layers]},
                ]
            }
        ],
        "parameters": {"t": GRADIENT_T},
        "dtype": "bfloat16",
    }


RECIPES = {"linear": _linear, "task_arithmetic": _task_arithmetic, "ties": _ties, "slerp": _slerp}


def shapes(sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Qwen2ForCausalLM's parameter names and shapes; tied embeddings, so no lm_head.weight."""
    h, i, v = sizes["hidden_size"], sizes["intermediate_size"], sizes["vocab_size"]
    kv = sizes["num_key_value_heads"] * (h // sizes["num_attention_heads"])
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(sizes["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for proj, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            out[p + f"self_attn.{proj}.weight"] = (rows, h)
            out[p + f"self_attn.{proj}.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, h)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    return out


def config(sizes: dict[str, int]) -> dict:
    """config.json of Qwen2-0.5B, with the sizes given."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": min(151643, sizes["vocab_size"] - 1),
        "eos_token_id": min(151643, sizes["vocab_size"] - 1),
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 131072,
        "max_window_layers": sizes["num_hidden_layers"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        **sizes,
    }


def _mean_std(name: str) -> tuple[float, float]:
    """Norm weights scatter around 1, everything else around 0."""
    return (1.0, 0.05) if name.endswith("norm.weight") else (0.0, 0.02)


def to_bf16(values, out):  # noqa: ANN001
    """float32 -> bf16 bits (uint16), rounding to nearest even; no NaN in this workload."""
    import numpy as np

    bits = values.view(np.uint32)
    tmp = np.right_shift(bits, 16)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, bits, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    np.copyto(out, tmp, casting="unsafe")


def from_bf16(bits, out):  # noqa: ANN001
    """bf16 bits (uint16) -> float32, exactly: the bits become the high half."""
    import numpy as np

    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32)


def write_model(path: Path, names: dict[str, tuple[int, ...]], model: int, base: Path | None) -> None:
    """One bf16 safetensors file: the base (model 0) from the seed, or base + noise for fine-tune `model`."""
    import numpy as np

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in names.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    base_view = None
    if base is not None:
        with open(base, "rb") as f:
            start = 8 + struct.unpack("<Q", f.read(8))[0]
        base_view = np.memmap(base, dtype=np.uint16, mode="r", offset=start)
    values = np.empty(SLICE, np.float32)
    noise = np.empty(SLICE, np.float32)
    bits = np.empty(SLICE, np.uint16)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for index, (name, shape) in enumerate(names.items()):
            rng = np.random.default_rng([SEED, model, index])
            mean, std = _mean_std(name)
            total, first = math.prod(shape), header[name]["data_offsets"][0] // 2
            for s in range(0, total, SLICE):
                m = min(SLICE, total - s)
                v = values[:m]
                if base_view is None:
                    rng.standard_normal(m, dtype=np.float32, out=v)
                    np.multiply(v, std, out=v)
                    np.add(v, mean, out=v)
                else:
                    from_bf16(base_view[first + s : first + s + m], v)
                    rng.standard_normal(m, dtype=np.float32, out=noise[:m])
                    np.multiply(noise[:m], NOISE * std, out=noise[:m])
                    np.add(v, noise[:m], out=v)
                to_bf16(v, bits[:m])
                f.write(memoryview(bits[:m]))
    tmp.rename(path)


def make(root: Path, experts: int, tiny: bool) -> tuple[Path, list[Path]]:
    """Writes (once) the base and `experts` fine-tunes under root; returns their folders."""
    sizes = QWEN2_TINY if tiny else QWEN2_05B
    marker = root / f"workload-qwen2-{'tiny-' if tiny else ''}{experts}.json"
    base_dir = root / "base"
    expert_dirs = [root / f"ft{i}" for i in range(experts)]
    if marker.is_file():
        return base_dir, expert_dirs
    names = shapes(sizes)
    for model, folder in enumerate([base_dir, *expert_dirs]):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config(sizes), indent=2))
        target = folder / "model.safetensors"
        if not target.is_file():
            write_model(target, names, model, None if model == 0 else base_dir / "model.safetensors")
            print(f"  wrote {folder}", flush=True)
    marker.write_text(json.dumps({"experts": experts, "seed": SEED, "noise": NOISE, **sizes}))
    return base_dir, expert_dirs


def _tensors(folder: Path) -> dict[str, Path]:
    index = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        index.update({k: path for k in header if k != "__metadata__"})
    return index


def _get(folder_index: dict[str, Path], name: str):  # noqa: ANN202
    from safetensors import safe_open

    with safe_open(str(folder_index[name]), "pt") as f:
        return f.get_tensor(name)


def threshold_ties(name: str, base: dict[str, Path], experts: list[dict[str, Path]], density: float):  # noqa: ANN201
    """Positions of tensor ``name`` where TIES' per-tensor top-k is a free choice: some model's |delta| equals its
    k-th largest magnitude while more than k magnitudes reach it (k = max(1, floor(density * size))). Which of
    those ties a tool keeps is its own rule (mergekit's is torch's unstable argsort order), so outputs there may
    differ by a kept value; everywhere else TIES is determined."""
    import torch

    b = _get(base, name).flatten().float()
    k = max(1, int(density * b.numel()))
    tied = torch.zeros(b.numel(), dtype=torch.bool)
    for expert in experts:
        magnitude = (_get(expert, name).flatten().float() - b).abs_()
        threshold = torch.topk(magnitude, k, sorted=False).values.min()
        at = magnitude == threshold
        if int((magnitude >= threshold).sum()) > k:
            tied |= at
        del magnitude, at
    return tied


def compare(reference: Path, other: Path, ties: tuple[Path, list[Path], float] | None = None) -> dict:
    """Tensor-by-tensor agreement of two outputs: names, shapes and dtypes, max |a - b|, and the fraction of elements
    that differ by more than one bf16 ulp of the larger magnitude (2^(floor(log2 max(|a|,|b|)) - 7)).

    With ``ties`` (the base, the fine-tunes and TIES' density) the same figures are also given outside the positions
    where the top-k choice is free (:func:`threshold_ties`), with the share of such positions."""
    import torch

    ref, oth = _tensors(reference), _tensors(other)
    problems = [f"only in {reference.name}: {k}" for k in sorted(ref.keys() - oth.keys())]
    problems += [f"only in {other.name}: {k}" for k in sorted(oth.keys() - ref.keys())]
    if ties is not None:
        ties_base, ties_experts = _tensors(ties[0]), [_tensors(e) for e in ties[1]]
    elements = beyond = tied_count = beyond_outside = 0
    max_diff, worst, max_outside = 0.0, "", 0.0
    for name in sorted(ref.keys() & oth.keys()):
        a, b = _get(ref, name), _get(oth, name)
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
            if a.shape != b.shape:
                continue
        a, b = a.flatten(), b.flatten()
        tied = threshold_ties(name, ties_base, ties_experts, ties[2]) if ties is not None else None
        for s in range(0, a.numel(), SLICE):
            x, y = a[s : s + SLICE].float(), b[s : s + SLICE].float()
            diff = (x - y).abs()
            _, exponent = torch.frexp(torch.maximum(x.abs(), y.abs()))
            off = diff > torch.ldexp(torch.ones_like(x), exponent - 8)
            beyond += int(off.sum())
            top = float(diff.max()) if diff.numel() else 0.0
            if top > max_diff or math.isnan(top):
                max_diff, worst = top, name
            if tied is not None:
                here = tied[s : s + SLICE]
                tied_count += int(here.sum())
                beyond_outside += int((off & ~here).sum())
                outside = diff[~here]
                max_outside = max(max_outside, float(outside.max()) if outside.numel() else 0.0)
        elements += a.numel()
    report = {
        "identical_layout": not problems,
        "problems": problems[:10],
        "tensors": len(ref.keys() & oth.keys()),
        "elements": elements,
        "max_abs_diff": max_diff,
        "worst_tensor": worst,
        "fraction_beyond_ulp": beyond / elements if elements else 0.0,
    }
    if ties is not None:
        report |= {
            "fraction_at_threshold_ties": tied_count / elements if elements else 0.0,
            "max_abs_diff_outside_ties": max_outside,
            "fraction_beyond_ulp_outside_ties": beyond_outside / elements if elements else 0.0,
        }
    return report


def main() -> int:
    if len(sys.argv) >= 4 and sys.argv[1] == "make":
        make(Path(sys.argv[2]), int(sys.argv[3]), "--tiny" in sys.argv[4:])
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        print(json.dumps(compare(Path(sys.argv[2]), Path(sys.argv[3]))))
        return 0
    if len(sys.argv) >= 8 and sys.argv[1] == "compare" and sys.argv[4] == "--threshold-ties":
        ties = (Path(sys.argv[5]), [Path(e) for e in sys.argv[7:]], float(sys.argv[6]))
        print(json.dumps(compare(Path(sys.argv[2]), Path(sys.argv[3]), ties)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
