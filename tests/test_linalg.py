"""``dykaf.linalg.eigh``: degenerate Kronecker factors never yield NaN bases.

The factors below are what an embedding's left factor looks like after one step: ``0.05·GGᵀ`` with
195 of 257 rows exactly zero (tokens absent from the batch). Single-threaded float32 MKL fails on
most of them — raising for some and silently returning NaN for others (seeds 9 and 26 here), which made
SOAP's first update of the quick example's embedding NaN. Checked against float64 LAPACK.
"""

from __future__ import annotations

import pytest
import torch

from dykaf import SOAP, DyKAF
from dykaf.linalg import eigh

# With float32-only eigh, SOAP's embedding went NaN within 3 steps from these gradient streams.
SOAP_NAN_SEEDS = (5, 11)


def _embedding_grad(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grad = torch.zeros(257, 64)
    rows = torch.randperm(257, generator=g)[:62]
    grad[rows] = torch.randn(62, 64, generator=g) * 0.01
    return grad


@pytest.mark.usefixtures("one_thread")
def test_eigh_of_degenerate_factors_is_finite_and_exact() -> None:
    for seed in range(40):
        grad = _embedding_grad(seed)
        factor = 0.05 * grad @ grad.T
        values, vectors = eigh(factor)
        assert values.dtype == vectors.dtype == torch.float32
        assert torch.isfinite(values).all() and torch.isfinite(vectors).all(), seed
        assert torch.all(values[1:] >= values[:-1]), seed  # ascending, like torch.linalg.eigh
        eye = torch.eye(257, dtype=torch.float64)
        q = vectors.double()
        assert torch.allclose(q.T @ q, eye, atol=1e-5), seed
        reference = torch.linalg.eigvalsh(factor.double())
        assert torch.allclose(values.double(), reference, atol=1e-6 * float(reference.abs().max())), seed
        rebuilt = q @ torch.diag(values.double()) @ q.T
        assert torch.allclose(rebuilt, factor.double(), atol=1e-6 * float(factor.abs().max())), seed


def test_non_finite_input_is_refused_by_name() -> None:
    with pytest.raises(torch.linalg.LinAlgError, match="non-finite entries"):
        eigh(torch.full((3, 3), float("nan")))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("optimizer", [SOAP, DyKAF])
@pytest.mark.parametrize("first_seed", SOAP_NAN_SEEDS)
def test_an_embedding_with_absent_tokens_stays_finite(optimizer: type[DyKAF], first_seed: int) -> None:
    """The quick example's failure, reduced: the first rotated updates of such an embedding."""
    param = torch.nn.Parameter(torch.randn(257, 64, generator=torch.Generator().manual_seed(0)) * 0.02)
    opt = optimizer([param], lr=1e-3)
    for step in range(3):
        param.grad = _embedding_grad(first_seed + step)
        opt.step()
        assert torch.isfinite(param).all(), step
    state = opt.state[param]
    assert torch.isfinite(state["left_basis"]).all() and torch.isfinite(state["exp_avg_sq"]).all()
