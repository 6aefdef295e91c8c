"""Kronecker-factor update rules for a matrix gradient stream (pure functions).

Every rule tracks the exponential moving average of the empirical Fisher of one ``m × n`` weight,
``F_t = β F_{t-1} + (1-β) vec(G_t) vec(G_t)^T``, by a Kronecker product ``L ⊗ R``
(row-major ``vec``; ``L`` is ``m × m``, ``R`` is ``n × n``, both symmetric PSD):

* ``ema``        — Shampoo/SOAP: ``L ← βL + (1-β) G Gᵀ``, ``R ← βR + (1-β) Gᵀ G``.
* ``parallel``   — DyKAF's default: one step of the parallel (basis-update & Galerkin) rank-1
                   integrator on the Van Loan–Pitsianis rearrangement of ``F``.
* ``sequential`` — the Lubich–Oseledets projector-splitting (KSL) step on the same problem.

These functions are shared by the optimizer and by the Fisher diagnostics' shadow estimators, so
that a diagnostic "DyKAF factor" is exactly what the optimizer would hold. They never modify their
inputs (in particular never the gradient) and never form an ``mn × mn`` matrix. See
``shared/docs/dykaf-math.md`` for the derivation; names below follow it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from dykaf.linalg import eigh

FactorRule = Literal["parallel", "sequential", "ema"]
FACTOR_RULES: tuple[str, ...] = ("parallel", "sequential", "ema")
InitRule = Literal["kron", "eps"]
INIT_RULES: tuple[str, ...] = ("kron", "eps")

# Scale of the ``eps`` initialisation: ‖L‖_F = ‖R‖_F = 1e-3.
EPS_INIT_SCALE = 1e-3


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """Frobenius inner product ⟨a, b⟩ as a 0-d tensor (no host sync)."""
    return torch.sum(a * b)


def top_singular_triple(grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triple ``(σ1, u, v)`` of ``grad`` via ``eigh`` of the smaller Gram matrix.

    Deterministic (no random start, unlike ``svd_lowrank``) and ``O(mn·min(m,n))``: the same order
    as one factor update, and it runs once per parameter.
    """
    m, n = grad.shape
    if m <= n:
        evals, evecs = eigh(grad @ grad.T)
        u = evecs[:, -1]
        sigma = evals[-1].clamp_min(0).sqrt()
        v = grad.T @ u
        v = v / v.norm().clamp_min(torch.finfo(grad.dtype).tiny)
    else:
        evals, evecs = eigh(grad.T @ grad)
        v = evecs[:, -1]
        sigma = evals[-1].clamp_min(0).sqrt()
        u = grad @ v
        u = u / u.norm().clamp_min(torch.finfo(grad.dtype).tiny)
    return sigma, u, v


def init_kron(grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``kron`` initialisation: the optimal Kronecker approximation of ``(1-β) vec(G)vec(G)ᵀ``.

    ``L = sqrt(1-β) σ1 uuᵀ``, ``R = sqrt(1-β) σ1 vvᵀ`` so ``L ⊗ R = (1-β) σ1² (uuᵀ ⊗ vvᵀ)``: exactly
    where an EMA started from zero stands after one step (the public code's weight 1 and ``σ1`` scale
    pins the factors to the first gradient for ~1/(1-β) steps; see the math page).
    """
    sigma, u, v = top_singular_triple(grad)
    scale = math.sqrt(1.0 - beta) * sigma
    return scale * torch.outer(u, u), scale * torch.outer(v, v)


def init_eps(m: int, n: int, *, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``eps`` initialisation: ``L = 1e-3·I/sqrt(m)``, ``R = 1e-3·I/sqrt(n)`` (Frobenius norm 1e-3)."""
    left = torch.eye(m, dtype=dtype, device=device) * (EPS_INIT_SCALE / math.sqrt(m))
    right = torch.eye(n, dtype=dtype, device=device) * (EPS_INIT_SCALE / math.sqrt(n))
    return left, right


def update_ema(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Shampoo/SOAP rule: ``L ← βL + (1-β)GGᵀ``, ``R ← βR + (1-β)GᵀG``."""
    return (
        torch.lerp(left, grad @ grad.T, 1.0 - beta),
        torch.lerp(right, grad.T @ grad, 1.0 - beta),
    )


def update_one_sided(factor: Tensor, grad: Tensor, beta: float, side: Literal["left", "right"]) -> Tensor:
    """Decayed one-sided factor for a layer whose other side exceeds ``max_precond_dim``.

    The other side is held at identity, so the best single factor is the EMA of ``GGᵀ`` (left) or
    ``GᵀG`` (right) with the same decay β (the public code keeps an undecayed sum here).
    """
    outer = grad @ grad.T if side == "left" else grad.T @ grad
    return torch.lerp(factor, outer, 1.0 - beta)


def _split_scale(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Write ``L ⊗ R = s · U0 ⊗ V0`` with unit-Frobenius ``U0``, ``V0``."""
    left_norm = torch.linalg.matrix_norm(left)
    right_norm = torch.linalg.matrix_norm(right)
    tiny = torch.finfo(left.dtype).tiny
    return left / left_norm.clamp_min(tiny), right / right_norm.clamp_min(tiny), left_norm * right_norm


def _balanced(scale: Tensor, u1: Tensor, v1: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(sqrt(S)·U1, sqrt(S)·V1)``: equal norms on both sides keep float32 well-scaled."""
    root = scale.clamp_min(0).sqrt()
    return root * u1, root * v1


def _galerkin_cross_term(
    g: Tensor,
    u0: Tensor,
    v0: Tensor,
    y: Tensor,
    x: Tensor,
    k: Tensor,
    s: Tensor,
    unit: tuple[Tensor, Tensor],
    norms: tuple[Tensor, Tensor],
) -> Tensor:
    """``⟨U1, Ĝ V1 Ĝᵀ⟩`` of the parallel rule without another pair of full products.

    With ``Y = ĜV0Ĝᵀ``, ``X = ĜᵀU0Ĝ``, ``K = sU0 + Y``, ``M = sV0 + X`` (all already computed, as are
    ``unit = (U1, V1)`` and ``norms = (‖K‖, ‖M‖)``, both clamped away from 0):
    ``⟨K, ĜMĜᵀ⟩ = s⟨K, Y⟩ + s‖X‖² + ⟨Y, ĜXĜᵀ⟩``, and ``⟨Y, ĜXĜᵀ⟩ = ⟨Y, C U0 C⟩`` with ``C = ĜĜᵀ``
    or ``= ⟨V0, D X D⟩`` with ``D = ĜᵀĜ``. We take whichever of the three evaluation orders costs
    fewest flops for the shape (for 768×3072 this is 3.3× cheaper than forming ``U1Ĝ`` and ``ĜV1``).
    """
    rows, cols = g.shape
    direct_cost = rows * rows * cols + rows * cols * cols
    left_cost = rows * rows * cols + 2 * rows**3
    right_cost = rows * cols * cols + 2 * cols**3
    if direct_cost <= min(left_cost, right_cost):
        return _inner(unit[0] @ g, g @ unit[1])
    if left_cost <= right_cost:
        c = g @ g.T
        y_gxg = _inner(y, c @ u0 @ c)
    else:
        d = g.T @ g
        y_gxg = _inner(v0, d @ x @ d)
    numerator = s * (_inner(k, y) + _inner(x, x)) + y_gxg
    return numerator / (norms[0] * norms[1])


def update_parallel(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """DyKAF's parallel (basis-update & Galerkin) step; returns the new ``(L, R)``.

    ``s ← βs``, ``Ĝ = sqrt(1-β)G``; ``K = sU0 + ĜV0Ĝᵀ``, ``M = sV0 + ĜᵀU0Ĝ``; ``U1 = K/‖K‖``,
    ``V1 = M/‖M‖``; ``S1 = s⟨U0,U1⟩⟨V0,V1⟩ + ⟨U1, ĜV1Ĝᵀ⟩``; ``L = sqrt(S1)U1``, ``R = sqrt(S1)V1``.

    Written for few kernels (≈ 45 per update; a GPU runs small layers' updates launch-bound): fused
    multiply-adds, and the norms and unit factors computed once and shared with the cross term.
    """
    u0, v0, s = _split_scale(left, right)
    s = s * beta
    g = grad * math.sqrt(1.0 - beta)
    y = g @ v0 @ g.T
    x = g.T @ u0 @ g
    k = torch.addcmul(y, u0, s)
    m_mat = torch.addcmul(x, v0, s)
    tiny = torch.finfo(g.dtype).tiny
    k_norm = torch.linalg.matrix_norm(k).clamp_min(tiny)
    m_norm = torch.linalg.matrix_norm(m_mat).clamp_min(tiny)
    u1, v1 = k / k_norm, m_mat / m_norm
    cross = _galerkin_cross_term(g, u0, v0, y, x, k, s, (u1, v1), (k_norm, m_norm))
    s1 = torch.addcmul(cross, s * _inner(u0, u1), _inner(v0, v1))
    return _balanced(s1, u1, v1)


def update_sequential(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Projector-splitting (KSL) step; returns the new ``(L, R)``.

    ``K = sU0 + ĜV0Ĝᵀ``, ``U1 = K/‖K‖``, ``Ŝ = ‖K‖``; backward S-step ``S̃ = Ŝ − ⟨U1, ĜV0Ĝᵀ⟩``;
    ``M = S̃V0 + ĜᵀU1Ĝ``, ``V1 = M/‖M‖``, ``S1 = ‖M‖``.
    """
    u0, v0, s = _split_scale(left, right)
    s = s * beta
    g = grad * math.sqrt(1.0 - beta)
    y = g @ v0 @ g.T
    k = torch.addcmul(y, u0, s)
    tiny = torch.finfo(g.dtype).tiny
    u1 = k / torch.linalg.matrix_norm(k).clamp_min(tiny)
    # Backward S-step. ``Ŝ − ⟨U1, ĜV0Ĝᵀ⟩`` equals ``s⟨U1, U0⟩`` exactly (``Ŝ = ⟨U1, K⟩``), and the
    # latter has no cancellation: when the new gradient dominates, the difference of two nearly
    # equal numbers lost most float32 digits (CPU and CUDA then drifted apart by 1e-4 in 10 steps).
    s_tilde = s * _inner(u1, u0)
    m_mat = torch.addcmul(g.T @ u1 @ g, v0, s_tilde)
    m_norm = torch.linalg.matrix_norm(m_mat)
    v1 = m_mat / m_norm.clamp_min(tiny)
    return _balanced(m_norm, u1, v1)


def update_factors(
    rule: str, left: Tensor, right: Tensor, grad: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Dispatch one two-sided factor update by rule name."""
    if rule == "parallel":
        return update_parallel(left, right, grad, beta)
    if rule == "sequential":
        return update_sequential(left, right, grad, beta)
    if rule == "ema":
        return update_ema(left, right, grad, beta)
    raise ValueError(f"factor_rule must be one of {FACTOR_RULES}, got {rule!r}")
