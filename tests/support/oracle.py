"""Independent float64 references written from the math page, for tests only.

They work on the explicitly rearranged matrices (Van Loan–Pitsianis): the approximation ``s·U⊗V`` is
the rank-1 matrix ``s·vec(U)vec(V)ᵀ`` and a gradient's term ``Ĝ⊗Ĝ`` is formed with ``torch.kron`` as an
``m² × n²`` matrix. Nothing here shares code with ``dykaf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def vec(x: Tensor) -> Tensor:
    return x.reshape(-1)


def rearranged_step(
    left: Tensor, right: Tensor, grad: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Return ``(A, u0, v0, s, ΔA)`` with ``A = β·s·u0 v0ᵀ + ΔA`` in rearranged coordinates."""
    u0 = vec(left) / left.norm()
    v0 = vec(right) / right.norm()
    s = beta * left.norm() * right.norm()
    g = grad * math.sqrt(1 - beta)
    delta = torch.kron(g, g)  # (m², n²): [(i,j),(k,l)] = g_ik g_jl  → rearranged vec(g)vec(g)ᵀ
    return s * torch.outer(u0, v0) + delta, u0, v0, s, delta


def parallel_step(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    m, n = grad.shape
    a, u0, v0, _, _ = rearranged_step(left, right, grad, beta)
    k = a @ v0
    mm = a.T @ u0
    u1, v1 = k / k.norm(), mm / mm.norm()
    s1 = u1 @ a @ v1  # Galerkin projection of the updated matrix onto the new bases
    return (s1.sqrt() * u1).reshape(m, m), (s1.sqrt() * v1).reshape(n, n)


def sequential_step(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    m, n = grad.shape
    a, _u0, v0, _, delta = rearranged_step(left, right, grad, beta)
    k = a @ v0
    s_hat = k.norm()
    u1 = k / s_hat
    s_tilde = s_hat - u1 @ delta @ v0
    mm = s_tilde * v0 + delta.T @ u1
    s1 = mm.norm()
    v1 = mm / s1
    return (s1.sqrt() * u1).reshape(m, m), (s1.sqrt() * v1).reshape(n, n)


def ema_step(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    return beta * left + (1 - beta) * grad @ grad.T, beta * right + (1 - beta) * grad.T @ grad


def rearrange(fisher: Tensor, m: int, n: int) -> Tensor:
    """Van Loan–Pitsianis rearrangement of an ``mn × mn`` matrix into ``m² × n²``."""
    blocks = fisher.reshape(m, n, m, n)  # [i, k, j, l] for row (i,k), column (j,l)
    return blocks.permute(0, 2, 1, 3).reshape(m * m, n * n)


def kron_rel_err(fisher: Tensor, left: Tensor, right: Tensor) -> float:
    """Scale-optimal ``min_c ‖F − c L⊗R‖ / ‖F‖`` with the Kronecker product formed explicitly."""
    approx = torch.kron(left, right)
    c = (fisher * approx).sum() / (approx * approx).sum()
    return float((fisher - c * approx).norm() / fisher.norm())


def optimal_kron_err(fisher: Tensor, m: int, n: int) -> float:
    """Error of the best Kronecker approximation: the rank-1 SVD tail of the rearranged matrix."""
    sv = torch.linalg.svdvals(rearrange(fisher, m, n))
    return float(sv[1:].norm() / sv.norm())
