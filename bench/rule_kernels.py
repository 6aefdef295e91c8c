"""Kernels and time per Kronecker-factor update, per rule (``dykaf.kronecker``).

    python bench/rule_kernels.py                      # CPU, one thread
    python bench/rule_kernels.py --device cuda        # host time per update on a GPU (CUDA events)

On a GPU the updates of small layers are launch-bound: each kernel costs a few microseconds of host
time whatever its size, so a rule's cost there follows its kernel count more than its flops
(BENCHMARKS.md, "Factor-rule kernels"). This counts the kernels one update dispatches (views and
layout-only ops excluded) and times updates at a small and a real layer shape; the ``× ema`` column
is the ratio to SOAP's rule measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from dykaf.kronecker import FACTOR_RULES, init_kron, update_factors

# Ops that only relabel memory: no kernel runs for them.
LAYOUT_OPS = frozenset(
    {
        "permute",
        "view",
        "reshape",
        "t",
        "transpose",
        "_reshape_alias",
        "expand",
        "detach",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "alias",
        "as_strided",
        "_unsafe_view",
    }
)


class KernelCount(TorchDispatchMode):
    """Counts the aten ops that launch work while active."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ not in LAYOUT_OPS:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def kernels_per_update(rule: str, shape: tuple[int, int] = (48, 32)) -> int:
    """Kernels one ``update_factors(rule, …)`` dispatches on a CPU tensor of ``shape``."""
    gen = torch.Generator().manual_seed(0)
    left, right = init_kron(torch.randn(*shape, generator=gen), 0.95)
    grad = torch.randn(*shape, generator=gen)
    with KernelCount() as count:
        update_factors(rule, left, right, grad, 0.95)
    return count.kernels


def seconds_per_update(rule: str, shape: tuple[int, int], device: torch.device, updates: int = 50) -> float:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(*shape, generator=gen).to(device) for _ in range(updates + 1)]
    left, right = init_kron(grads[0], 0.95)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        factors = (left, right)
        for grad in grads[1:]:
            factors = update_factors(rule, *factors, grad, 0.95)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - started) / updates)
    return best


def run(device: str, shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """Kernels per update and time per update of every rule at ``shapes`` on ``device``."""
    dev = torch.device(device)
    ema = {shape: seconds_per_update("ema", shape, dev) for shape in shapes}
    rows = []
    for rule in FACTOR_RULES:
        row: dict[str, Any] = {"rule": rule, "kernels": kernels_per_update(rule)}
        for shape in shapes:
            took = ema[shape] if rule == "ema" else seconds_per_update(rule, shape, dev)
            row[f"{shape[0]}x{shape[1]}_us"] = round(1e6 * took, 1)
            row[f"{shape[0]}x{shape[1]}_x_ema"] = round(took / ema[shape], 2)
        rows.append(row)
    return {"device": device, "shapes": [f"{m}x{n}" for m, n in shapes], "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    """``run``'s result as a Markdown table (µs per update and its ratio to SOAP's EMA rule)."""
    shapes = result["shapes"]
    columns = " | ".join(f"{shape.replace('x', '×')} µs | × ema" for shape in shapes)
    lines = [
        f"| rule | kernels per update | {columns} |",
        "|---|---:|" + "---:|---:|" * len(shapes),
    ]
    for row in result["rows"]:
        cells = [str(row["kernels"])]
        for shape in shapes:
            cells += [f"{row[f'{shape}_us']:.1f}", f"{row[f'{shape}_x_ema']:.2f}"]
        lines.append(f"| {row['rule']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="48x32,384x128")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(int(m), int(n)) for m, n in (s.split("x") for s in args.shapes.split(","))]
    print(f"Command: `python bench/rule_kernels.py {' '.join(sys.argv[1:])}`  ")
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} CPU threads, float32\n")
    print(markdown(run(args.device, shapes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
