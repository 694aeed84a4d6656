"""Independent reference implementations of each method over whole state dicts, written from the papers.

They deliberately share no code with ``hf_fusion``: TIES ranks the flattened model with ``torch.kthvalue`` as the
paper's code does, DARE regenerates its documented random stream chunk by chunk in full, and everything runs in
float64 so rounding in the engine shows up only as float32-level differences.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]


def load_state(folder: Path) -> StateDict:
    files = sorted(Path(folder).glob("*.safetensors"))
    state: StateDict = {}
    for f in files:
        state.update(load_file(f))
    return state


def floating(state: StateDict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def f64(state: StateDict) -> StateDict:
    return {k: v.double() for k, v in state.items()}


def simple_average(experts: list[StateDict]) -> StateDict:
    return {k: sum(e[k].double() for e in experts) / len(experts) for k in floating(experts[0])}


def weighted_average(experts: list[StateDict], weights: list[float], normalize: bool) -> StateDict:
    total = sum(weights) if normalize else 1.0
    return {k: sum(w * e[k].double() for w, e in zip(weights, experts)) / total for k in floating(experts[0])}


def linear(a: StateDict, b: StateDict, t: float) -> StateDict:
    return {k: (1 - t) * a[k].double() + t * b[k].double() for k in floating(b)}


def task_arithmetic(base: StateDict, experts: list[StateDict], lam: float) -> StateDict:
    return {k: base[k].double() + lam * sum(e[k].double() - base[k].double() for e in experts)
            for k in floating(experts[0])}


def expo(base: StateDict, experts: list[StateDict], alpha: float) -> StateDict:
    ft = simple_average(experts)
    return {k: ft[k] + alpha * (ft[k] - base[k].double()) for k in ft}


def slerp(a: StateDict, b: StateDict, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> StateDict:
    out = {}
    for k in floating(b):
        v0, v1 = a[k].double(), b[k].double()
        n0, n1 = v0.norm().item(), v1.norm().item()
        u0 = v0 / n0 if n0 > eps else v0
        u1 = v1 / n1 if n1 > eps else v1
        dot = (u0 * u1).sum().item()
        if abs(dot) > dot_threshold:
            out[k] = (1 - t) * v0 + t * v1
        else:
            omega = math.acos(dot)
            out[k] = (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)
    return out


def _flatten(states: list[StateDict], keys: list[str]) -> torch.Tensor:
    return torch.stack([torch.cat([s[k].reshape(-1) for k in keys]) for s in states])


def _ties_vector(tv: torch.Tensor, keep: float, merge_func: str) -> torch.Tensor:
    """TIES on an (n, D) matrix: top-k by kthvalue per row, elected sign with global zero fallback, disjoint merge."""
    d = tv.shape[1]
    k = d - int(d * keep)
    if k > 0:
        kth = tv.abs().kthvalue(k, dim=1, keepdim=True).values
        trimmed = tv * (tv.abs() >= kth)
    else:
        trimmed = tv.clone()
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    chosen = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * chosen
    if merge_func == "sum":
        return selected.sum(0)
    if merge_func == "mean":
        return selected.sum(0) / (selected != 0).sum(0).clamp(min=1)
    return selected.abs().max(0).values * sign


def ties(base: StateDict, experts: list[StateDict], lam: float, threshold: float, merge_func: str = "sum",
         scope: str = "model", task_vectors: list[StateDict] | None = None) -> StateDict:
    keys = sorted(floating(experts[0]))
    # float32 task vectors, as the engine computes them, so that magnitude ranks agree element for element
    tvs = task_vectors or [{k: e[k].float() - base[k].float() for k in keys} for e in experts]
    out = {}
    if scope == "model":
        merged = _ties_vector(_flatten(tvs, keys).double(), threshold / 100, merge_func)
        offset = 0
        for k in keys:
            n = base[k].numel()
            out[k] = base[k].double() + lam * merged[offset : offset + n].view(base[k].shape)
            offset += n
    else:
        for k in keys:
            merged = _ties_vector(_flatten(tvs, [k]).double(), threshold / 100, merge_func)
            out[k] = base[k].double() + lam * merged.view(base[k].shape)
    return out


def dare_keep_mask(seed: int, model_index: int, name: str, numel: int, p: float) -> torch.Tensor:
    """The documented DARE stream: per 2**20-element chunk, torch.rand from a blake2b-seeded CPU generator."""
    chunk = 1 << 20
    draws = []
    for c in range(math.ceil(numel / chunk)):
        digest = hashlib.blake2b(f"{seed}\x1f{model_index}\x1f{name}\x1f{c}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        draws.append(torch.rand(chunk, generator=g))
    return torch.cat(draws)[:numel] >= p


def dare_task_vectors(base: StateDict, experts: list[StateDict], p: float, seed: int, rescale: str = "inverse",
                      only: set[str] | None = None) -> list[StateDict]:
    """``only``: the tensor names DARE applies to (all when None); the others keep their whole task vector."""
    out = []
    for i, e in enumerate(experts):
        tv = {}
        for k in floating(e):
            delta = e[k].float() - base[k].float()
            if only is not None and k not in only:
                tv[k] = delta
                continue
            mask = dare_keep_mask(seed, i, k, delta.numel(), p).view(delta.shape)
            dropped = torch.where(mask, delta, torch.zeros(()))
            if rescale == "inverse":
                dropped = dropped / (1 - p)
            elif rescale == "l1" and dropped.abs().sum() > 0:
                dropped = dropped * (delta.abs().sum() / dropped.abs().sum())
            tv[k] = dropped
        out.append(tv)
    return out


def dare_task_arithmetic(base: StateDict, experts: list[StateDict], lam: float, p: float, seed: int,
                         rescale: str = "inverse", only: set[str] | None = None) -> StateDict:
    tvs = dare_task_vectors(base, experts, p, seed, rescale, only)
    return {k: base[k].double() + lam * sum(tv[k].double() for tv in tvs) for k in tvs[0]}
