"""Second-moment estimates in the rotated basis: ``full`` (an ``m × n`` EMA) or ``rank1``.

``rank1`` keeps ``v ≈ l rᵀ`` with two vectors and updates them with the same parallel rank-1
integrator DyKAF applies to its Kronecker factors, applied to ``V ← β2 V + (1-β2) G'∘G'``. It never
allocates a persistent ``m × n`` buffer (the public code still does) — that is its whole point.
Vectors are stored balanced: ``‖l‖ = ‖r‖ = sqrt(S)`` so ``v = l rᵀ``. Both functions take one
matrix's vectors (``m``, ``n``; ``squared`` ``m × n``) or a block's (``b × m``, ``b × n``;
``b × m × n``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _unit(vector: Tensor) -> Tensor:
    """``vector/‖vector‖``, or the uniform unit vector when it is zero (first update from V = 0)."""
    norm = torch.linalg.vector_norm(vector, dim=-1, keepdim=True)
    uniform = torch.full_like(vector, 1.0 / math.sqrt(vector.shape[-1]))
    # torch.where instead of an ``if``: no host synchronisation on CUDA every step.
    return torch.where(norm > 0, vector / norm.clamp_min(torch.finfo(vector.dtype).tiny), uniform)


def update_rank1(row: Tensor, col: Tensor, squared: Tensor, beta2: float) -> tuple[Tensor, Tensor]:
    """One parallel rank-1 integrator step for ``V ← β2 V + (1-β2) squared``; returns new ``(l, r)``.

    ``s = β2‖l‖‖r‖``, ``E = (1-β2)·squared``; ``K = s l̂ + E r̂``, ``M = s r̂ + Eᵀ l̂``;
    ``l1 = K/‖K‖``, ``r1 = M/‖M‖``; ``S1 = s(l̂·l1)(r̂·r1) + l1ᵀ E r1``. All terms are non-negative,
    so ``l`` and ``r`` stay non-negative and ``sqrt(v)`` is defined.
    """

    def norm(vector: Tensor) -> Tensor:
        return torch.linalg.vector_norm(vector, dim=-1, keepdim=True)

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return torch.sum(a * b, dim=-1, keepdim=True)

    def matvec(matrix: Tensor, vector: Tensor) -> Tensor:
        return (matrix @ vector.unsqueeze(-1)).squeeze(-1)

    scale = beta2 * norm(row) * norm(col)
    row_unit, col_unit = _unit(row), _unit(col)
    weighted = squared * (1.0 - beta2)
    k = scale * row_unit + matvec(weighted, col_unit)
    m = scale * col_unit + matvec(weighted.mT, row_unit)
    tiny = torch.finfo(k.dtype).tiny
    row1 = k / norm(k).clamp_min(tiny)
    col1 = m / norm(m).clamp_min(tiny)
    new_scale = scale * dot(row_unit, row1) * dot(col_unit, col1) + dot(row1, matvec(weighted, col1))
    root = new_scale.clamp_min(0).sqrt()
    return root * row1, root * col1


def rank1_denominator(row: Tensor, col: Tensor, eps: float) -> Tensor:
    """``sqrt(l rᵀ) + ε`` as a temporary (``ε`` added; the public code had none)."""
    return (row.clamp_min(0).sqrt().unsqueeze(-1) * col.clamp_min(0).sqrt().unsqueeze(-2)).add_(eps)
