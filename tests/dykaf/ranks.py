"""Run a function on several CPU ranks (Gloo) for the sharded-optimizer tests, never hanging.

Each rank is a spawned process with one torch thread and a file-store rendezvous under the test's
temporary folder. The ranks report through files there (or by raising: the traceback of the first
rank that fails is raised here). Whatever happens, the ranks are killed after ``timeout`` seconds
and the test fails, so a collective that waits forever cannot stall a test run.

A rank that succeeded leaves with ``os._exit(0)``, skipping the interpreter's finalisation: in
torch 2.13 a Gloo worker thread may still be releasing a finished collective's tensors then, and
its wait for the GIL during finalisation aborts the process ("terminate called without an active
exception", in about one run in five).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., None], world_size: int, store: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(
    fn: Callable[..., None], folder: Path, *args: Any, world_size: int = 2, timeout: float = 45.0
) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` Gloo ranks (``fn`` must be importable:
    a module-level function); fails the test after ``timeout`` seconds."""
    context = mp.start_processes(
        _entry,
        args=(fn, world_size, str(folder / "store"), args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic()), grace_period=1):
            if time.monotonic() >= deadline:
                pytest.fail(f"{fn.__name__} on {world_size} ranks did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def tiny_gpt(
    seed: int = 0, layers: int = 2, width: int = 16, vocab: int = 40
) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of a small GPT-shaped model named the way the roles are inferred
    (embedding, head, hidden matrices, vectors), with one 3-D hidden weight (flattened by the
    DyKAF engine, left to AdamW by Muon). The same ``seed`` gives the same values."""
    gen = torch.Generator().manual_seed(seed)
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, width))]
    for layer in range(layers):
        shapes += [
            (f"h.{layer}.ln_1.weight", (width,)),
            (f"h.{layer}.attn.c_attn.weight", (3 * width, width)),
            (f"h.{layer}.attn.c_attn.bias", (3 * width,)),
            (f"h.{layer}.attn.c_proj.weight", (width, width)),
            (f"h.{layer}.mlp.c_fc.weight", (4 * width, width)),
            (f"h.{layer}.mlp.c_proj.weight", (width, 4 * width)),
        ]
    shapes += [
        ("h.0.conv.weight", (width // 2, 4, 3)),
        ("ln_f.weight", (width,)),
        ("lm_head.weight", (vocab, width)),
    ]
    return [
        (name, torch.nn.Parameter(0.1 * torch.randn(*shape, generator=gen, dtype=torch.float32)))
        for name, shape in shapes
    ]
