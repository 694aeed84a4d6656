"""Combining LoRA updates without forming the dense delta: weighted concatenation and its cheap truncated SVD.

A weighted sum of LoRA updates ``sum_i w_i s_i B_i A_i`` is itself a LoRA update of rank ``sum_i r_i``:
``B = [w_1 s_1 B_1, ..., w_n s_n B_n]`` (``[out, sum r]``) and ``A = [A_1; ...; A_n]`` (``[sum r, in]``), exact with
scale 1. Truncating it to a smaller rank needs no ``[out, in]`` matrix either: with ``B = Q_b R_b`` and
``A^T = Q_a R_a`` (thin QR), ``B A = Q_b (R_b R_a^T) Q_a^T``, so the SVD of the small ``R_b R_a^T`` gives the best
rank-``k`` approximation of ``B A`` (Eckart-Young), at the cost of QRs of the thin factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_fusion.adapters.extract import LowRankFactors, choose_rank


def concatenate(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``b @ a == sum_i coef_i * b_i @ a_i`` for parts ``(a_i, b_i, coef_i)``, in float32."""
    a = torch.cat([part[0].float() for part in parts], dim=0)
    b = torch.cat([part[1].float() * part[2] for part in parts], dim=1)
    return a.contiguous(), b.contiguous()


def truncate(a: torch.Tensor, b: torch.Tensor, max_rank: int, threshold: float | None = None) -> LowRankFactors:
    """The best approximation of ``b @ a`` of rank ``choose_rank(S, max_rank, threshold)``, through QR of the
    factors; ``energy`` is the share of ``||b @ a||_F^2`` kept (1 when the product is zero)."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    rank = choose_rank(s, max_rank, threshold)
    squares = s.square()
    total = float(squares.sum())
    energy = float(squares[:rank].sum()) / total if total > 0 else 1.0
    root = s[:rank].sqrt()
    new_b = (q_b @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ q_a.T)
    return LowRankFactors(a=new_a.float().contiguous(), b=new_b.float().contiguous(), energy=min(energy, 1.0))
