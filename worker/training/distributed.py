"""The training loop's view of torch.distributed: who this process is and the few collectives it needs.

A run on N devices is N processes started by torchrun (``worker.distributed``), each running the
same loop (``runner.py``) on its own device. Everything that decides control flow must be the same
on every rank, or one rank leaves the loop while the others wait in a collective forever. So:

* values the loop branches on (train loss, validation loss, grad norm, the cancel flag) are reduced
  across ranks here before anyone looks at them;
* only rank 0 writes (metrics, Fisher rows, the main checkpoint file); every rank writes its own
  part of a checkpoint (its optimizer shard, its RNG) before rank 0 seals it;
* a single-process run is ``Ranks()``: world size 1, no collectives, exactly the code path of a run
  that never heard of torch.distributed.

Collectives run on the device's backend: CPU tensors for Gloo, CUDA tensors for NCCL.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# No collective may wait longer than this for a rank that died or hangs; torchrun notices a dead rank
# within seconds and stops the others, so this is only the backstop for a rank that hangs alive.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # A one-rank group that still takes the multi-device code path (DDP, sharding, collectives):
    # how a machine with one GPU checks the NCCL path (``bench/gpu_check.py``).
    forced: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, Fisher rows and the main checkpoint file."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Multi-device code path: several ranks (or ``forced``); a plain run otherwise."""
        return self.world_size > 1 or self.forced

    def _reduce(self, values: Sequence[float], op: dist.ReduceOp.RedOpType) -> list[float]:
        if not self.active:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def mean(self, value: float) -> float:
        """The mean over ranks of one scalar (a non-finite value on any rank stays non-finite)."""
        return self.sum(value)[0] / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (cancel requests, errors)."""
        return self._reduce([1.0 if flag else 0.0], dist.ReduceOp.MAX)[0] > 0

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (the checkpoint step to resume from)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.active:
            # A tiny all-reduce rather than dist.barrier(): NCCL's barrier guesses a device per rank.
            self.sum(0.0)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_environment(force: bool = False) -> Ranks:
    """Join the process group torchrun described in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) and pick this rank's device: ``cuda:LOCAL_RANK`` when CUDA is visible (the
    supervisor sets CUDA_VISIBLE_DEVICES to the run's GPUs), else the CPU with Gloo."""
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available() and os.environ.get("DYKAF_RANK_DEVICE", "auto") != "cpu":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend_for(device),
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    return Ranks(rank=rank, world_size=world, local_rank=local, device=device, forced=force)


def rank_seed(seed: int, rank: int) -> int:
    """The in-loop RNG seed of a rank (dropout): rank 0 keeps the run's seed, so a 1-device run is
    unchanged; other ranks get streams of their own rather than rank 0's masks on other data."""
    return seed if rank == 0 else (seed * 1_000_003 + rank) % (2**63)
