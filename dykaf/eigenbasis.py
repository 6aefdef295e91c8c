"""Eigenbases of the Kronecker factors: the rotation in which DyKAF/SOAP run Adam.

Two operations, as in SOAP: a full ``eigh`` when a parameter is initialised, and afterwards a cheap
refresh every ``precondition_frequency`` steps (one power-iteration step plus QR), which needs the
previous basis' columns ordered by the current eigenvalue estimates. The second moment lives in the
rotated coordinates, so whoever reorders a basis must reorder the moment's rows/columns with the
same permutation — :func:`refresh` returns it for that reason.

Both take one factor (``k × k``) or a block of them (``b × k × k``); the refresh of a block is one
batched product, sort and QR, and runs without a host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dykaf.linalg import eigh


def initial(factor: Tensor) -> Tensor:
    """Orthonormal eigenvectors of a symmetric PSD factor, eigenvalues in descending order.

    ``eigh`` runs in the factor's dtype (float32 for all low-precision params) with a float64 retry
    when it fails or returns non-finite values (``dykaf.linalg``); the result is cast back.
    """
    _, vectors = eigh(factor)
    return torch.flip(vectors, dims=[-1])


def refresh(factor: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """One power-iteration/QR refresh of ``basis`` towards ``factor``'s eigenvectors.

    Returns ``(new_basis, order)`` where ``order`` sorts the old columns by the estimated eigenvalues
    ``diag(Qᵀ P Q)`` in descending order (``k``, or ``b × k`` for a block); the caller permutes its
    second moment with ``order``.
    """
    product = torch.mm(factor, basis) if factor.ndim == 2 else torch.bmm(factor, basis)
    estimates = torch.sum(product * basis, dim=-2)
    order = torch.argsort(estimates, dim=-1, descending=True)
    sorted_basis = torch.gather(basis, -1, order.unsqueeze(-2).expand_as(basis))
    new_basis, _ = torch.linalg.qr(factor @ sorted_basis)
    return new_basis, order
