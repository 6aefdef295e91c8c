"""After a sharded step: every rank's updated parameters to every other rank, one collective per dtype.

Each rank steps only the parameters it owns, so after the step each parameter is current on its
owner alone. Since every rank knows the ownership map, the exchange needs no metadata: per
``(dtype, device)`` each rank packs its owned parameters, in parameter order, into one flat buffer
(padded to the largest rank's share, as an all-gather needs equal inputs), one all-gather
concatenates the ranks' buffers, and each rank copies the others' slices into its parameters. The
buffers and their per-parameter views are made once; a step is one ``_foreach_copy_`` to pack, one
collective per buffer and one ``_foreach_copy_`` to unpack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed ``all_gather_into_tensor`` (now deprecated, same signature) to ``all_gather_single``.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(eq=False)
class _FlatGroup:
    """One ``(dtype, device)``'s buffers: ``local`` (this rank's share, padded to ``width``) and
    ``gathered`` (every rank's, ``world_size × width``), with the parameter views into them."""

    local: Tensor
    gathered: Tensor
    own_params: list[Tensor]
    own_views: list[Tensor]
    other_params: list[Tensor]
    other_views: list[Tensor]


class FlatExchange:
    """The all-gather of owned parameters over ``group`` (``owners[i]`` owns ``params[i]``)."""

    def __init__(
        self,
        params: Sequence[Tensor],
        owners: Sequence[int],
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.group = group
        by_kind: dict[tuple[torch.dtype, torch.device], list[tuple[Tensor, int]]] = {}
        for param, owner in zip(params, owners, strict=True):
            by_kind.setdefault((param.dtype, param.device), []).append((param, owner))
        self.groups: list[_FlatGroup] = []
        self.sent_elements = 0  # this rank's padded share, summed over the buffers
        self.padding_elements = 0  # padding over all ranks' shares
        for (dtype, device), members in by_kind.items():
            shares = [[p for p, owner in members if owner == r] for r in range(world_size)]
            sizes = [sum(p.numel() for p in share) for share in shares]
            width = max(sizes)
            if width == 0:
                continue
            gathered = torch.zeros(world_size * width, dtype=dtype, device=device)
            local = torch.zeros(width, dtype=dtype, device=device)
            views = [_views(gathered[r * width : (r + 1) * width], shares[r]) for r in range(world_size)]
            others = [r for r in range(world_size) if r != rank]
            self.groups.append(
                _FlatGroup(
                    local=local,
                    gathered=gathered,
                    own_params=shares[rank],
                    own_views=_views(local, shares[rank]),
                    other_params=[p for r in others for p in shares[r]],
                    other_views=[v for r in others for v in views[r]],
                )
            )
            self.sent_elements += width
            self.padding_elements += world_size * width - sum(sizes)

    @torch.no_grad()
    def all_gather(self) -> None:
        """Pack the owned parameters, gather every rank's, unpack the others' (in place)."""
        works = []
        for flat in self.groups:
            if flat.own_params:
                torch._foreach_copy_(flat.own_views, flat.own_params)
            works.append(_all_gather(flat.gathered, flat.local, group=self.group, async_op=True))
        for flat, work in zip(self.groups, works, strict=True):
            work.wait()
            if flat.other_params:
                torch._foreach_copy_(flat.other_params, flat.other_views)


def _views(buffer: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive views of ``buffer``, one per parameter in its shape."""
    views, offset = [], 0
    for param in params:
        views.append(buffer[offset : offset + param.numel()].view(param.shape))
        offset += param.numel()
    return views
