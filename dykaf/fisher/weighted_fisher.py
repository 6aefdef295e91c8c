"""Implicit quantities of a weighted empirical Fisher ``H = Σ_i w_i vec(G_i) vec(G_i)ᵀ``.

``H`` is ``mn × mn``: at real layer sizes (768×3072 → 5.6e12 entries) it cannot be formed, but every
number the diagnostics need is a Gram product of the stored gradients ``G_i`` (row-major ``vec``):

* ``‖H‖² = Σ_ij w_i w_j ⟨G_i, G_j⟩²``                                  — ``O(W² mn)``
* ``⟨H, A⊗B⟩ = Σ_i w_i ⟨G_i, A G_i B⟩``, ``‖A⊗B‖ = ‖A‖‖B‖``              — ``O(W mn(m+n))``
* ``diag(Qᵀ H Q) = Σ_i w_i (Q_Lᵀ G_i Q_R)∘²`` for ``Q = Q_L ⊗ Q_R``      — ``O(W mn(m+n))``
* the optimal Kronecker approximation of ``H``: the top singular pair of the Van Loan–Pitsianis
  rearrangement ``Σ_i w_i G_i ⊗ G_i``, found by Lanczos on ``T*T`` with ``T: B ↦ Σ_i w_i G_i B G_iᵀ``
  and its adjoint ``T*: A ↦ Σ_i w_i G_iᵀ A G_i``                           — ``O(W mn(m+n))`` per step

Work is chunked over the window so that the peak extra memory stays near one chunk of gradients
rather than several copies of the window. ``dense.py`` computes the same numbers from an explicit
float64 ``H`` and is the test oracle for this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from dykaf.linalg import eigh

# Gradients processed per chunk are capped at about this many elements (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Spectral:
    """A symmetric factor as ``Q diag(λ) Qᵀ``; ``basis=None`` means the identity basis."""

    basis: Tensor | None
    values: Tensor


@dataclass(frozen=True)
class OptimalKronecker:
    """Best Frobenius Kronecker approximation ``σ · A ⊗ B`` of ``H`` (``‖A‖ = ‖B‖ = 1``, symmetric;
    PSD at convergence).

    ``iterations``/``converged`` say how the Lanczos iteration ended (``T*T`` applications);
    ``sigma`` is ``⟨H, A⊗B⟩`` for the returned pair, so ``sqrt(1 − σ²/‖H‖²)`` is the exact
    relative error of that pair (an upper bound on the floor that meets it at convergence).
    """

    left: Tensor
    right: Tensor
    sigma: float
    iterations: int
    converged: bool


@contextmanager
def full_precision() -> Iterator[None]:
    """Run float32 matrix products at full precision, restoring the caller's setting afterwards.

    Training scripts often allow TF32/bf16 products for speed; at their ~1e-3 precision the power
    iteration's σ never settles within tolerance and the metrics get noisy.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def window_weights(ages: Tensor, beta: float) -> Tensor:
    """Normalised exponential weights ``w ∝ β^age`` (age 0 = newest gradient), summing to 1."""
    raw = torch.pow(torch.full_like(ages, beta, dtype=torch.float64), ages.to(torch.float64))
    return raw / raw.sum()


def relative_error(inner: float, h_norm_sq: float, approx_norm_sq: float) -> float:
    """``min_c ‖H − cX‖/‖H‖ = sqrt(1 − ⟨H,X⟩²/(‖H‖²‖X‖²))``; NaN when either side is zero."""
    if h_norm_sq <= 0.0 or approx_norm_sq <= 0.0:
        return math.nan
    cos_sq = inner * inner / (h_norm_sq * approx_norm_sq)
    return math.sqrt(max(0.0, 1.0 - cos_sq))


def spectral(factor: Tensor | None, size: int, like: Tensor) -> Spectral:
    """Eigen-decompose a symmetric factor (``dykaf.linalg.eigh``: float64 retry); None → identity."""
    if factor is None:
        return Spectral(None, torch.ones(size, dtype=like.dtype, device=like.device))
    mat = factor.to(dtype=like.dtype, device=like.device)
    mat = 0.5 * (mat + mat.T)  # eigh reads one triangle; symmetrise so rounding cannot bias it
    values, basis = eigh(mat)
    return Spectral(basis, values)


class WeightedFisher:
    """The weighted Fisher of a window of gradients, held implicitly.

    ``grads`` is ``(k, m, n)``; ``weights`` (``k``, non-negative, any scale — normalised here) gives
    each gradient's share. Products run in ``grads``' dtype; scalar results are returned as Python
    floats accumulated in float64.
    """

    def __init__(self, grads: Tensor, weights: Tensor) -> None:
        if grads.ndim != 3 or grads.shape[0] == 0:
            raise ValueError(f"grads must be a non-empty (k, m, n) stack, got shape {tuple(grads.shape)}")
        if weights.shape != grads.shape[:1]:
            raise ValueError(f"weights must have shape ({grads.shape[0]},), got {tuple(weights.shape)}")
        self.grads = grads
        w = weights.to(dtype=torch.float64, device=grads.device)
        self.weights64 = w / w.sum()
        self.weights = self.weights64.to(grads.dtype)
        _, rows, cols = grads.shape
        self.shape = (rows, cols)
        self._chunk = max(1, _CHUNK_ELEMENTS // max(1, rows * cols))
        self._norm_sq: float | None = None

    # ------------------------------------------------------------------ helpers
    def _chunks(self) -> list[tuple[Tensor, Tensor]]:
        """Pairs ``(G_chunk, w_chunk)`` covering the window."""
        return list(zip(self.grads.split(self._chunk), self.weights.split(self._chunk), strict=True))

    def reshaped(self, rows: int, cols: int) -> WeightedFisher:
        """The same ``H`` seen through another matrix shape of the gradients (row-major ``vec`` is
        unchanged by a reshape, so ``H`` is identical; only which Kronecker structure fits changes)."""
        if (rows, cols) == self.shape:
            return self
        view = WeightedFisher(self.grads.reshape(self.grads.shape[0], rows, cols), self.weights64)
        view._norm_sq = self._norm_sq
        return view

    # ------------------------------------------------------------------ quantities
    def norm_sq(self) -> float:
        """``‖H‖_F² = wᵀ (K∘K) w`` with the Gram matrix ``K_ij = ⟨G_i, G_j⟩``."""
        if self._norm_sq is None:
            flat = self.grads.reshape(self.grads.shape[0], -1)
            gram = (flat @ flat.T).to(torch.float64)
            self._norm_sq = float(self.weights64 @ (gram * gram) @ self.weights64)
        return self._norm_sq

    def norm(self) -> float:
        """``‖H‖_F``."""
        return math.sqrt(self.norm_sq())

    def kron_inner(self, left: Tensor | None, right: Tensor | None) -> float:
        """``⟨H, A⊗B⟩ = Σ_i w_i ⟨G_i, A G_i Bᵀ⟩`` (``None`` = identity on that side)."""
        total = torch.zeros((), dtype=torch.float64, device=self.grads.device)
        a = None if left is None else left.to(self.grads)
        b = None if right is None else right.to(self.grads)
        for chunk, w in self._chunks():
            prod = chunk if a is None else torch.matmul(a, chunk)
            prod = prod if b is None else torch.matmul(prod, b.T)
            per_grad = (chunk * prod).sum(dim=(1, 2), dtype=torch.float64)
            total = total + per_grad @ w.to(torch.float64)
        return float(total)

    def rotated_diag(self, left_basis: Tensor | None, right_basis: Tensor | None) -> Tensor:
        """``diag(Qᵀ H Q)`` as an ``m × n`` matrix: ``Σ_i w_i (Q_Lᵀ G_i Q_R)∘²`` (None = identity)."""
        rows, cols = self.shape
        out = torch.zeros(rows, cols, dtype=self.grads.dtype, device=self.grads.device)
        ql_t = None if left_basis is None else left_basis.to(self.grads).T
        qr = None if right_basis is None else right_basis.to(self.grads)
        for chunk, w in self._chunks():
            rot = chunk if ql_t is None else torch.matmul(ql_t, chunk)
            rot = rot if qr is None else torch.matmul(rot, qr)
            out += torch.tensordot(w, rot * rot, dims=1)
        return out

    def diag_mass(self, diag: Tensor) -> float:
        """``‖diag(QᵀHQ)‖_F / ‖H‖_F`` from a ``rotated_diag`` result (1 = H diagonal in that basis)."""
        norm = self.norm()
        return math.nan if norm == 0.0 else float(torch.linalg.norm(diag.double())) / norm

    def kron_rel_err(self, left: Tensor | None, right: Tensor | None) -> float:
        """``min_c ‖H − c A⊗B‖_F / ‖H‖_F`` by the closed form (``None`` = identity side)."""
        rows, cols = self.shape
        a_sq = float(rows) if left is None else float(torch.linalg.norm(left.double())) ** 2
        b_sq = float(cols) if right is None else float(torch.linalg.norm(right.double())) ** 2
        return relative_error(self.kron_inner(left, right), self.norm_sq(), a_sq * b_sq)

    def spectral_metrics(self, left: Spectral, right: Spectral) -> tuple[float, float]:
        """``(kron_rel_err, diag_mass)`` of ``A⊗B`` given their eigendecompositions, from one rotation.

        In the factors' own eigenbasis ``⟨H, A⊗B⟩ = ⟨λ_A λ_Bᵀ, diag(QᵀHQ)⟩``, so the same rotated
        diagonal serves both metrics and halves the cost of computing them separately.
        """
        diag = self.rotated_diag(left.basis, right.basis).double()
        lam = torch.outer(left.values.double(), right.values.double())
        inner = float((lam * diag).sum())
        approx_sq = float(left.values.double().square().sum() * right.values.double().square().sum())
        return relative_error(inner, self.norm_sq(), approx_sq), self.diag_mass(diag)

    def precond_rel_err(self, diag: Tensor, second_moment: Tensor) -> float:
        """``min_c ‖H − c Q diag(v) Qᵀ‖/‖H‖`` given ``diag = rotated_diag(Q_L, Q_R)``.

        ``⟨H, Q diag(v) Qᵀ⟩ = ⟨diag(QᵀHQ), v⟩`` and ``‖Q diag(v) Qᵀ‖ = ‖v‖`` for orthogonal ``Q``.
        """
        v = second_moment.to(device=diag.device, dtype=torch.float64)
        inner = float((diag.double() * v).sum())
        return relative_error(inner, self.norm_sq(), float(v.square().sum()))

    # ------------------------------------------------------------------ optimal Kronecker factor
    def apply_right(self, right: Tensor) -> Tensor:
        """Rearranged ``H`` applied to ``vec(B)``: ``Σ_i w_i G_i B G_iᵀ`` (``m × m``)."""
        rows = self.shape[0]
        out = torch.zeros(rows, rows, dtype=self.grads.dtype, device=self.grads.device)
        for chunk, w in self._chunks():
            prod = torch.matmul(chunk, right) * w[:, None, None]
            out += torch.tensordot(prod, chunk, dims=([0, 2], [0, 2]))
        return out

    def apply_left(self, left: Tensor) -> Tensor:
        """Adjoint: ``Σ_i w_i G_iᵀ A G_i`` (``n × n``)."""
        cols = self.shape[1]
        out = torch.zeros(cols, cols, dtype=self.grads.dtype, device=self.grads.device)
        for chunk, w in self._chunks():
            prod = torch.matmul(left, chunk) * w[:, None, None]
            out += torch.tensordot(chunk, prod, dims=([0, 1], [0, 1]))
        return out

    def right_gram(self) -> Tensor:
        """``Σ_i w_i G_iᵀ G_i`` (= the adjoint applied to the identity, at a third of the cost)."""
        cols = self.shape[1]
        out = torch.zeros(cols, cols, dtype=self.grads.dtype, device=self.grads.device)
        for chunk, w in self._chunks():
            out += torch.tensordot(chunk * w[:, None, None], chunk, dims=([0, 1], [0, 1]))
        return out

    def optimal_kronecker(self, *, tol: float | None = None, max_iter: int = 100) -> OptimalKronecker:
        """Top singular pair of the rearranged ``H`` by Lanczos on ``T*T`` (no RNG).

        ``T: B ↦ Σ w_i G_i B G_iᵀ`` and its adjoint ``T*: A ↦ Σ w_i G_iᵀ A G_i``; the top eigenvector
        ``B`` of the symmetric PSD ``T*T`` is the right singular vector, ``A = T(B)/‖T(B)‖`` the left
        one, ``σ = ‖T(B)‖``. Each Lanczos step costs one ``T`` and one ``T*`` application (the price
        of one sweep of alternating power iteration) and its Krylov space contains the power
        iterate, so the Ritz value is never below power iteration's σ² after as many sweeps — and
        where the top singular values crowd (small windows on large layers, typical of GPT
        gradients) it converges in far fewer steps.
        Full reorthogonalisation; the ``T(v_j)`` are kept so ``A`` needs no extra application.

        Starts from ``B0 ∝ Σ w_i G_iᵀ G_i`` (the window's Shampoo right factor): PSD, so it cannot be
        orthogonal to the PSD top singular vector. (Warm starts from the last report's optimum or
        from the shadow DyKAF factor saved no sweeps on GPT gradients when tried, so there are none.)

        Stop when the squared relative error ``1 − σ²/‖H‖²`` falls by less than ``tol`` in a step
        (default 1e-12 in float64, 1e-6 otherwise, where rounding noise would keep it moving), or
        when the Krylov space is exhausted: the reported error is then settled. ``sigma`` is
        ``⟨A, T(B)⟩`` of the returned unit pair, so ``sqrt(1 − σ²/‖H‖²)`` is that pair's exact error.
        """
        if tol is None:
            tol = 1e-12 if self.grads.dtype == torch.float64 else 1e-6
        h_norm_sq = self.norm_sq()
        cols = self.shape[1]
        max_steps = max(1, min(max_iter, cols * (cols + 1) // 2))  # dimension of symmetric n × n
        basis = [_unit(self.right_gram())]
        images: list[Tensor] = []  # T(v_j)
        alphas: list[float] = []
        offdiag: list[float] = []
        previous = 0.0
        coeffs = torch.ones(1, dtype=torch.float64)
        converged = False
        steps = 0
        while steps < max_steps:
            steps += 1
            image = self.apply_right(basis[-1])
            images.append(image)
            w = self.apply_left(image)
            alphas.append(float(torch.sum(w.double() * basis[-1].double())))
            for _ in range(2):  # full reorthogonalisation, twice (Kahan–Parlett) for float32
                for v in basis:
                    w = w - torch.sum(w * v) * v
            beta = float(torch.linalg.norm(w.double()))
            tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if offdiag:
                off = torch.tensor(offdiag, dtype=torch.float64)
                tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
            values, vectors = torch.linalg.eigh(tri)
            theta, coeffs = max(float(values[-1]), 0.0), vectors[:, -1]
            exhausted = beta <= 1e-7 * math.sqrt(max(abs(alphas[0]), torch.finfo(w.dtype).tiny))
            if exhausted or theta - previous <= tol * h_norm_sq:
                converged = True
                break
            previous = theta
            offdiag.append(beta)
            basis.append(w / beta)
        coeffs = coeffs.to(basis[0].dtype)
        right = sum((c * v for c, v in zip(coeffs, basis, strict=False)), torch.zeros_like(basis[0]))
        if float(torch.trace(right)) < 0.0:  # the PSD representative of ±B
            right, coeffs = -right, -coeffs
        right_norm = torch.linalg.norm(right).clamp_min(torch.finfo(right.dtype).tiny)
        image = sum((c * t for c, t in zip(coeffs, images, strict=False)), torch.zeros_like(images[0]))
        image = image / right_norm  # T(B) for the unit B
        sigma = float(torch.linalg.norm(image.double()))
        return OptimalKronecker(_unit(image), right / right_norm, sigma, steps, converged)


def _unit(mat: Tensor) -> Tensor:
    """``mat / ‖mat‖_F`` (zero stays zero)."""
    norm = torch.linalg.norm(mat)
    return mat / norm.clamp_min(torch.finfo(mat.dtype).tiny)
