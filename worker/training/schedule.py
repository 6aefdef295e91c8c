"""Learning-rate schedules: linear warmup, then cosine / linear decay to ``min_lr_ratio`` or constant.

Expressed as a multiplier for ``torch.optim.lr_scheduler.LambdaLR`` so every parameter group keeps its
own base learning rate (optimizers that route embeddings or vectors to a different lr stay correct).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, *, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for the update with zero-based index ``step``.

    Warmup ramps linearly to 1 and reaches it on update ``warmup_steps - 1`` (the first update already
    has a non-zero lr); decay then runs until the last update (``steps - 1``) ends at ``min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; accepted: cosine, linear, constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float
) -> LambdaLR:
    """A ``LambdaLR`` stepped once per optimizer update."""

    def multiplier(step: int) -> float:
        return lr_multiplier(
            step, steps=steps, warmup_steps=warmup_steps, schedule=schedule, min_lr_ratio=min_lr_ratio
        )

    return LambdaLR(optimizer, multiplier)
