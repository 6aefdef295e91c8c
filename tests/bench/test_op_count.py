"""The batched engine's aten ops per step stay pinned (``bench/op_count.py``).

On a GPU a small model's optimizer step is launch-bound, so its time follows these counts. Stepping
matrix by matrix cost ≈ 300 ops per transformer layer for DyKAF and ≈ 125 for SOAP, growing with
depth; batched, the count per step does not depend on the number of layers. These budgets are
today's counts: an edit that adds ops to every step fails here instead of slowing GPUs quietly.
"""

from __future__ import annotations

import pytest

from bench import op_count

# Ops per step over steps 2–11 (one refresh), any number of layers: 4 matrix blocks + Adam + decay.
OPS_PER_STEP = {"dykaf": 266.2, "soap": 105.2}


@pytest.mark.parametrize("name", sorted(OPS_PER_STEP))
def test_ops_per_step_do_not_grow_with_depth_and_stay_pinned(name: str) -> None:
    two, twelve = op_count.count(name, 2), op_count.count(name, 12)
    assert twelve["ops"] <= 1.5 * two["ops"], (two, twelve)
    assert twelve["ops"] / 12 <= 40, twelve
    assert twelve["ops"] <= OPS_PER_STEP[name] + 1e-9, f"{name}: {twelve['ops']} ops per step now"
    assert twelve["kernels"] < twelve["ops"]  # views are counted as ops, not as kernels


def test_the_counter_sees_per_matrix_work() -> None:
    """The same counter on AdamW's per-parameter state steps grows with depth: it would catch a
    regression to matrix-by-matrix stepping."""
    two, twelve = op_count.count("adamw", 2), op_count.count("adamw", 12)
    assert twelve["ops"] > 3 * two["ops"]
