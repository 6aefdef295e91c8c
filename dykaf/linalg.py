"""A symmetric eigendecomposition that never hands back NaN silently.

Every eigenbasis in the library (the optimizer's rotations, the ``kron`` initialisation, the Fisher
diagnostics' factor spectra) goes through :func:`eigh`. Kronecker factors are often highly
degenerate: an embedding's left factor has an exactly-zero row for every token absent from the
recent batches, so most of its eigenvalues are exactly 0. On such matrices float32 LAPACK (MKL's
``ssyevd``, single-threaded) fails often: it raises, or — worse — returns NaN eigenvectors without
raising, which silently turned a SOAP run's embedding, then every parameter, into NaN one step
later (tests/dykaf/test_linalg.py builds such factors). Float64 solved every such case.

On a GPU, matrices up to ``FLOAT64_ON_GPU_UP_TO`` wide are solved in float64 from the start.
cuSOLVER's float32 path is not the fast one for the factor sizes that matter here: float64 was
faster on an H200 up to about that width, and the two cost the same beyond it
(``bench/fisher_breakdown.py``, part ``eigh``; figures in BENCHMARKS.md). Up to
``FLOAT64_ON_GPU_UP_TO`` float64 is therefore both the faster and the robust choice on a GPU, and
the retry is never needed. Beyond it the solver becomes compute-bound, and many GPUs that users own
(consumer and inference cards) run float64 at a small fraction of their float32 rate, so larger
matrices keep the float32-first path. On the CPU float32 stays first: LAPACK's float32 was the
faster one at every size measured.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# Largest side solved in float64 straight away on a GPU (see the module docstring).
FLOAT64_ON_GPU_UP_TO = 1024


def solves_in_float64(matrix: Tensor) -> bool:
    """Whether :func:`eigh` skips ``matrix``'s own dtype and solves in float64 straight away: on a
    GPU, up to ``FLOAT64_ON_GPU_UP_TO``, where that is faster (module docstring)."""
    return matrix.device.type == "cuda" and matrix.shape[-1] <= FLOAT64_ON_GPU_UP_TO


def eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` (eigenvalues ascending) in ``matrix``'s dtype, retried in float64 when
    the solver raises or returns non-finite values; results are cast back to ``matrix``'s dtype.
    On a GPU it solves small matrices in float64 directly (``solves_in_float64``).

    Raises ``torch.linalg.LinAlgError`` (a ``RuntimeError``) when float64 fails as well, and for a
    non-finite input, which no retry can fix.
    """
    if not _finite(matrix):
        raise torch.linalg.LinAlgError(f"eigh: the {tuple(matrix.shape)} matrix has non-finite entries")
    if solves_in_float64(matrix) and matrix.dtype != torch.float64:
        return _in_float64(matrix)
    try:
        values, vectors = torch.linalg.eigh(matrix)
        if _finite(values, vectors):
            return values, vectors
    except RuntimeError:
        if matrix.dtype == torch.float64:
            raise
    if matrix.dtype == torch.float64:
        raise torch.linalg.LinAlgError(f"eigh returned non-finite values for a {tuple(matrix.shape)} matrix")
    return _in_float64(matrix)


def _in_float64(matrix: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(matrix.double())
    if not _finite(values, vectors):
        raise torch.linalg.LinAlgError(
            f"eigh returned non-finite values for a {tuple(matrix.shape)} matrix, in float64 too"
        )
    return values.to(matrix.dtype), vectors.to(matrix.dtype)
