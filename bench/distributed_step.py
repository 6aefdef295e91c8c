"""Does sharding the optimizer step over ranks pay: optimizer time per step per rank, shard vs replicate.

    python -m bench.distributed_step                  # 2 Gloo ranks on the CPU, 1 torch thread each
    python -m bench.distributed_step --quick          # a tiny model and one window (a smoke run)

Under plain DDP every rank steps every parameter (``replicate``). With ``dykaf.distributed``
(``shard``) each parameter has one owner rank, balanced by the optimizer's per-parameter cost; a
rank steps what it owns and the updated parameters are then all-gathered, so the shard step
includes that exchange and the failure consensus. Both run in each rank's process on two copies of
a GPT-shaped parameter set (token and position embeddings, per layer qkv ``3d×d``, attention out
``d×d``, MLP ``4d×d`` and ``d×4d``, two norm vectors) with fixed gradients; only ``step()`` is
timed. The time is the mean over a window of ``precondition_frequency`` steps taken after
initialisation and one refresh (so each window holds one eigenbasis refresh: what a run pays),
the median over windows that alternate between the two modes, and a barrier starts each window
on both ranks together. "shard / replicate" is the slower rank's ratio: a step ends for everyone
at the all-gather, so the ideal is ``1 / ranks`` plus the exchange. "of which own params" is the
inner optimizer's step alone (timed by its step hooks): the rest of a shard step is the consensus,
the exchange and the wait for the other rank. State memory is counted from each rank's optimizer
tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import command_line, markdown_table
from dykaf.baselines.registry import OPTIMIZER_NAMES, build_optimizer
from dykaf.distributed import build_sharded_optimizer

OPTIMIZERS = ("adamw", "soap", "dykaf")
FREQUENCY = 10  # the engine's default precondition_frequency: one refresh per window
MODEL = {"layers": 4, "width": 256, "vocab": 512, "context": 256}
QUICK = {"layers": 2, "width": 32, "vocab": 64, "context": 32}


def gpt_params(layers: int, width: int, vocab: int, context: int) -> list[tuple[str, torch.Tensor]]:
    """A GPT's trainable parameters by name (the head tied to the token embedding), seeded."""
    gen = torch.Generator().manual_seed(0)
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("wte.weight", (vocab, width)),
        ("wpe.weight", (context, width)),
    ]
    for layer in range(layers):
        shapes += [
            (f"h.{layer}.ln_1.weight", (width,)),
            (f"h.{layer}.attn.c_attn.weight", (3 * width, width)),
            (f"h.{layer}.attn.c_proj.weight", (width, width)),
            (f"h.{layer}.ln_2.weight", (width,)),
            (f"h.{layer}.mlp.c_fc.weight", (4 * width, width)),
            (f"h.{layer}.mlp.c_proj.weight", (width, 4 * width)),
        ]
    shapes.append(("ln_f.weight", (width,)))
    return [(name, torch.nn.Parameter(0.02 * torch.randn(*s, generator=gen))) for name, s in shapes]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (views of one block counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.untyped_storage().data_ptr(), value.storage_offset())
                if key not in seen:
                    seen.add(key)
                    total += value.numel() * value.element_size()
    return total


def _rank(rank: int, world_size: int, store: str, config: dict[str, Any], out: str) -> None:
    """One rank's measurements, written to ``out``. A rank that succeeded leaves with ``os._exit(0)``:
    in torch 2.13 a Gloo worker thread may still be releasing a finished collective's tensors while
    the interpreter finalises, which aborts the process ("terminate called without an active
    exception")."""
    torch.set_num_threads(config["threads"])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = {name: _measure(name, config) for name in config["optimizers"]}
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _measure(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """Both modes of ``name`` on this rank: median seconds per step, state bytes, cost split."""
    model = config["model"]
    replicated, sharded = gpt_params(**model), gpt_params(**model)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen) for _, p in replicated] for _ in range(2)]
    modes = {
        "replicate": (build_optimizer(name, replicated, {}), replicated),
        "shard": (build_sharded_optimizer(name, sharded, {}), sharded),
    }

    def steps(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]], count: int) -> None:
        for index in range(count):
            for (_, param), grad in zip(named, grads[index % 2], strict=True):
                param.grad = grad
            optimizer.step()

    for optimizer, named in modes.values():
        dist.barrier()
        steps(optimizer, named, 1 + FREQUENCY)  # initialisation and one refresh, untimed
    # The owned parameters' step alone (the inner optimizer's), through its step hooks: the rest of
    # a shard step is the consensus, the exchange and the wait for the slower rank.
    shard = modes["shard"][0]
    inner_started: list[float] = []
    inner_seconds: list[float] = []
    shard.inner.register_step_pre_hook(lambda *_: inner_started.append(time.perf_counter()))  # type: ignore[attr-defined]
    shard.inner.register_step_post_hook(  # type: ignore[attr-defined]
        lambda *_: inner_seconds.append(time.perf_counter() - inner_started[-1])
    )
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    owned_times: list[float] = []
    for _ in range(config["windows"]):
        for mode, (optimizer, named) in modes.items():
            dist.barrier()
            inner_seconds.clear()
            started = time.perf_counter()
            steps(optimizer, named, FREQUENCY)
            times[mode].append((time.perf_counter() - started) / FREQUENCY)
            if mode == "shard":
                owned_times.append(sum(inner_seconds) / FREQUENCY)
    return {
        **{f"{mode}_s": statistics.median(values) for mode, values in times.items()},
        "owned_s": statistics.median(owned_times),
        **{f"{mode}_state": state_bytes(opt) for mode, (opt, _) in modes.items()},
        "cost_by_rank": shard.cost_by_rank(),  # type: ignore[attr-defined]
        "owned": len(shard.owned),  # type: ignore[attr-defined]
    }


def run(config: dict[str, Any], world_size: int = 2, timeout: float = 1800.0) -> list[dict[str, Any]]:
    """Every rank's results (spawned processes, Gloo, file rendezvous)."""
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(
            _rank,
            args=(world_size, str(Path(folder, "store")), config, folder),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(1.0, deadline - time.monotonic()), grace_period=5):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the ranks did not finish within {timeout:.0f} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world_size)]


def markdown(config: dict[str, Any], ranks: list[dict[str, Any]]) -> str:
    rows = []
    for name in config["optimizers"]:
        per_rank = [rank[name] for rank in ranks]
        ratio = max(r["shard_s"] / r["replicate_s"] for r in per_rank)
        loads = per_rank[0]["cost_by_rank"]
        rows.append(
            (
                name,
                " / ".join(f"{1e3 * r['replicate_s']:.1f}" for r in per_rank),
                " / ".join(f"{1e3 * r['shard_s']:.1f}" for r in per_rank),
                " / ".join(f"{1e3 * r['owned_s']:.1f}" for r in per_rank),
                f"**{ratio:.2f}**",
                f"{per_rank[0]['replicate_state'] / 2**20:.1f}",
                " / ".join(f"{r['shard_state'] / 2**20:.1f}" for r in per_rank),
                f"{max(loads) / min(loads):.3f}",
            )
        )
    header = [
        "optimizer",
        "replicate ms (rank 0 / 1)",
        "shard ms (rank 0 / 1)",
        "of which own params",
        "shard / replicate",
        "replicate state MB",
        "shard state MB (rank 0 / 1)",
        "cost max/min",
    ]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZER_NAMES)
    parser.add_argument("--windows", type=int, default=3, help="timed windows per mode (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--quick", action="store_true", help="a tiny model and one window: a smoke run")
    parser.add_argument("--json", type=Path, help="also write every rank's figures here")
    args = parser.parse_args(argv)
    model = QUICK if args.quick else MODEL
    config = {
        "optimizers": args.optimizers,
        "windows": 1 if args.quick else args.windows,
        "threads": args.threads,
        "model": model,
    }
    started = time.perf_counter()
    ranks = run(config)
    params = sum(p.numel() for _, p in gpt_params(**model))
    print(f"Command: `{command_line(argv)}`  ")
    print(
        f"torch {torch.__version__}, 2 Gloo ranks × {args.threads} thread(s); GPT {model['layers']} layers, "
        f"d = {model['width']}, vocab {model['vocab']}, context {model['context']} ({params / 1e6:.2f} M "
        f"params); window {FREQUENCY} steps, median of {config['windows']}; "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    print(markdown(config, ranks))
    if args.json:
        args.json.write_text(json.dumps({"config": config, "ranks": ranks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
