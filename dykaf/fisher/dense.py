"""Dense float64 reference for the Fisher diagnostics (small layers only; the tests' oracle).

Everything here forms the ``mn × mn`` weighted Fisher ``H`` and the ``mn × mn`` approximations
explicitly and evaluates the definitions literally, sharing no code with ``weighted_fisher.py``,
so that an agreement between the two is evidence that the closed forms there are right.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Refuse sizes whose dense H would exceed ~0.5 GiB in float64.
MAX_DENSE_DIM = 8192


def dense_fisher(grads: Tensor, weights: Tensor) -> Tensor:
    """``H = Σ_i w_i vec(G_i) vec(G_i)ᵀ`` with row-major ``vec`` and ``w`` normalised to sum 1."""
    count = grads.shape[0]
    flat = grads.reshape(count, -1).double()
    if flat.shape[1] > MAX_DENSE_DIM:
        raise ValueError(f"dense Fisher of dimension {flat.shape[1]} is too large for the oracle")
    w = weights.double().to(flat.device)
    w = w / w.sum()
    return (flat.T * w) @ flat


def _scale_optimal_error(h: Tensor, approx: Tensor) -> float:
    """``min_c ‖H − c X‖_F / ‖H‖_F`` by projecting onto ``X`` (``c = ⟨H,X⟩/‖X‖²``)."""
    scale = torch.sum(h * approx) / torch.sum(approx * approx)
    return float(torch.linalg.norm(h - scale * approx) / torch.linalg.norm(h))


def dense_kron_rel_err(h: Tensor, left: Tensor, right: Tensor) -> float:
    """Relative error of the best multiple of ``A ⊗ B`` (``torch.kron`` matches row-major ``vec``)."""
    return _scale_optimal_error(h, torch.kron(left.double().contiguous(), right.double().contiguous()))


def _kron_basis(left_basis: Tensor, right_basis: Tensor) -> Tensor:
    # contiguous(): torch.kron fails on some transposed-stride inputs (e.g. Q from torch.linalg.qr).
    return torch.kron(left_basis.double().contiguous(), right_basis.double().contiguous())


def dense_precond_rel_err(h: Tensor, left_basis: Tensor, right_basis: Tensor, second_moment: Tensor) -> float:
    """Relative error of the best multiple of ``Q diag(vec v) Qᵀ`` with ``Q = Q_L ⊗ Q_R``."""
    q = _kron_basis(left_basis, right_basis)
    approx = q @ torch.diag(second_moment.double().reshape(-1)) @ q.T
    return _scale_optimal_error(h, approx)


def dense_rotated_diag(h: Tensor, left_basis: Tensor, right_basis: Tensor) -> Tensor:
    """``diag(Qᵀ H Q)`` reshaped to ``m × n``."""
    q = _kron_basis(left_basis, right_basis)
    return torch.diagonal(q.T @ h @ q).reshape(left_basis.shape[0], right_basis.shape[0])


def dense_diag_mass(h: Tensor, left_basis: Tensor, right_basis: Tensor) -> float:
    """``‖diag(Qᵀ H Q)‖_F / ‖H‖_F``."""
    return float(torch.linalg.norm(dense_rotated_diag(h, left_basis, right_basis)) / torch.linalg.norm(h))


def rearrange(h: Tensor, rows: int, cols: int) -> Tensor:
    """Van Loan–Pitsianis rearrangement: ``R[(a,c),(b,d)] = H[(a,b),(c,d)]`` (``m² × n²``), which maps
    ``A ⊗ B`` to ``vec(A) vec(B)ᵀ``."""
    return h.reshape(rows, cols, rows, cols).permute(0, 2, 1, 3).reshape(rows * rows, cols * cols)


def dense_optimal_kronecker(h: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor, float]:
    """``(A, B, rel_err)`` of the Frobenius-optimal ``A ⊗ B`` from a full SVD of the rearranged H."""
    u, s, vh = torch.linalg.svd(rearrange(h, rows, cols))
    left = u[:, 0].reshape(rows, rows)
    right = vh[0].reshape(cols, cols)
    if torch.trace(left) < 0:  # the pair is defined up to a joint sign; report the PSD one
        left, right = -left, -right
    rel = math.sqrt(max(0.0, 1.0 - float(s[0] ** 2 / torch.sum(s**2))))
    return left * float(s[0]), right, rel
