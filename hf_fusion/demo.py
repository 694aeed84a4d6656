"""``hf-fusion demo``: build a tiny local pool, fuse it with several methods, and reload every result.

Runs with no network in a few seconds, so a fresh install can be checked end to end: the pool is a small random
BERT classifier and three perturbed copies standing in for fine-tuned models.
"""

from __future__ import annotations

from pathlib import Path

DEMO_METHODS = ("simple_average", "task_arithmetic", "ties_merging", "dare_ties_merging", "slerp")


def run_demo(folder: Path, *, show_progress: bool = True) -> list[dict[str, object]]:
    """Fuses the demo pool with each method into ``folder/<method>``; returns one row per method."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_fusion.pipeline import merge
    from hf_fusion.registry import BaseUse, get_method
    from hf_fusion.toy import example_inputs, make_pool

    pool = folder / "pool"
    if not (pool / "bert_base" / "model.safetensors").is_file():
        make_pool(pool, "bert", 3)
    base, experts = pool / "bert_base", [pool / f"bert_ft{i}" for i in range(3)]
    base_model = AutoModelForSequenceClassification.from_pretrained(base)
    base_vector = torch.cat([p.detach().reshape(-1) for p in base_model.parameters()])
    rows: list[dict[str, object]] = []
    for method in DEMO_METHODS:
        models = [str(experts[0])] if method == "slerp" else [str(e) for e in experts]
        uses_base = get_method(method).base is not BaseUse.UNUSED
        result = merge(models=models, base=str(base) if uses_base else None, method=method, output=folder / method,
                       overwrite=True, show_progress=show_progress)
        fused = AutoModelForSequenceClassification.from_pretrained(result.output).eval()
        vector = torch.cat([p.detach().reshape(-1) for p in fused.parameters()])
        with torch.no_grad():
            logits = fused(**example_inputs("bert")).logits
        rows.append({
            "method": method,
            "seconds": round(result.seconds, 3),
            "output": str(result.output),
            "relative change from base": float((vector - base_vector).norm() / base_vector.norm()),
            "reloads with from_pretrained": bool(logits.isfinite().all()),
        })
    return rows


def format_rows(rows: list[dict[str, object]]) -> str:
    headers = list(rows[0])
    cells = [[f"{r[h]:.4f}" if isinstance(r[h], float) else str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
