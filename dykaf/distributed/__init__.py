"""The optimizer step sharded over torch.distributed ranks: one owner rank per parameter, balanced
by cost, then the updated parameters all-gathered. See README.md in this folder."""

from dykaf.baselines.registry import shard_cost
from dykaf.distributed.build import build_sharded_optimizer
from dykaf.distributed.ownership import assign_owners
from dykaf.distributed.sharded import ShardedOptimizer

__all__ = ["ShardedOptimizer", "assign_owners", "build_sharded_optimizer", "shard_cost"]
