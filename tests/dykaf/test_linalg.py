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


def test_the_cpu_solves_in_the_factors_own_dtype_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # LAPACK's float32 is the faster one on a CPU; float64 is only the retry there.
    from dykaf.linalg import solves_in_float64

    solved: list[torch.dtype] = []
    solver = torch.linalg.eigh

    def spy(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        solved.append(matrix.dtype)
        return solver(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    assert not solves_in_float64(torch.eye(3))
    values, vectors = eigh(torch.diag(torch.tensor([3.0, 1.0, 2.0])))
    assert solved == [torch.float32]
    assert values.dtype == vectors.dtype == torch.float32
    torch.testing.assert_close(values, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("size", [64, 384])
def test_on_cuda_float32_factors_are_solved_in_float64_and_cast_back(size: int) -> None:
    # cuSOLVER's float64 eigh is faster than its float32 one at these sizes (module docstring), and
    # exact to float32 rounding: checked against float64 LAPACK on the host.
    from dykaf.linalg import solves_in_float64

    g = torch.Generator().manual_seed(size)
    base = torch.randn(size, size // 2, generator=g, dtype=torch.float64)
    factor = base @ base.T / size  # rank-deficient, as Kronecker factors are
    expected = torch.linalg.eigvalsh(factor)
    matrix = factor.float().cuda()
    assert solves_in_float64(matrix)
    assert not solves_in_float64(torch.eye(2048, device="cuda"))  # compute-bound: float32 first
    values, vectors = eigh(matrix)
    assert values.dtype == vectors.dtype == torch.float32 and values.is_cuda
    scale = float(expected.abs().max())
    assert float((values.double().cpu() - expected).abs().max()) < 1e-5 * scale
    rebuilt = (vectors * values) @ vectors.T
    assert float((rebuilt.double().cpu() - factor).abs().max()) < 1e-5 * scale
