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
``dykaf/docs/math.md`` for the derivation; names below follow it.

Every rule takes either one matrix (``G`` is ``m × n``, ``L`` is ``m × m``) or a block of ``b``
same-shape matrices stacked along a leading dimension (``b × m × n``, ``b × m × m``, ``b × n × n``):
the optimizer updates all of a transformer's equal-shape layers with one kernel per operation instead
of one per layer (``dykaf/blocks.py``). A block's scalars (norms, inner products) are ``b × 1 × 1``
tensors so that they broadcast over their own matrix; one matrix's are 0-d.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
from torch import Tensor

from dykaf.linalg import eigh

FactorRule = Literal["parallel", "sequential", "ema"]
FACTOR_RULES: tuple[str, ...] = ("parallel", "sequential", "ema")
InitRule = Literal["kron", "eps"]
INIT_RULES: tuple[str, ...] = ("kron", "eps")

# Scale of the ``eps`` initialisation: ‖L‖_F = ‖R‖_F = 1e-3.
EPS_INIT_SCALE = 1e-3


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Frobenius inner product ``⟨a, b⟩`` per matrix (0-d, or ``b × 1 × 1`` for a block), no host
    sync.

    A product and a per-matrix sum rather than one ``bmm`` of ``1 × k`` by ``k × 1``: BLAS computes
    a batch of one such product with another kernel than a longer batch, so a matrix's factors came
    out differently in a block of one than in a block of twelve. A sharded run, whose owner ranks
    step smaller blocks, must reproduce the unsharded run, and so must every way of grouping.
    """
    if a.ndim == 2:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum(dim=(-2, -1), keepdim=True)


def _norm(mat: Tensor) -> Tensor:
    """Frobenius norm per matrix (0-d, or ``b × 1 × 1``), clamped away from 0 so that dividing by it
    is safe."""
    norm = torch.linalg.vector_norm(mat, dim=(-2, -1), keepdim=mat.ndim > 2)
    return norm.clamp_min(torch.finfo(mat.dtype).tiny)


def _as_block(rule):  # type: ignore[no-untyped-def]
    """Run a rule on one matrix as a block of one: the single-matrix path is then the optimizer's
    batched path to the bit (a shadow's factors equal the optimizer's when they are linked), and
    each rule has one implementation."""

    @functools.wraps(rule)
    def run(*args: Any, **kwargs: Any) -> Any:
        if args[0].ndim != 2:
            return rule(*args, **kwargs)
        out = rule(*(a.unsqueeze(0) if isinstance(a, Tensor) else a for a in args), **kwargs)
        return out.squeeze(0) if isinstance(out, Tensor) else tuple(t.squeeze(0) for t in out)

    return run


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for one matrix or a block (``mm``/``bmm`` directly: ``@`` adds view ops per call)."""
    return torch.mm(a, b) if a.ndim == 2 else torch.bmm(a, b)


def _addmm(base: Tensor, a: Tensor, b: Tensor, *, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``beta·base + alpha·a @ b`` in one GEMM, for one matrix or a block."""
    if a.ndim == 2:
        return torch.addmm(base, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(base, a, b, beta=beta, alpha=alpha)


def _outer(a: Tensor, b: Tensor) -> Tensor:
    """``a bᵀ`` for vectors (``m``) or stacked vectors (``b × m``)."""
    return a.unsqueeze(-1) * b.unsqueeze(-2)


def top_singular_triple(grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triple ``(σ1, u, v)`` of ``grad`` via ``eigh`` of the smaller Gram matrix.

    Deterministic (no random start, unlike ``svd_lowrank``) and ``O(mn·min(m,n))``: the same order
    as one factor update, and it runs once per parameter. A block (``b × m × n``) gives ``b`` triples
    (``σ1`` of shape ``b``, ``u`` of ``b × m``, ``v`` of ``b × n``).
    """
    m, n = grad.shape[-2:]
    tiny = torch.finfo(grad.dtype).tiny
    if m <= n:
        evals, evecs = eigh(_mm(grad, grad.mT))
        u = evecs[..., -1]
        sigma = evals[..., -1].clamp_min(0).sqrt()
        v = (grad.mT @ u.unsqueeze(-1)).squeeze(-1)
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(tiny)
    else:
        evals, evecs = eigh(_mm(grad.mT, grad))
        v = evecs[..., -1]
        sigma = evals[..., -1].clamp_min(0).sqrt()
        u = (grad @ v.unsqueeze(-1)).squeeze(-1)
        u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(tiny)
    return sigma, u, v


def init_kron(grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``kron`` initialisation: the optimal Kronecker approximation of ``(1-β) vec(G)vec(G)ᵀ``.

    ``L = sqrt(1-β) σ1 uuᵀ``, ``R = sqrt(1-β) σ1 vvᵀ`` so ``L ⊗ R = (1-β) σ1² (uuᵀ ⊗ vvᵀ)``: exactly
    where an EMA started from zero stands after one step (the public code's weight 1 and ``σ1`` scale
    pins the factors to the first gradient for ~1/(1-β) steps; see the math page).
    """
    sigma, u, v = top_singular_triple(grad)
    scale = (math.sqrt(1.0 - beta) * sigma)[..., None, None]
    return scale * _outer(u, u), scale * _outer(v, v)


def init_eps(m: int, n: int, *, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``eps`` initialisation: ``L = 1e-3·I/sqrt(m)``, ``R = 1e-3·I/sqrt(n)`` (Frobenius norm 1e-3)."""
    left = torch.eye(m, dtype=dtype, device=device) * (EPS_INIT_SCALE / math.sqrt(m))
    right = torch.eye(n, dtype=dtype, device=device) * (EPS_INIT_SCALE / math.sqrt(n))
    return left, right


@_as_block
def update_ema(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Shampoo/SOAP rule: ``L ← βL + (1-β)GGᵀ``, ``R ← βR + (1-β)GᵀG`` (one fused GEMM per side)."""
    return (
        _addmm(left, grad, grad.mT, beta=beta, alpha=1.0 - beta),
        _addmm(right, grad.mT, grad, beta=beta, alpha=1.0 - beta),
    )


@_as_block
def update_one_sided(factor: Tensor, grad: Tensor, beta: float, side: Literal["left", "right"]) -> Tensor:
    """Decayed one-sided factor for a layer whose other side exceeds ``max_precond_dim``.

    The other side is held at identity, so the best single factor is the EMA of ``GGᵀ`` (left) or
    ``GᵀG`` (right) with the same decay β (the public code keeps an undecayed sum here).
    """
    first, second = (grad, grad.mT) if side == "left" else (grad.mT, grad)
    return _addmm(factor, first, second, beta=beta, alpha=1.0 - beta)


# How the rules below are evaluated. The math page writes them with unit factors ``U0 = L/‖L‖``,
# ``V0 = R/‖R‖``, scale ``s = β‖L‖‖R‖`` and ``Ĝ = sqrt(1-β)G``. Both rules' first matrix is
# ``K = sU0 + ĜV0Ĝᵀ = ‖R‖·K̂`` with ``K̂ = βL + (1-β)/‖R‖ · G V0 Gᵀ``, so ``U1 = K̂/‖K̂‖`` and every
# scalar the rules need (``⟨U0, U1⟩ = ⟨L, K̂⟩/(‖L‖‖K̂‖)``, ...) follow from ``K̂`` without ever
# normalising ``L``: one GEMM that accumulates into ``L`` (``addmm``) replaces a division, a scaled
# add and a temporary. On the large side only reductions and one final scaling remain, which matters
# most where the ``m × m`` passes are memory-bound (BENCHMARKS.md, "Factor-rule kernels"), and float32
# updates stay accurate over a wider range of gradient scales (tests/dykaf/test_kronecker.py).


def _k_hat(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """``(K̂, (1-β)/‖R‖ · V0)``: both rules' first matrix and the scaled unit factor it was built
    from (the parallel rule reuses it in its Galerkin term).

    Scalars are divided by Python floats, never the reverse: ``float / tensor`` costs two kernels.
    """
    norm = _norm(right)
    scaled_v0 = right / (norm * norm / (1.0 - beta))
    return _addmm(left, _mm(grad, scaled_v0), grad.mT, beta=beta), scaled_v0


def _parallel_tall(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """The parallel step for ``m ≥ n`` (see ``update_parallel``).

    ``K = ‖R‖·K̂``, ``M = ‖L‖·M̂`` with ``M̂ = βR + X/‖L‖``, ``X = ĜᵀU0Ĝ``, so ``U1 = K̂/‖K̂‖``,
    ``V1 = M̂/‖M̂‖`` and ``S1 = β⟨L,K̂⟩⟨R,M̂⟩/(‖K̂‖‖M̂‖) + (1-β)⟨K̂, GM̂Gᵀ⟩/(‖K̂‖‖M̂‖)``. The Galerkin term
    is ``⟨GᵀK̂G, M̂⟩`` with ``GᵀK̂G = β‖L‖X/(1-β) + D((1-β)R/‖R‖²)D``, ``D = GᵀG``: only ``n × n``
    products beyond the two the rule needs anyway, unless ``m < √2·n``, where forming ``K̂G`` and
    ``GM̂`` costs fewer flops than ``D`` and ``DRD``.
    """
    weight = 1.0 - beta
    rows, cols = grad.shape[-2:]
    k_hat, scaled_v0 = _k_hat(left, right, grad, beta)
    left_norm = _norm(left)
    x = _mm(grad.mT, _mm(left, grad) / (left_norm / weight))  # X = ĜᵀU0Ĝ
    m_hat = torch.add(x / left_norm, right, alpha=beta)
    k_norm, m_norm = _norm(k_hat), _norm(m_hat)
    if 2 * cols * cols < rows * rows:
        d = _mm(grad.mT, grad)
        gkg = torch.addcmul(_mm(_mm(d, scaled_v0), d), x, left_norm * (beta / weight))
        galerkin = _dot(gkg, m_hat)
    else:
        galerkin = _dot(_mm(k_hat, grad), _mm(grad, m_hat))
    # Each product formed from ratios of order ‖L‖ ≈ ‖R‖, so tiny factors do not underflow it.
    cross = weight * galerkin / (k_norm * m_norm)
    s1 = torch.addcmul(cross, _dot(left, k_hat) / k_norm, _dot(right, m_hat) / m_norm, value=beta)
    root = s1.clamp_min(0).sqrt()
    return k_hat * (root / k_norm), m_hat * (root / m_norm)


@_as_block
def update_parallel(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """DyKAF's parallel (basis-update & Galerkin) step; returns the new ``(L, R)``.

    ``s ← βs``, ``Ĝ = sqrt(1-β)G``; ``K = sU0 + ĜV0Ĝᵀ``, ``M = sV0 + ĜᵀU0Ĝ``; ``U1 = K/‖K‖``,
    ``V1 = M/‖M‖``; ``S1 = s⟨U0,U1⟩⟨V0,V1⟩ + ⟨U1, ĜV1Ĝᵀ⟩``; ``L = sqrt(S1)U1``, ``R = sqrt(S1)V1``.

    The rule is symmetric under ``G → Gᵀ`` with the factors swapped, so it is evaluated with the
    larger side as ``L`` (``_parallel_tall``), where the cheap form of the Galerkin term lives. A
    block holds one shape, hence one orientation.
    """
    if grad.shape[-2] >= grad.shape[-1]:
        return _parallel_tall(left, right, grad, beta)
    new_right, new_left = _parallel_tall(right, left, grad.mT, beta)
    return new_left, new_right


@_as_block
def update_sequential(left: Tensor, right: Tensor, grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Projector-splitting (KSL) step; returns the new ``(L, R)``.

    ``K = sU0 + ĜV0Ĝᵀ``, ``U1 = K/‖K‖``, ``Ŝ = ‖K‖``; backward S-step ``S̃ = Ŝ − ⟨U1, ĜV0Ĝᵀ⟩``;
    ``M = S̃V0 + ĜᵀU1Ĝ``, ``V1 = M/‖M‖``, ``S1 = ‖M‖``.

    ``S̃`` equals ``s⟨U1, U0⟩`` exactly (``Ŝ = ⟨U1, K⟩``), and the latter has no cancellation: when
    the new gradient dominates, the difference of two nearly equal numbers lost most float32 digits
    (CPU and CUDA then drifted apart by 1e-4 in 10 steps). With ``K = ‖R‖·K̂`` (see above),
    ``S̃V0 = β⟨L,K̂⟩/‖K̂‖ · R`` and ``ĜᵀU1Ĝ = Gᵀ(K̂G)·(1-β)/‖K̂‖``.
    """
    weight = 1.0 - beta
    k_hat, _ = _k_hat(left, right, grad, beta)
    k_norm = _norm(k_hat)
    s_tilde_v0 = right * (beta * _dot(left, k_hat) / k_norm)
    m_mat = _addmm(s_tilde_v0, grad.mT, _mm(k_hat, grad) / (k_norm / weight))
    root = _norm(m_mat).sqrt()
    return k_hat * (root / k_norm), m_mat / root


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
