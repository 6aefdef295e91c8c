"""Writes ``pre_block_checkpoint.pt``: a DyKAF checkpoint in the per-parameter format of the engine
before same-shape matrices were batched into blocks (commit 1abde54), plus the parameters that engine
reached after six more steps. ``tests/dykaf/test_blocks.py`` loads it into today's engine.

    PYTHONPATH=$PWD python tests/dykaf/data/make_pre_block_checkpoint.py   # only with that old engine
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dykaf import DyKAF


def make_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (6, 4), (3, 8), (3, 8), (3, 2, 2, 2), (5,), (30, 4)]
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def make_grads(params: list[torch.nn.Parameter], steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


def groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [
        {"params": params[:5]},
        {"params": params[5:], "factor_rule": "sequential", "second_moment": "rank1", "max_precond_dim": 10},
    ]


def main() -> None:
    params = make_params()
    grads = make_grads(params, 12)
    opt = DyKAF(groups(params), lr=1e-2, precondition_frequency=4)
    for step_grads in grads[:6]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()
    saved = {
        "params_at_6": [p.detach().clone() for p in params],
        "optimizer": copy.deepcopy(opt.state_dict()),  # state_dict() holds references
    }
    for step_grads in grads[6:]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()
    saved["params_at_12"] = [p.detach().clone() for p in params]
    torch.save(saved, Path(__file__).with_name("pre_block_checkpoint.pt"))


if __name__ == "__main__":
    main()
