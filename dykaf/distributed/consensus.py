"""A step that fails on one rank fails on every rank, so that no rank waits alone in a collective.

A sharded step runs different work on each rank: an eigendecomposition that raises on its owner
does not run anywhere else. If that rank simply raised, the others would enter the parameter
exchange and wait for it forever. So each rank catches its own failure, the ranks agree with one
all-reduce of a per-rank code (MAX), and when any rank failed, a second all-reduce shares the
failed ranks' messages and every rank raises the same kind of error naming them:

* ``torch.linalg.LinAlgError`` when the failures are linear-algebra ones (a runner reports a
  diverged run on every rank, as it would without sharding);
* ``RuntimeError`` when any is another error (a bug is not reported as a divergence).

The happy path costs one all-reduce of ``world_size`` bytes and one host read of its result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

OK, LINALG, OTHER = 0, 1, 2
MESSAGE_BYTES = 1024  # each failed rank's message, truncated to this many UTF-8 bytes


def run_agreed(
    work: Callable[[], T],
    rank: int,
    world_size: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> T:
    """``work()``'s result on every rank, or the same kind of error raised on every rank."""
    failure: Exception | None = None
    result: T | None = None
    try:
        result = work()
    except Exception as exc:  # any error: the other ranks must hear of it
        failure = exc
    codes = torch.zeros(world_size, dtype=torch.uint8, device=device)
    if failure is not None:
        codes[rank] = LINALG if isinstance(failure, torch.linalg.LinAlgError) else OTHER
    dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=group)
    agreed = codes.tolist()
    if not any(agreed):
        return result  # type: ignore[return-value]
    messages = _share_messages(failure, rank, world_size, device, group)
    failed = [r for r, code in enumerate(agreed) if code != OK]
    where = f"rank{'s' if len(failed) > 1 else ''} {', '.join(str(r) for r in failed)}"
    text = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
    message = f"the sharded optimizer step failed on {where} (this is rank {rank}): {text}"
    if max(agreed) == LINALG:
        raise torch.linalg.LinAlgError(message) from failure
    raise RuntimeError(message) from failure


def _share_messages(
    failure: Exception | None,
    rank: int,
    world_size: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
) -> list[str]:
    """Every rank's ``"Type: message"`` (empty for ranks that did not fail), by one all-reduce: each
    rank fills only its own row, so MAX assembles them."""
    rows = torch.zeros(world_size, MESSAGE_BYTES, dtype=torch.uint8, device=device)
    if failure is not None:
        kind = "LinAlgError" if isinstance(failure, torch.linalg.LinAlgError) else type(failure).__name__
        data = f"{kind}: {failure}".encode()[:MESSAGE_BYTES]
        rows[rank, : len(data)] = torch.tensor(list(data), dtype=torch.uint8, device=device)
    dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in rows.cpu().tolist()]
