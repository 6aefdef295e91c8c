"""Fisher-fidelity diagnostics: how well Kronecker preconditioners track the empirical Fisher.

For a few probed layers, measure the weighted Fisher of the recent gradient window against the
best Kronecker product (the floor), the training optimizer's own preconditioner, and shadow
SOAP/Shampoo and DyKAF estimators, without ever forming an ``mn × mn`` matrix. See README.md here.
"""

from dykaf.fisher.monitor import FisherMonitor, optimizer_beta
from dykaf.fisher.probe import LayerProbe
from dykaf.fisher.rows import METHODS, METRICS, SHADOW_METHODS, FisherRow
from dykaf.fisher.selection import select_layers
from dykaf.fisher.weighted_fisher import WeightedFisher

__all__ = [
    "METHODS",
    "METRICS",
    "SHADOW_METHODS",
    "FisherMonitor",
    "FisherRow",
    "LayerProbe",
    "WeightedFisher",
    "optimizer_beta",
    "select_layers",
]
