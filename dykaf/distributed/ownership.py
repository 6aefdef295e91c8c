"""Which rank owns (steps) which parameter: balanced by cost, the same on every rank.

Every rank computes the ownership map itself from the same inputs, so nothing about it is ever
communicated; it must therefore be a pure function of the parameter list, their costs and the
world size. Longest-processing-time-first greedy (costs descending, each to the least-loaded rank)
is within 4/3 of the best makespan, and close to even when no single parameter dominates, as in a
transformer's many similar matrices; ties are broken by index and by rank, so it is deterministic.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence


def assign_owners(
    costs: Sequence[float], world_size: int, pinned: Mapping[int, int] | None = None
) -> list[int]:
    """The owner rank of each index: ``pinned`` ``{index: rank}`` first, then the others by
    descending cost (ties: lower index first), each to the least-loaded rank (ties: lowest rank).

    ``ValueError`` for a world size below 1, a negative or non-finite cost, or a pinned index or
    rank out of range.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    for index, cost in enumerate(costs):
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"costs[{index}] must be finite and >= 0, got {cost!r}")
    pinned = dict(pinned or {})
    for index, rank in pinned.items():
        if not 0 <= index < len(costs):
            raise ValueError(f"pinned index {index} is out of range for {len(costs)} costs")
        if not 0 <= rank < world_size:
            raise ValueError(f"pinned index {index} names rank {rank}, outside 0..{world_size - 1}")
    owners = [-1] * len(costs)
    loads = [0.0] * world_size
    for index in sorted(pinned):
        owners[index] = pinned[index]
        loads[pinned[index]] += costs[index]
    free = sorted((i for i in range(len(costs)) if i not in pinned), key=lambda i: (-costs[i], i))
    for index in free:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def check_every_rank_owns(owners: Sequence[int], world_size: int) -> None:
    """``ValueError`` unless each rank owns at least one parameter (an optimizer over no parameters
    cannot be built, and a rank with nothing to step only waits)."""
    idle = sorted(set(range(world_size)) - set(owners))
    if idle:
        raise ValueError(
            f"{len(owners)} trainable parameters cannot give each of {world_size} ranks one to own "
            f"(ranks {idle} would own none): use fewer devices per run or a larger model"
        )


def ownership_digest(names: Sequence[str], owners: Sequence[int]) -> str:
    """A short fingerprint of the ownership map, kept in each shard's checkpoint: a shard resumes
    only where the same parameters have the same owners."""
    text = "\n".join(f"{name}\t{owner}" for name, owner in zip(names, owners, strict=True))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
