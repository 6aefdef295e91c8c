"""A sharded optimizer of any registry entry, by name: the registry builds each rank's share and
says what each parameter costs (``dykaf.baselines.registry.shard_cost``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from dykaf.baselines.registry import build_optimizer, shard_cost
from dykaf.distributed.sharded import ShardedOptimizer


def build_sharded_optimizer(
    name: str,
    named: Iterable[tuple[str, Tensor]],
    hyperparameters: Mapping[str, Any] | None,
    roles: Mapping[str, str] | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    pinned: Mapping[str, int] | None = None,
) -> ShardedOptimizer:
    """``build_optimizer(name, ...)`` sharded over the ranks of ``process_group``: each rank builds
    the optimizer over the trainable parameters it owns, routed by ``roles`` as unsharded (Muon's
    and Shampoo's AdamW part included). ``ValueError`` names a bad hyperparameter before any
    parameter is assigned."""
    trainable = [(param_name, param) for param_name, param in named if param.requires_grad]
    cost = shard_cost(name, hyperparameters, roles)

    def build(subset: list[tuple[str, Tensor]]) -> Optimizer:
        return build_optimizer(name, subset, hyperparameters, roles)

    return ShardedOptimizer(trainable, build, cost, process_group=process_group, pinned=pinned)
