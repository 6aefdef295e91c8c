"""Time one optimizer step and measure optimizer-state memory on GPT-style layer shapes.

    python bench/optimizer_step.py                      # CPU: d_model 256, 512, 1024
    python bench/optimizer_step.py --device cuda        # GPT-2-small shapes (768×768 … 3072×768)
    python bench/optimizer_step.py --json out.json      # also write the rows as JSON
    python bench/optimizer_step.py --legacy 1abde54     # also that commit's DyKAF engine (needs git)

Every optimizer runs in the same process on the same shapes; the step time is the mean over a
window of ``precondition_frequency`` steps taken after initialisation, so each window contains
exactly one eigenbasis refresh (the amortised cost a training run pays), and the median over
windows that alternate between the optimizers (a busy machine slows them alike). State memory is counted
exactly from the tensors each optimizer keeps. The "floor" column is DyKAF's extra factor-update
FLOPs over SOAP's at the matmul rate measured on this device in this run. With ``--legacy`` each
DyKAF-engine optimizer also runs as the engine of that commit (same hyperparameters, same process),
and "× legacy" is today's step time over that engine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from dykaf.baselines import registry

ENGINE_OPTIMIZERS = ("soap", "dykaf", "dykaf-rank1", "dykaf-seq")

OPTIMIZERS = ("adamw", "soap", "dykaf", "dykaf-rank1", "muon", "shampoo")
FREQUENCY = 10
WINDOWS = 5
# Shampoo's inverse roots every step would dominate everything; practitioners amortise them.
EXTRA_HP = {"shampoo": {"precondition_frequency": FREQUENCY}}


def layer_shapes(device: str, widths: list[int] | None) -> list[tuple[int, int]]:
    """The distinct matrix shapes of a GPT block (qkv, attention out, MLP in, MLP out)."""
    if widths is None:
        widths = [768] if device == "cuda" else [256, 512, 1024]
    shapes = []
    for d in widths:
        shapes += [(d, d), (d, 3 * d), (d, 4 * d), (4 * d, d)]
    return shapes


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str, repeats: int) -> list[float]:
    """Per-call seconds: CUDA events on GPU, perf_counter on CPU."""
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def matmul_rate(device: str, size: int = 2048) -> float:
    """Measured float32 matmul FLOP/s on this device (the rate behind the FLOP floor)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    synchronize(device)
    seconds = statistics.median(timed(lambda: a @ b, device, 5))
    return 2 * size**3 / seconds


def dykaf_extra_flops(m: int, n: int) -> int:
    """FLOPs of DyKAF's parallel factor update beyond SOAP's EMA (``2mn(m+n)``), per step."""
    soap = 2 * m * m * n + 2 * m * n * n
    products = 2 * (2 * m * m * n + 2 * m * n * n)  # ĜV0Ĝᵀ and ĜᵀU0Ĝ
    cross = min(2 * m * m * n + 2 * m * n * n, 2 * m * m * n + 4 * m**3, 2 * m * n * n + 4 * n**3)
    return products + cross - soap


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif isinstance(value, list | tuple):
                total += sum(v.numel() * v.element_size() for v in value if torch.is_tensor(v))
    return total


def prepare(
    name: str, shape: tuple[int, int], device: str, legacy: Any = None
) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    """``name`` on one ``shape`` matrix, initialised and through one refresh window; returns its
    step function and the optimizer. ``legacy``: a module with an older ``DyKAF`` class to run
    instead, with the hyperparameters the registry gives ``name``."""
    gen = torch.Generator(device=device).manual_seed(0)
    param = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen) * 0.02)
    grads = [torch.randn(shape, device=device, generator=gen) for _ in range(4)]
    opt = registry.build_optimizer(
        name, [("blocks.0.mlp.weight", param)], {"lr": 1e-4, **EXTRA_HP.get(name, {})}
    )
    if legacy is not None:
        hp = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        opt = legacy.DyKAF([param], **hp)
    counter = iter(range(10**9))

    def one_step() -> None:
        param.grad = grads[next(counter) % len(grads)]
        opt.step()

    for _ in range(FREQUENCY + 1):  # initialisation step plus one full refresh window
        one_step()
    synchronize(device)
    return one_step, opt


def measure_together(
    engines: dict[str, Any], shape: tuple[int, int], device: str
) -> dict[str, dict[str, float]]:
    """Step time (median over refresh windows) and state size of every engine at ``shape``.

    The engines' windows are interleaved (A B C A B C …), so that a busy machine slows them alike
    and their ratios stay meaningful."""
    prepared = {
        label: prepare(label.split("@")[0], shape, device, module) for label, module in engines.items()
    }
    windows: dict[str, list[float]] = {label: [] for label in prepared}
    for _ in range(WINDOWS):
        for label, (one_step, _) in prepared.items():
            windows[label].append(sum(timed(one_step, device, FREQUENCY)) / FREQUENCY)
    return {
        label: {"step_s": statistics.median(windows[label]), "state_mb": state_bytes(opt) / 2**20}
        for label, (_, opt) in prepared.items()
    }


def run(
    device: str, widths: list[int] | None, optimizers: tuple[str, ...], legacy_commit: str | None = None
) -> dict:
    rate = matmul_rate(device)
    engines: dict[str, Any] = {name: None for name in optimizers}
    if legacy_commit:
        from bench.op_count import load_legacy_engine

        module = load_legacy_engine(legacy_commit)
        engines.update({f"{n}@{legacy_commit}": module for n in optimizers if n in ENGINE_OPTIMIZERS})
    measure_together(engines, (64, 64), device)  # warm-up: first-call allocations and lazy imports
    rows = []
    for shape in layer_shapes(device, widths):
        results = measure_together(engines, shape, device)
        m, n = shape
        floor = dykaf_extra_flops(m, n) / rate
        for name, res in results.items():
            rows.append(
                {
                    "shape": f"{m}x{n}",
                    "optimizer": name,
                    "step_ms": res["step_s"] * 1e3,
                    "vs_adamw": res["step_s"] / results["adamw"]["step_s"] if "adamw" in results else None,
                    "vs_soap": res["step_s"] / results["soap"]["step_s"] if "soap" in results else None,
                    "state_mb": res["state_mb"],
                    "vs_legacy": (
                        res["step_s"] / results[f"{name}@{legacy_commit}"]["step_s"]
                        if f"{name}@{legacy_commit}" in results
                        else None
                    ),
                    "dykaf_extra_floor_ms": floor * 1e3 if name.startswith("dykaf") else None,
                }
            )
        done = ", ".join(f"{name} {res['step_s'] * 1e3:.2f} ms" for name, res in results.items())
        print(f"  {m}x{n}: {done}", file=sys.stderr, flush=True)
    return {"device": describe(device), "matmul_tflops": rate / 1e12, "rows": rows}


def describe(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({torch.get_num_threads()} threads)"


def markdown(result: dict) -> str:
    lines = [
        f"Device: {result['device']}; measured float32 matmul rate {result['matmul_tflops']:.3f} TFLOP/s",
        "",
        "| shape | optimizer | step ms | × AdamW | × SOAP | × legacy | state MB "
        "| DyKAF extra-FLOP floor ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    for row in result["rows"]:
        lines.append(
            f"| {row['shape']} | {row['optimizer']} | {row['step_ms']:.2f} | {fmt(row['vs_adamw'])} | "
            f"{fmt(row['vs_soap'])} | {fmt(row.get('vs_legacy'))} | {row['state_mb']:.2f} | "
            f"{fmt(row['dykaf_extra_floor_ms'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--widths", type=int, nargs="*", help="d_model values (default by device)")
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared CPU)")
    parser.add_argument("--legacy", help="also run the DyKAF engine of this git commit (e.g. 1abde54)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    result = run(args.device, args.widths, tuple(args.optimizers), args.legacy)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
