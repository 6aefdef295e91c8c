"""One owner per parameter: each rank steps its share of the parameters, then all ranks exchange them.

Under plain DDP every rank holds the whole optimizer and repeats every factor update and
eigenbasis refresh. Every optimizer in the registry steps each parameter independently of the
others, so the step can be split by parameter instead: each parameter gets one owner rank
(``ownership.py``, balanced by the optimizer's per-parameter cost), each rank builds the optimizer
over the parameters it owns only (non-owned ones have no state on it at all) and steps them, and
the updated parameters are then all-gathered (``exchange.py``), so every rank ends the step with
the same parameters as an unsharded step would give. A failure on one rank is raised on every
rank (``consensus.py``) instead of leaving the others waiting in the exchange.

:class:`ShardedOptimizer` is a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` are
the inner (this rank's) optimizer's, so an LR scheduler built on it drives the inner learning rates
and checkpoint helpers see the state this rank holds. ``zero_grad`` clears every parameter's
gradient, since DDP accumulates into all of them. With one rank (or torch.distributed not
initialised) it is the inner optimizer over every parameter, with no collective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from dykaf.distributed.consensus import run_agreed
from dykaf.distributed.exchange import FlatExchange
from dykaf.distributed.ownership import assign_owners, check_every_rank_owns, ownership_digest

RESUME_HINT = "a sharded optimizer state resumes only on the same devices_per_run"


class ShardedOptimizer(Optimizer):
    """``build(owned (name, param) pairs)`` on this rank's share of ``named_params``, by ``cost``.

    Args:
        named_params: ``(name, param)`` of the whole model, in the same order on every rank;
            parameters with ``requires_grad=False`` are left out (nobody steps them).
        build: the inner optimizer over a list of ``(name, param)`` pairs (e.g. the registry's
            ``build_optimizer``; ``build_sharded_optimizer`` does that).
        cost: the relative cost of stepping one parameter (``dykaf.baselines.shard_cost``).
        process_group: the ranks sharing the step (None: the default group, if initialised).
        pinned: ``{name: rank}`` owners fixed in advance (e.g. the layers the Fisher diagnostics
            read where they run); the rest are balanced around them.

    ``ValueError`` when names or tensors repeat, a pinned name is unknown or its rank out of
    range, or a rank would own no parameter.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, Tensor]],
        build: Callable[[list[tuple[str, Tensor]]], Optimizer],
        cost: Callable[[str, Tensor], float],
        *,
        process_group: dist.ProcessGroup | None = None,
        pinned: Mapping[str, int] | None = None,
    ) -> None:
        named = _trainable(named_params)
        names = [name for name, _ in named]
        if process_group is not None or (dist.is_available() and dist.is_initialized()):
            rank, world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        else:
            rank, world_size = 0, 1
        index = {name: i for i, name in enumerate(names)}
        for name in pinned or {}:
            if name not in index:
                raise ValueError(f"pinned parameter {name!r} is not among the trainable parameters")
        costs = [float(cost(name, param)) for name, param in named]
        owners = assign_owners(costs, world_size, {index[n]: r for n, r in (pinned or {}).items()})
        check_every_rank_owns(owners, world_size)
        super().__init__([param for _, param in named], {})
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self.owners: dict[str, int] = dict(zip(names, owners, strict=True))
        self.owned: list[str] = [name for name in names if self.owners[name] == rank]
        self._params = [param for _, param in named]
        self._costs = costs
        self._owner_list = owners
        self._digest = ownership_digest(names, owners)
        subset = [(name, param) for name, param in named if self.owners[name] == rank]
        self._owned_ids = {id(param) for _, param in subset}
        self.inner: Optimizer = build(subset)
        stepped = {id(p) for group in self.inner.param_groups for p in group["params"]}
        if stepped != self._owned_ids:
            raise ValueError(
                "build must return an optimizer over exactly the (name, param) pairs it is given"
            )
        self._exchange = (
            FlatExchange(self._params, owners, rank, world_size, process_group) if world_size > 1 else None
        )
        # Where the failure codes travel: the CPU under Gloo, the parameters' device under NCCL.
        gloo = world_size > 1 and dist.get_backend(process_group) == "gloo"
        self._device = torch.device("cpu") if gloo else self._params[0].device

    # ------------------------------------------------------------------ the inner optimizer's view
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's groups (so a scheduler's ``group["lr"] = ...`` reaches it)."""
        inner = self.__dict__.get("inner")
        return inner.param_groups if inner is not None else self.__dict__["_all_groups"]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        """``Optimizer.__init__`` first keeps a group of every parameter here; later, the inner's."""
        if "inner" in self.__dict__:
            self.inner.param_groups = value
        else:
            self.__dict__["_all_groups"] = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The inner optimizer's per-parameter state: only the parameters this rank owns."""
        inner = self.__dict__.get("inner")
        return inner.state if inner is not None else {}

    @state.setter
    def state(self, value: Any) -> None:
        """``Optimizer.__init__`` assigns an empty state; the inner optimizer owns the real one."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "inner" in self.__dict__:
            raise NotImplementedError(
                "a sharded optimizer's parameters are fixed when it is built (ownership is balanced "
                "over all of them): build a new one over the new parameter list"
            )
        super().add_param_group(param_group)

    def cost_by_rank(self) -> list[float]:
        """The summed cost of the parameters each rank owns."""
        loads = [0.0] * self.world_size
        for cost, owner in zip(self._costs, self._owner_list, strict=True):
            loads[owner] += cost
        return loads

    def preconditioner_state(self, param: Tensor) -> Any:
        """The inner optimizer's ``preconditioner_state`` for a parameter this rank owns, else None
        (pin the layers a diagnostic reads to the rank it runs on)."""
        getter = getattr(self.inner, "preconditioner_state", None)
        if getter is None or id(param) not in self._owned_ids:
            return None
        return getter(param)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the owned parameters, agree that every rank succeeded, exchange the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._exchange is None:
            self.inner.step()
            return loss
        run_agreed(self.inner.step, self.rank, self.world_size, self._device, self.process_group)
        self._exchange.all_gather()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradient of every parameter, owned or not (DDP writes all of them)."""
        for param in self._params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                if param.grad.grad_fn is not None:
                    param.grad.detach_()
                else:
                    param.grad.requires_grad_(False)
                param.grad.zero_()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """This rank's shard (the inner optimizer's state dict) and what it is a shard of."""
        return {
            **self.inner.state_dict(),
            "sharding": {
                "world_size": self.world_size,
                "rank": self.rank,
                "owners": self._digest,
                "owned": list(self.owned),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load this rank's shard; ``ValueError`` if it was saved by another rank, world size or
        parameter ownership."""
        sharding = state_dict.get("sharding")
        if not isinstance(sharding, Mapping):
            raise ValueError(f"this optimizer state was not saved by a sharded optimizer; {RESUME_HINT}")
        saved = (sharding.get("world_size"), sharding.get("rank"))
        if saved != (self.world_size, self.rank):
            raise ValueError(
                f"this optimizer state is rank {saved[1]}'s shard of a run on {saved[0]} devices, but "
                f"this is rank {self.rank} of {self.world_size}: {RESUME_HINT} ({saved[0]})"
            )
        if sharding.get("owners") != self._digest:
            raise ValueError(
                "this optimizer state was saved under another parameter ownership (another model, "
                f"optimizer hyperparameters or pinned layers); {RESUME_HINT} and the same task"
            )
        self.inner.load_state_dict({k: v for k, v in state_dict.items() if k != "sharding"})


def _trainable(named_params: Sequence[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """The trainable ``(name, param)`` pairs; ``ValueError`` for a repeated name or tensor (a tensor
    with two owners would be stepped twice) or when none is trainable."""
    named = [(name, param) for name, param in named_params if param.requires_grad]
    seen_names: set[str] = set()
    seen_tensors: dict[int, str] = {}
    for name, param in named:
        if name in seen_names:
            raise ValueError(f"parameter name {name!r} appears twice")
        if id(param) in seen_tensors:
            raise ValueError(f"parameters {seen_tensors[id(param)]!r} and {name!r} are the same tensor")
        seen_names.add(name)
        seen_tensors[id(param)] = name
    if not named:
        raise ValueError("no trainable parameters were given to the sharded optimizer")
    return named
