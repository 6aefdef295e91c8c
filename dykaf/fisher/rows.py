"""The row format of Fisher diagnostics and the method / metric names it uses.

Rows are flat ``(step, layer, method, metric, value)`` tuples so that any sink (CSV, database) can
store them without knowing the diagnostics; these names are the vocabulary the dashboard reads.
"""

from __future__ import annotations

from typing import NamedTuple


class FisherRow(NamedTuple):
    """One diagnostic value of one probed layer at one training step."""

    step: int
    layer: str
    method: str
    metric: str
    value: float


# Methods. "optimal" is the best Kronecker product (the floor); "own" the training optimizer's own
# preconditioner (DyKAF/SOAP only); the shadows are estimators fed the same gradients every step;
# "window" carries context values of the Fisher itself.
OPTIMAL = "optimal"
OWN = "own"
SOAP_SHAMPOO = "soap_shampoo"
DYKAF = "dykaf"
DYKAF_SEQ = "dykaf_seq"
WINDOW = "window"
SHADOW_METHODS: tuple[str, ...] = (SOAP_SHAMPOO, DYKAF, DYKAF_SEQ)
METHODS: tuple[str, ...] = (OPTIMAL, OWN, *SHADOW_METHODS, WINDOW)

# Metrics.
KRON_REL_ERR = "kron_rel_err"
PRECOND_REL_ERR = "precond_rel_err"
DIAG_MASS = "diag_mass"
FISHER_NORM = "fisher_norm"
GRAD_NORM = "grad_norm"
METRICS: tuple[str, ...] = (KRON_REL_ERR, PRECOND_REL_ERR, DIAG_MASS, FISHER_NORM, GRAD_NORM)
