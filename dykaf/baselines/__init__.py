"""The registry of optimizers by name (DyKAF's variants, SOAP and the baselines) and the adapters
that run the baselines the way practitioners do: parameter roles, routed param groups and the
Shampoo state view. See README.md in this folder."""

from dykaf.baselines.registry import (
    OPTIMIZER_NAMES,
    REGISTRY,
    OptimizerEntry,
    all_schemas,
    build_optimizer,
    optimizer_schema,
    shard_cost,
    validate_hyperparameters,
)
from dykaf.baselines.routed import RoutedOptimizer

__all__ = [
    "OPTIMIZER_NAMES",
    "REGISTRY",
    "OptimizerEntry",
    "RoutedOptimizer",
    "all_schemas",
    "build_optimizer",
    "optimizer_schema",
    "shard_cost",
    "validate_hyperparameters",
]
