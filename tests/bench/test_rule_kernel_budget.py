"""Kernel budgets of the Kronecker-factor rules, counted by ``bench/rule_kernels.py``.

A GPU runs small layers' updates launch-bound, so a rule's cost there follows its kernel count
(BENCHMARKS.md, "Factor-rule kernels"); these budgets catch an edit that quietly adds kernels to
every update."""

from __future__ import annotations

import pytest

from bench.rule_kernels import kernels_per_update

KERNEL_BUDGET = {"parallel": 42, "sequential": 24, "ema": 2}


@pytest.mark.parametrize("rule", sorted(KERNEL_BUDGET))
def test_updates_stay_within_their_kernel_budget(rule: str) -> None:
    # One shape per branch of the parallel rule's cross term: tall, wide (transposed), near-square.
    for shape in [(48, 32), (3, 70), (8, 8)]:
        assert kernels_per_update(rule, shape) <= KERNEL_BUDGET[rule], shape
