"""The single place where the runner gets its optimizer: the ``dykaf`` registry.

Kept as its own tiny module so tests can wrap the factory (e.g. to observe initial weights),
and so the runner never grows optimizer-specific code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def build_optimizer(
    name: str,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    hyperparameters: Mapping[str, Any],
    roles: Mapping[str, str],
) -> torch.optim.Optimizer:
    """Build ``name`` from ``dykaf.registry`` with the parameters' roles for routing."""
    from dykaf.baselines.registry import build_optimizer as registry_build

    return registry_build(name, list(named_parameters), dict(hyperparameters), dict(roles))


def fisher_monitor_class() -> Any | None:
    """``dykaf.fisher.FisherMonitor`` when the library provides it, else None (diagnostics skipped)."""
    try:
        from dykaf.fisher import FisherMonitor
    except ImportError:
        return None
    return FisherMonitor
