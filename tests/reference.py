"""Independent reference implementations of each method over whole state dicts, written from the papers.

They deliberately share no code with ``hf_fusion``: TIES ranks the flattened model with ``torch.kthvalue`` as the
paper's code does, DARE regenerates its documented random stream chunk by chunk in full, and everything runs in
float64 so rounding in the engine shows up only as float32-level differences.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import scipy.linalg
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
    return {
        k: base[k].double() + lam * sum(e[k].double() - base[k].double() for e in experts) for k in floating(experts[0])
    }


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


def ties(
    base: StateDict,
    experts: list[StateDict],
    lam: float,
    threshold: float,
    merge_func: str = "sum",
    scope: str = "model",
    task_vectors: list[StateDict] | None = None,
) -> StateDict:
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


def keyed_draws(seed: int, model_index: int, name: str, numel: int) -> torch.Tensor:
    """The documented random stream: per 2**20-element chunk, torch.rand from a blake2b-seeded CPU generator."""
    chunk = 1 << 20
    draws = []
    for c in range(math.ceil(numel / chunk)):
        digest = hashlib.blake2b(f"{seed}\x1f{model_index}\x1f{name}\x1f{c}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        draws.append(torch.rand(chunk, generator=g))
    return torch.cat(draws)[:numel]


def dare_keep_mask(seed: int, model_index: int, name: str, numel: int, p: float) -> torch.Tensor:
    return keyed_draws(seed, model_index, name, numel) >= p


def dare_task_vectors(
    base: StateDict,
    experts: list[StateDict],
    p: float,
    seed: int,
    rescale: str = "inverse",
    only: set[str] | None = None,
) -> list[StateDict]:
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


def dare_task_arithmetic(
    base: StateDict,
    experts: list[StateDict],
    lam: float,
    p: float,
    seed: int,
    rescale: str = "inverse",
    only: set[str] | None = None,
) -> StateDict:
    tvs = dare_task_vectors(base, experts, p, seed, rescale, only)
    return {k: base[k].double() + lam * sum(tv[k].double() for tv in tvs) for k in tvs[0]}


# --- subspace, sparsification and alignment methods -------------------------------------------------------------
# Written from the papers with numpy / scipy in float64 where the engine uses torch: polar factors come from
# scipy.linalg.polar, ranks from numpy's stable argsort.


def _task_vectors(base: StateDict, experts: list[StateDict], k: str) -> np.ndarray:
    return np.stack([e[k].double().numpy() - base[k].double().numpy() for e in experts])


def _per_key(base: StateDict, experts: list[StateDict], matrix_fn, scale: float) -> StateDict:
    """base + scale * (matrix_fn(task matrices) for 2-D tensors, the mean task vector otherwise)."""
    out = {}
    for k in floating(experts[0]):
        tvs = _task_vectors(base, experts, k)
        merged = matrix_fn(tvs) if tvs.ndim == 3 else tvs.mean(axis=0)
        out[k] = base[k].double() + scale * torch.from_numpy(merged)
    return out


def _polar(a: np.ndarray) -> np.ndarray:
    return scipy.linalg.polar(a)[0]


def rank_cutoff(largest: float, shape: tuple[int, ...]) -> float:
    """The subspace methods' default: singular values at or below max(shape) x float32 eps x the largest are zero
    (the methods compute in float32; this reference, in float64, drops the same directions)."""
    return largest * max(shape) * float(np.finfo(np.float32).eps)


def tsv_matrix(tvs: np.ndarray) -> np.ndarray:
    n, rows, cols = tvs.shape
    r = min(rows, cols) // n
    if r == 0:
        return tvs.mean(axis=0)
    us, ss, vs = [], [], []
    for tv in tvs:
        u, s, vt = np.linalg.svd(tv, full_matrices=False)
        live = (s[:r] > 0) & (s[:r] > rank_cutoff(s[0], (rows, cols)))
        us.append(u[:, :r] * live)
        ss.append(s[:r] * live)
        vs.append(vt[:r] * live[:, None])
    u_cat, s_cat, v_cat = np.concatenate(us, axis=1), np.concatenate(ss), np.concatenate(vs, axis=0)
    return _polar(u_cat) @ np.diag(s_cat) @ _polar(v_cat.T).T


def tsv(base: StateDict, experts: list[StateDict], alpha: float = 1.0) -> StateDict:
    return _per_key(base, experts, tsv_matrix, alpha)


def iso_c_matrix(tvs: np.ndarray) -> np.ndarray:
    u, s, vt = np.linalg.svd(tvs.sum(axis=0), full_matrices=False)
    live = s > rank_cutoff(s[0], tvs.shape[1:])
    return u @ np.diag(s[live].mean() * live) @ vt


def iso_cts_matrix(tvs: np.ndarray, fraction: float) -> np.ndarray:
    n = len(tvs)
    k = min(tvs.shape[1:])
    common = k - round((k - int(k * fraction)) / n) * n
    per_task = (k - common) // n
    u, s, vt = np.linalg.svd(tvs.sum(axis=0), full_matrices=False)
    cutoff = rank_cutoff(s[0], tvs.shape[1:])
    live_c = s[:common] > cutoff
    uc = u[:, :common] * live_c
    us, ss, vs, lives = [uc], [s[:common]], [vt[:common] * live_c[:, None]], [live_c]
    for tv in tvs:
        ut, st, vtt = np.linalg.svd(tv - uc @ uc.T @ tv, full_matrices=False)
        live = st[:per_task] > cutoff
        us.append(ut[:, :per_task] * live)
        ss.append(st[:per_task])
        vs.append(vtt[:per_task] * live[:, None])
        lives.append(live)
    alive = np.concatenate(lives)
    kept = np.diag(np.concatenate(ss)[alive].mean() * alive)
    return _polar(np.concatenate(us, axis=1)) @ kept @ _polar(np.concatenate(vs, axis=0).T).T


def iso_c(base: StateDict, experts: list[StateDict], scale: float = 1.0) -> StateDict:
    return _per_key(base, experts, iso_c_matrix, scale)


def iso_cts(base: StateDict, experts: list[StateDict], scale: float = 1.0, fraction: float = 0.8) -> StateDict:
    return _per_key(base, experts, lambda tvs: iso_cts_matrix(tvs, fraction), scale)


def wudi(base: StateDict, experts: list[StateDict], iter_num: int = 400, lr: float = 1e-5) -> StateDict:
    """The paper's loss through autograd, sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2, minimised by Adam."""

    def matrix(tvs: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(tvs).float()
        live = t.flatten(1).norm(dim=1) > 0
        t_live = t[live]
        merged = torch.nn.Parameter(t.sum(0).clone())
        opt = torch.optim.Adam([merged], lr=lr)
        for _ in range(iter_num):
            loss = (
                ((merged - t_live) @ t_live.transpose(1, 2)).square().sum((1, 2)) / t_live.square().sum((1, 2))
            ).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return merged.detach().double().numpy()

    return _per_key(base, experts, matrix, 1.0)


def magmax(base: StateDict, experts: list[StateDict], scale: float = 0.5) -> StateDict:
    out = {}
    for k in floating(experts[0]):
        tvs = _task_vectors(base, experts, k)
        pick = (len(tvs) - 1) - np.abs(tvs[::-1]).argmax(axis=0)  # ties go to the later model
        chosen = np.take_along_axis(tvs, pick[None], axis=0)[0]
        out[k] = base[k].double() + scale * torch.from_numpy(chosen)
    return out


def model_stock(base: StateDict, experts: list[StateDict]) -> StateDict:
    n, out = len(experts), {}
    for k in floating(experts[0]):
        tvs = _task_vectors(base, experts, k).reshape(n, -1)
        angles = []
        for i in range(n):
            for j in range(i + 1, n):
                cos = tvs[i] @ tvs[j] / (np.linalg.norm(tvs[i]) * np.linalg.norm(tvs[j]) + 1e-8)
                angles.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
        cos = np.cos(np.radians(np.mean(angles)))
        t = n * cos / ((n - 1) * cos + 1 + 1e-8)
        avg = sum(e[k].double() for e in experts) / n
        out[k] = t * avg + (1 - t) * base[k].double()
    return out


def breadcrumbs(
    base: StateDict, experts: list[StateDict], scale: float = 0.3, density: float = 0.9, gamma: float = 0.01
) -> StateDict:
    out = {}
    for k in floating(experts[0]):
        total = torch.zeros_like(base[k], dtype=torch.float64)
        for e in experts:
            delta = (e[k].float() - base[k].float()).reshape(-1)  # float32 magnitudes rank as the engine's do
            size = delta.numel()
            top, bottom = int(gamma * size), size - int(density * size) - int(gamma * size)
            if bottom < 0:
                top, bottom = top + bottom, 0
            ranks = np.argsort(np.argsort(np.abs(delta.numpy()), kind="stable"), kind="stable")
            keep = torch.from_numpy((ranks >= bottom) & (ranks < size - top))
            total += (delta.double() * keep).view(base[k].shape)
        out[k] = base[k].double() + scale * total
    return out


def della(
    base: StateDict,
    experts: list[StateDict],
    scale: float = 1.0,
    density: float = 0.7,
    epsilon: float = 0.1,
    seed: int = 0,
) -> StateDict:
    out = {}
    for k in floating(experts[0]):
        pruned = []
        for i, e in enumerate(experts):
            delta = e[k].float() - base[k].float()
            rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 1 else delta.reshape(1, -1)
            width = rows.shape[1]
            ranks = np.argsort(np.argsort(np.abs(rows.numpy()), axis=1, kind="stable"), axis=1, kind="stable")
            spread = ranks / (width - 1) if width > 1 else np.full(rows.shape, 0.5)
            p = torch.from_numpy(density - epsilon + 2 * epsilon * spread).float().view(delta.shape)
            draws = keyed_draws(seed, i, k, delta.numel()).view(delta.shape)
            pruned.append(torch.where(draws < p, delta / p, torch.zeros(())).double())
        stacked = torch.stack(pruned)
        sign = torch.sign(stacked.sum(0))
        agree = torch.where(sign > 0, stacked > 0, stacked < 0)
        merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
        out[k] = base[k].double() + scale * merged
    return out


def karcher(
    experts: list[StateDict],
    base: StateDict | None = None,
    weights: list[float] | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> StateDict:
    w = np.array(weights or [1.0] * len(experts), dtype=np.float64)
    w = w / w.sum()
    out = {}
    for k in floating(experts[0]):
        origin = base[k].double().numpy() if base is not None else 0.0
        xs = [e[k].double().numpy() - origin for e in experts]
        norms = np.array([np.linalg.norm(x) for x in xs])
        scale = float((w * norms).sum())
        live = [(wi, x / n) for wi, x, n in zip(w, xs, norms) if n > 0]
        lw = np.array([wi for wi, _ in live])
        lw = lw / lw.sum()
        units = [u for _, u in live]
        mean = sum(wi * u for wi, u in zip(lw, units))
        m = mean / np.linalg.norm(mean)
        for _ in range(max_iter):
            logs = []
            for wi, u in zip(lw, units):
                c = np.clip(np.vdot(m, u), -1, 1)
                theta = np.arccos(c)
                logs.append(wi * theta / np.sin(theta) * (u - c * m) if theta > tol else 0 * m)
            step = sum(logs)
            length = np.linalg.norm(step)
            if length < tol:
                break
            m = np.cos(length) * m + np.sin(length) * step / length
            m = m / np.linalg.norm(m)
        out[k] = torch.from_numpy(origin + scale * m)
    return out


def tall_masks(base: StateDict, experts: list[StateDict], lam: float = 0.6) -> list[StateDict]:
    outs: list[StateDict] = [{} for _ in experts]
    for k in floating(experts[0]):
        tvs = _task_vectors(base, experts, k)
        mtl = tvs.sum(axis=0)
        for t in range(len(experts)):
            mask = np.abs(tvs[t]) > lam * np.abs(mtl - tvs[t])
            outs[t][k] = base[k].double() + torch.from_numpy(mask * mtl)
    return outs


def consensus(
    base: StateDict, experts: list[StateDict], scale: float = 0.3, lam: float = 0.6, k_min: int = 2
) -> StateDict:
    out = {}
    for k in floating(experts[0]):
        tvs = _task_vectors(base, experts, k)
        mtl = tvs.sum(axis=0)
        votes = sum((np.abs(tv) > lam * np.abs(mtl - tv)).astype(int) for tv in tvs)
        out[k] = base[k].double() + scale * torch.from_numpy(mtl * (votes >= k_min))
    return out


def emr(base: StateDict, experts: list[StateDict]) -> list[StateDict]:
    keys = floating(experts[0])
    n = len(experts)
    unified, masks = {}, {}
    before, after = np.zeros(n), np.zeros(n)
    for k in keys:
        tvs = _task_vectors(base, experts, k)
        sign = np.where(tvs.sum(axis=0) > 0, 1.0, -1.0)
        m = tvs * sign > 0
        unified[k] = np.abs(tvs * m).max(axis=0) * sign
        masks[k] = m
        before += np.abs(tvs).reshape(n, -1).mean(axis=1)
        after += np.abs(m * unified[k]).reshape(n, -1).mean(axis=1)
    rescale = np.where(after > 0, before / np.where(after > 0, after, 1), 1.0)
    return [
        {k: base[k].double() + torch.from_numpy(rescale[t] * masks[k][t] * unified[k]) for k in keys} for t in range(n)
    ]


def scope_aligned_average(
    experts: list[StateDict], weights: list[float] | None = None, normalize: bool = True
) -> StateDict:
    w = np.array(weights or [1.0] * len(experts), dtype=np.float64)
    wn = w / w.sum()
    out = {}
    for k in floating(experts[0]):
        xs = [e[k].double().numpy() for e in experts]
        mus = np.array([x.mean() for x in xs])
        sds = np.array([x.std() for x in xs])
        if xs[0].size > 1 and sds.min() > 0:
            mu_t, sd_t = (wn * mus).sum(), (wn * sds).sum()
            xs = [(x - m) / s * sd_t + mu_t for x, m, s in zip(xs, mus, sds)]
        total = sum(wi * x for wi, x in zip(w, xs))
        out[k] = torch.from_numpy(total / (w.sum() if normalize else 1.0))
    return out
