"""Second-moment estimates in the rotated basis: ``full`` (an ``m × n`` EMA) or ``rank1``.

``rank1`` keeps ``v ≈ l rᵀ`` with two vectors and updates them with the same parallel rank-1
integrator DyKAF applies to its Kronecker factors, applied to ``V ← β2 V + (1-β2) G'∘G'``. It never
allocates a persistent ``m × n`` buffer (the public code still does) — that is its whole point.
Vectors are stored balanced: ``‖l‖ = ‖r‖ = sqrt(S)`` so ``v = l rᵀ``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _unit(vector: Tensor) -> Tensor:
    """``vector/‖vector‖``, or the uniform unit vector when it is zero (first update from V = 0)."""
    norm = vector.norm()
    uniform = torch.full_like(vector, 1.0 / math.sqrt(vector.numel()))
    # torch.where instead of an ``if``: no host synchronisation on CUDA every step.
    return torch.where(norm > 0, vector / norm.clamp_min(torch.finfo(vector.dtype).tiny), uniform)


def update_rank1(row: Tensor, col: Tensor, squared: Tensor, beta2: float) -> tuple[Tensor, Tensor]:
    """One parallel rank-1 integrator step for ``V ← β2 V + (1-β2) squared``; returns new ``(l, r)``.

    ``s = β2‖l‖‖r‖``, ``E = (1-β2)·squared``; ``K = s l̂ + E r̂``, ``M = s r̂ + Eᵀ l̂``;
    ``l1 = K/‖K‖``, ``r1 = M/‖M‖``; ``S1 = s(l̂·l1)(r̂·r1) + l1ᵀ E r1``. All terms are non-negative,
    so ``l`` and ``r`` stay non-negative and ``sqrt(v)`` is defined.
    """
    scale = beta2 * row.norm() * col.norm()
    row_unit, col_unit = _unit(row), _unit(col)
    weighted = squared * (1.0 - beta2)
    k = scale * row_unit + weighted @ col_unit
    m = scale * col_unit + weighted.T @ row_unit
    tiny = torch.finfo(k.dtype).tiny
    row1 = k / k.norm().clamp_min(tiny)
    col1 = m / m.norm().clamp_min(tiny)
    new_scale = scale * (row_unit @ row1) * (col_unit @ col1) + row1 @ weighted @ col1
    root = new_scale.clamp_min(0).sqrt()
    return root * row1, root * col1


def rank1_denominator(row: Tensor, col: Tensor, eps: float) -> Tensor:
    """``sqrt(l rᵀ) + ε`` as a temporary (``ε`` added; the public code had none)."""
    return torch.outer(row.clamp_min(0).sqrt(), col.clamp_min(0).sqrt()).add_(eps)
