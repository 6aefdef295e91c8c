"""Speed-up maths against curves computed by hand (tokens 100/200/400, losses 3.0/2.8/2.7)."""

from __future__ import annotations

import math

import pytest

from server.studies.speedup import cost_to_reach, mean_std, monotone_envelope, ratio, speedup

TOKENS = [100.0, 200.0, 400.0]
LOSSES = [3.0, 2.8, 2.7]


def test_midpoint_in_log_tokens_is_the_geometric_mean():
    # 2.9 is halfway between 3.0 (100 tokens) and 2.8 (200): log-linear gives sqrt(100*200).
    needed, bound = cost_to_reach(TOKENS, LOSSES, 2.9)
    assert bound == "="
    assert needed == pytest.approx(math.sqrt(100 * 200))
    assert ratio(TOKENS, LOSSES, 2.9, 100.0).value == pytest.approx(1.41421356)


def test_second_segment_and_exact_budget():
    assert ratio(TOKENS, LOSSES, 2.75, 100.0).value == pytest.approx(2 * math.sqrt(2))
    exact = ratio(TOKENS, LOSSES, 2.7, 100.0)
    assert (exact.value, exact.bound) == (pytest.approx(4.0), "=")
    quarter = cost_to_reach(TOKENS, LOSSES, 2.95)[0]  # a quarter of the way: 100 * 2**0.25
    assert quarter == pytest.approx(100 * 2**0.25)


def test_outside_the_range_is_a_bound_never_extrapolated():
    better = ratio(TOKENS, LOSSES, 2.5, 100.0)
    assert (better.value, better.bound, better.text()) == (pytest.approx(4.0), ">", "> 4×")
    worse = ratio(TOKENS, LOSSES, 3.2, 100.0)
    assert (worse.value, worse.bound, worse.text()) == (pytest.approx(1.0), "<", "< 1×")
    diverged = ratio(TOKENS, LOSSES, math.inf, 50.0)
    assert diverged.bound == "<" and diverged.value == pytest.approx(2.0)


def test_non_monotone_baseline_uses_its_running_minimum():
    curve = [3.0, 2.7, 2.8]  # the 4x run ended worse than the 2x run
    assert [loss for _, loss in monotone_envelope(TOKENS, curve)] == [3.0, 2.7, 2.7]
    assert cost_to_reach(TOKENS, curve, 2.7) == (pytest.approx(200.0), "=")  # cheapest budget that got there
    needed, _ = cost_to_reach(TOKENS, curve, 2.75)
    assert needed == pytest.approx(100 * 2 ** (0.25 / 0.3))
    assert cost_to_reach(TOKENS, curve, 2.65) == (400.0, ">")


def test_unsorted_input_and_bad_curves():
    assert cost_to_reach(list(reversed(TOKENS)), list(reversed(LOSSES)), 2.9)[0] == pytest.approx(141.4213562)
    with pytest.raises(ValueError, match="as many losses"):
        cost_to_reach(TOKENS, [3.0], 2.9)
    with pytest.raises(ValueError, match="positive"):
        cost_to_reach([0.0, 1.0], [3.0, 2.0], 2.5)


def test_seed_mean_and_spread():
    result = speedup(TOKENS, LOSSES, seed_losses=[2.9, 2.8], seed_costs=[100.0, 100.0])
    # headline at the mean loss 2.85: 3/4 of the first segment -> 100 * 2**0.75
    assert result.ratio is not None and result.ratio.value == pytest.approx(2**0.75)
    assert [r.value for r in result.per_seed] == [pytest.approx(math.sqrt(2)), pytest.approx(2.0)]
    assert result.std == pytest.approx(math.sqrt(((2 - math.sqrt(2)) ** 2) / 2))
    assert "±" in result.text()


def test_spread_withheld_when_a_seed_is_a_bound():
    result = speedup(TOKENS, LOSSES, seed_losses=[2.9, 2.5], seed_costs=[100.0, 100.0])
    assert result.std is None
    assert result.per_seed[1].bound == ">"
    assert result.as_dict()["per_seed"][1] == {"value": pytest.approx(4.0), "bound": ">"}


def test_mean_std_ignores_non_finite():
    assert mean_std([1.0, 3.0, math.inf]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([math.nan]) == (None, None)
    assert mean_std([2.0]) == (2.0, None)
