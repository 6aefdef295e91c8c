"""dykaf: the DyKAF optimizer (Kronecker-factored Fisher tracked by projector splitting, Adam in its
eigenbasis), SOAP as a configuration of the same engine, Fisher-fidelity diagnostics and a registry
of baseline optimizers (``dykaf.baselines``). Depends on torch only; pytorch-optimizer's baselines
need the ``baselines`` extra."""

from dykaf.baselines import (
    OPTIMIZER_NAMES,
    all_schemas,
    build_optimizer,
    optimizer_schema,
    validate_hyperparameters,
)
from dykaf.optimizer import SOAP, DyKAF, PreconditionerState
from dykaf.options import DyKAFConfig

__all__ = [
    "OPTIMIZER_NAMES",
    "SOAP",
    "DyKAF",
    "DyKAFConfig",
    "PreconditionerState",
    "all_schemas",
    "build_optimizer",
    "optimizer_schema",
    "validate_hyperparameters",
]
__version__ = "0.1.0"
