"""dykaf: the DyKAF optimizer (Kronecker-factored Fisher tracked by projector splitting, Adam in its
eigenbasis), SOAP as a configuration of the same engine, Fisher-fidelity diagnostics and a registry
of baseline optimizers. Depends on torch only."""

from dykaf.optimizer import SOAP, DyKAF, PreconditionerState
from dykaf.registry import OPTIMIZER_NAMES, all_schemas, build_optimizer, validate_hyperparameters

__all__ = [
    "OPTIMIZER_NAMES",
    "SOAP",
    "DyKAF",
    "PreconditionerState",
    "all_schemas",
    "build_optimizer",
    "validate_hyperparameters",
]
__version__ = "0.1.0"
