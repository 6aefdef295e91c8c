"""Factor-update rules against the independent rearranged-matrix oracle (float64)."""

from __future__ import annotations

import pytest
import torch

from dykaf import kronecker
from tests.support import oracle

SHAPES = [(4, 4), (5, 3), (3, 7), (1, 6), (8, 2)]
RULES = {
    "parallel": oracle.parallel_step,
    "sequential": oracle.sequential_step,
    "ema": oracle.ema_step,
}


def _spd(k: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(k, k, generator=gen, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(k, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.9, 0.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_one_step_matches_oracle(rule: str, shape: tuple[int, int], beta: float) -> None:
    """β = 0 too: the rules fold β into GEMMs that then must ignore the old factor entirely."""
    gen = torch.Generator().manual_seed(1)
    m, n = shape
    left, right = _spd(m, gen), _spd(n, gen)
    grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
    got = kronecker.update_factors(rule, left, right, grad, beta)
    want = RULES[rule](left, right, grad, beta)
    # Factors are only defined up to a scale split; compare the products and the balanced factors.
    torch.testing.assert_close(torch.kron(*got), torch.kron(*want), rtol=1e-10, atol=1e-12)
    if rule != "ema":
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_fifty_steps_match_oracle(rule: str, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(2)
    m, n = shape
    grads = [torch.randn(m, n, generator=gen, dtype=torch.float64) * (1 + 0.1 * t) for t in range(51)]
    left, right = kronecker.init_kron(grads[0], 0.95)
    ref_left, ref_right = left.clone(), right.clone()
    for grad in grads[1:]:
        left, right = kronecker.update_factors(rule, left, right, grad, 0.95)
        ref_left, ref_right = RULES[rule](ref_left, ref_right, grad, 0.95)
    torch.testing.assert_close(
        torch.kron(left, right), torch.kron(ref_left, ref_right), rtol=1e-9, atol=1e-12
    )


# Tall (m ≥ √2·n): the Galerkin term from n × n products; near-square: from K̂G and GM̂; wide shapes
# take either branch on the transposed problem.
@pytest.mark.parametrize("shape", [(6, 4), (20, 3), (3, 30), (12, 12), (5, 6), (9, 7)])
def test_galerkin_cross_term_all_evaluation_orders(shape: tuple[int, int]) -> None:
    """The cost-based shortcut for ⟨U1, ĜV1Ĝᵀ⟩ must match the oracle for every branch it can take."""
    gen = torch.Generator().manual_seed(3)
    m, n = shape
    left, right = _spd(m, gen), _spd(n, gen)
    grad = torch.randn(m, n, generator=gen, dtype=torch.float64)
    got = kronecker.update_parallel(left, right, grad, 0.8)
    want = oracle.parallel_step(left, right, grad, 0.8)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


def test_kron_init_is_optimal_approximation_of_first_ema_term() -> None:
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    beta = 0.99
    left, right = kronecker.init_kron(grad, beta)
    first_term = (1 - beta) * torch.outer(grad.reshape(-1), grad.reshape(-1))
    u, s, vh = torch.linalg.svd(oracle.rearrange(first_term, 5, 3))
    best = s[0] * torch.outer(u[:, 0], vh[0])
    torch.testing.assert_close(torch.outer(left.reshape(-1), right.reshape(-1)), best, rtol=1e-10, atol=1e-14)
    # Weighted by (1-β), not 1: the public code's weight would make this 100× too large.
    assert torch.kron(left, right).norm() == pytest.approx(float(s[0]), rel=1e-10)


def test_eps_init_has_unit_1e3_frobenius_norm() -> None:
    left, right = kronecker.init_eps(4, 9, dtype=torch.float64, device=torch.device("cpu"))
    assert float(left.norm()) == pytest.approx(1e-3)
    assert float(right.norm()) == pytest.approx(1e-3)
    torch.testing.assert_close(left, torch.eye(4, dtype=torch.float64) * 1e-3 / 2)


def test_one_sided_factor_decays() -> None:
    gen = torch.Generator().manual_seed(5)
    factor = _spd(3, gen)
    grad = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    got = kronecker.update_one_sided(factor, grad, 0.9, "left")
    torch.testing.assert_close(got, 0.9 * factor + 0.1 * grad @ grad.T)
    got_r = kronecker.update_one_sided(_spd(50, gen)[:3, :3], grad[:, :3], 0.5, "right")
    assert got_r.shape == (3, 3)


def test_rules_never_modify_inputs() -> None:
    gen = torch.Generator().manual_seed(6)
    left, right = _spd(4, gen), _spd(3, gen)
    grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    copies = [t.clone() for t in (left, right, grad)]
    for rule in RULES:
        kronecker.update_factors(rule, left, right, grad, 0.9)
    for original, copy in zip((left, right, grad), copies, strict=True):
        assert torch.equal(original, copy)


@pytest.mark.parametrize("scale", [1e-8, 1e8])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_float32_updates_are_scale_equivariant(rule: str, scale: float) -> None:
    """Gradients ×t give factors ×t (DyKAF's balanced factors: L⊗R tracks vec(G)vec(G)ᵀ, of order
    t²) or ×t² (EMA factors, each a sum of GGᵀ or GᵀG), from factors scaled the same way.

    The rules fold norms and β into products without normalising the factors first; this pins
    that no intermediate over- or underflows float32 for layers whose gradients are tiny or huge.
    """
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(12, 5, generator=gen) for _ in range(6)]
    left, right = kronecker.init_kron(grads[0], 0.95)
    factor_scale = scale**2 if rule == "ema" else scale
    scaled_left, scaled_right = left * factor_scale, right * factor_scale
    for grad in grads[1:]:
        left, right = kronecker.update_factors(rule, left, right, grad, 0.95)
        scaled_left, scaled_right = kronecker.update_factors(
            rule, scaled_left, scaled_right, grad * scale, 0.95
        )
    torch.testing.assert_close(scaled_left / factor_scale, left, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scaled_right / factor_scale, right, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["parallel", "sequential"])
def test_factors_stay_symmetric_psd(rule: str) -> None:
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(30)]
    left, right = kronecker.init_kron(grads[0], 0.9)
    for grad in grads[1:]:
        left, right = kronecker.update_factors(rule, left, right, grad, 0.9)
    for factor in (left, right):
        torch.testing.assert_close(factor, factor.T)
        assert float(torch.linalg.eigvalsh(factor).min()) > -1e-12


def test_unknown_rule_is_rejected() -> None:
    with pytest.raises(ValueError, match="factor_rule must be one of"):
        kronecker.update_factors("lbfgs", torch.eye(2), torch.eye(2), torch.ones(2, 2), 0.9)


@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 7), (20, 3), (12, 12)])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_a_block_of_matrices_matches_the_oracle_matrix_by_matrix(rule: str, shape: tuple[int, int]) -> None:
    """Stacked inputs (``b × m × n``, ``b × m × m``, ``b × n × n``): each matrix of the result is the
    oracle's step of that matrix, for every evaluation order of the parallel rule's cross term."""
    gen = torch.Generator().manual_seed(9)
    m, n = shape
    lefts = torch.stack([_spd(m, gen) for _ in range(3)])
    rights = torch.stack([_spd(n, gen) for _ in range(3)])
    grads = torch.randn(3, m, n, generator=gen, dtype=torch.float64)
    got_left, got_right = kronecker.update_factors(rule, lefts, rights, grads, 0.9)
    assert got_left.shape == (3, m, m) and got_right.shape == (3, n, n)
    for i in range(3):
        want = RULES[rule](lefts[i], rights[i], grads[i], 0.9)
        torch.testing.assert_close(
            torch.kron(got_left[i], got_right[i]), torch.kron(*want), rtol=1e-10, atol=1e-12
        )
        if rule != "ema":
            torch.testing.assert_close(got_left[i], want[0], rtol=1e-10, atol=1e-12)


def test_block_init_one_sided_rank1_and_refresh_match_their_single_matrix_forms() -> None:
    from dykaf import eigenbasis
    from dykaf.second_moment import rank1_denominator, update_rank1

    gen = torch.Generator().manual_seed(10)
    grads = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    lefts = torch.stack([_spd(6, gen) for _ in range(3)])
    bases = torch.linalg.qr(torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)).Q
    rows, cols = (
        torch.rand(3, 6, generator=gen, dtype=torch.float64),
        torch.rand(3, 4, generator=gen, dtype=torch.float64),
    )
    init_l, init_r = kronecker.init_kron(grads, 0.9)
    one_sided = kronecker.update_one_sided(lefts, grads, 0.9, "left")
    new_bases, orders = eigenbasis.refresh(lefts, bases)
    new_rows, new_cols = update_rank1(rows, cols, grads.square(), 0.95)
    denominators = rank1_denominator(new_rows, new_cols, 1e-8)
    for i in range(3):
        left, right = kronecker.init_kron(grads[i], 0.9)
        torch.testing.assert_close(torch.kron(init_l[i], init_r[i]), torch.kron(left, right))
        torch.testing.assert_close(one_sided[i], kronecker.update_one_sided(lefts[i], grads[i], 0.9, "left"))
        basis, order = eigenbasis.refresh(lefts[i], bases[i])
        assert torch.equal(orders[i], order)
        torch.testing.assert_close(new_bases[i].abs(), basis.abs())  # QR fixes columns up to sign
        row, col = update_rank1(rows[i], cols[i], grads[i].square(), 0.95)
        torch.testing.assert_close(new_rows[i], row)
        torch.testing.assert_close(new_cols[i], col)
        torch.testing.assert_close(denominators[i], rank1_denominator(row, col, 1e-8))
