"""Aten ops per optimizer step on a GPT-shaped parameter stack, counted with a TorchDispatchMode.

    python bench/op_count.py                        # CPU; DyKAF, SOAP, AdamW (foreach) at 2 and 12 layers
    python bench/op_count.py --legacy 1abde54       # also the per-matrix engine of that commit (needs git)
    python bench/op_count.py --device cuda          # the same count on a GPU (bench/gpu_check.py runs it)
    python bench/op_count.py --time 6 64            # also ms per step, 6 layers d=64 (eager, compiled)

Each transformer layer holds the matrices ``3d×d`` (qkv), ``d×d`` (attention out), ``4d×d`` (MLP in),
``d×4d`` (MLP out) and two ``d`` vectors (norms). The count covers steps 2–11 with
``precondition_frequency=10``, so it includes exactly one eigenbasis refresh and no initialisation,
and is reported per step. On a GPU a small model's optimizer step is launch-bound: its time follows
this count, not its FLOPs. "ops" counts every aten call (each costs host time); "kernels" leaves
out the ops that only relabel memory (views), which launch nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import ROOT
from dykaf import SOAP, DyKAF

# Ops that only relabel memory: no kernel runs for them.
VIEW_OPS = frozenset(
    {
        "alias",
        "as_strided",
        "detach",
        "expand",
        "permute",
        "reshape",
        "select",
        "slice",
        "squeeze",
        "t",
        "transpose",
        "unbind",
        "unsqueeze",
        "view",
        "_reshape_alias",
        "_unsafe_view",
    }
)
OPTIMIZERS = ("dykaf", "soap", "adamw")
STEPS = 10
FREQUENCY = 10


class OpCount(TorchDispatchMode):
    """Counts aten calls (``ops``) and the ones that launch work (``kernels``) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        if func.overloadpacket.__name__ not in VIEW_OPS:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def gpt_stack(n_layer: int, d: int, device: str) -> list[torch.nn.Parameter]:
    """The preconditioned and the Adam-routed parameters of ``n_layer`` GPT blocks of width ``d``."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)] * n_layer
    return [torch.nn.Parameter((0.02 * torch.randn(*s, generator=gen)).to(device)) for s in shapes]


def load_legacy_engine(commit: str) -> types.ModuleType:
    """``dykaf/optimizer.py`` as of ``commit`` (git), importable beside today's: the per-matrix
    engine for side-by-side counts and timings. It uses today's factor rules, whose 2-D path is
    the one it had."""
    source = subprocess.run(
        ["git", "show", f"{commit}:dykaf/optimizer.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    # The options module has since become a validated config: give the old engine its old validator.
    source = source.replace(
        "from dykaf.options import DEFAULTS, factor_beta, validate_hyperparameters",
        "from dykaf.options import DEFAULTS, DyKAFConfig, factor_beta\n"
        "validate_hyperparameters = DyKAFConfig.from_group",
    )
    module = types.ModuleType(f"dykaf_optimizer_{commit}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{commit}:dykaf/optimizer.py", "exec"), module.__dict__)
    return module


def build(
    name: str,
    params: list[torch.nn.Parameter],
    legacy: types.ModuleType | None = None,
    compiled: bool = False,
) -> Any:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    extra = {"compile_step": True} if compiled else {}
    if name == "soap":
        return (legacy.SOAP if legacy is not None else SOAP)(
            params, precondition_frequency=FREQUENCY, **extra
        )
    if name == "dykaf":
        return (legacy.DyKAF if legacy is not None else DyKAF)(
            params, precondition_frequency=FREQUENCY, **extra
        )
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def count(
    name: str, n_layer: int, d: int = 16, device: str = "cpu", legacy: types.ModuleType | None = None
) -> dict[str, float]:
    """Ops and kernels per step over steps 2–11 of ``name`` on ``n_layer`` GPT blocks."""
    params = gpt_stack(n_layer, d, device)
    opt = build(name, params, legacy)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen).to(device) for p in params] for _ in range(STEPS + 1)]

    def step(index: int) -> None:
        for p, g in zip(params, grads[index], strict=True):
            p.grad = g
        opt.step()

    step(0)  # initialisation (per matrix, may synchronise): not counted
    with OpCount() as counter:
        for index in range(1, STEPS + 1):
            step(index)
    return {"ops": counter.ops / STEPS, "kernels": counter.kernels / STEPS}


def run(
    device: str = "cpu",
    layers: tuple[int, int] = (2, 12),
    d: int = 16,
    optimizers: tuple[str, ...] = OPTIMIZERS,
    legacy_commit: str | None = None,
) -> dict[str, Any]:
    """Per optimizer: ops and kernels per step and per layer at both depths, and their ratio."""
    engines: list[tuple[str, types.ModuleType | None]] = [(n, None) for n in optimizers]
    if legacy_commit:
        module = load_legacy_engine(legacy_commit)
        engines += [(f"{n}@{legacy_commit}", module) for n in optimizers if n != "adamw"]
    rows = []
    small, large = layers
    for label, module in engines:
        name = label.split("@")[0]
        few, many = count(name, small, d, device, module), count(name, large, d, device, module)
        rows.append(
            {
                "optimizer": label,
                f"ops_{small}": few["ops"],
                f"ops_{large}": many["ops"],
                f"ops_per_layer_{large}": many["ops"] / large,
                f"kernels_per_layer_{large}": many["kernels"] / large,
                "ratio": many["ops"] / few["ops"],
            }
        )
        print(f"  {label}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"device": device, "layers": list(layers), "d": d, "rows": rows}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stack_stepper(
    name: str,
    n_layer: int,
    d: int,
    device: str = "cpu",
    legacy: types.ModuleType | None = None,
    compiled: bool = False,
) -> Callable[[], float]:
    """``name`` on an ``n_layer`` stack, initialised and through one untimed window (which also
    absorbs a compiled step's compilation); returns a function that times one window of
    ``FREQUENCY`` steps (one refresh) and gives seconds per step."""
    params = gpt_stack(n_layer, d, device)
    opt = build(name, params, legacy, compiled)
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen).to(device) for p in params] for _ in range(4)]

    def steps(count: int) -> None:
        for index in range(count):
            for p, g in zip(params, grads[index % len(grads)], strict=True):
                p.grad = g
            opt.step()

    steps(1 + FREQUENCY)

    def window() -> float:
        _sync(device)
        started = time.perf_counter()
        steps(FREQUENCY)
        _sync(device)
        return (time.perf_counter() - started) / FREQUENCY

    return window


def time_stacks(
    variants: dict[str, tuple[str, types.ModuleType | None, bool]],
    n_layer: int,
    d: int,
    device: str = "cpu",
    windows: int = 5,
) -> dict[str, float | None]:
    """Median seconds per step of each ``label: (name, legacy module, compiled)`` variant, with
    the variants' windows interleaved so that a busy machine slows them alike. A variant that
    fails to build or compile (e.g. no C++ compiler for inductor) gets None."""
    windows_of: dict[str, Callable[[], float]] = {}
    for label, (name, module, compiled) in variants.items():
        try:
            windows_of[label] = stack_stepper(name, n_layer, d, device, module, compiled)
        except Exception as exc:  # the other variants' figures are still worth having
            print(f"  {label}: {exc!r}", file=sys.stderr)
    times: dict[str, list[float]] = {label: [] for label in windows_of}
    for _ in range(windows):
        for label, window in windows_of.items():
            times[label].append(window())
    return {label: statistics.median(times[label]) if label in times else None for label in variants}


def host_syncs(name: str, n_layer: int, d: int, device: str) -> str:
    """Whether steps 2–11 wait for the device: on CUDA under ``set_sync_debug_mode("error")``,
    elsewhere by watching for the aten ops that read a value on the host."""
    params = gpt_stack(n_layer, d, device)
    opt = build(name, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(FREQUENCY):
                opt.step()
        except RuntimeError as exc:
            return f"synchronises: {str(exc).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return "none (set_sync_debug_mode('error'))"
    with HostReads() as watch:
        for _ in range(FREQUENCY):
            opt.step()
    return f"synchronises: {sorted(set(watch.reads))}" if watch.reads else "none (no host-reading aten op)"


class HostReads(TorchDispatchMode):
    """Records the aten ops that read a tensor's value on the host (each waits for a GPU)."""

    OPS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose"})

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ in self.OPS:
            self.reads.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def engine_check(device: str, dry_run: bool) -> dict[str, Any]:
    """``bench/gpu_check.py``'s engine section: ops per step at 2 and 12 layers, host syncs, and
    ms per step of the 6-layer d=384 GPT stack, eager and with ``compile_step`` (tiny on --dry-run,
    where compilation is left out: it takes minutes on a CPU)."""
    layers, d, timed_layers = ((1, 2), 16, 1) if dry_run else ((2, 12), 384, 6)
    counts = run(device, layers, d)
    syncs = {name: host_syncs(name, timed_layers, d, device) for name in ("dykaf", "soap")}
    variants = {
        f"{name}{' compiled' if compiled else ''}": (name, None, compiled)
        for name in OPTIMIZERS
        for compiled in ((False, True) if name != "adamw" and not dry_run else (False,))
    }
    seconds = time_stacks(variants, timed_layers, d, device, windows=2 if dry_run else 5)
    timing = [
        {"optimizer": name, "compile_step": compiled, "step_ms": None if s is None else 1e3 * s}
        for (name, _, compiled), s in zip(variants.values(), seconds.values(), strict=True)
    ]
    return {"counts": counts, "syncs": syncs, "stack": {"layers": timed_layers, "d": d}, "timing": timing}


def engine_markdown(section: dict[str, Any], training: dict[str, Any] | None = None) -> str:
    """The engine section as Markdown, with the issue's throughput ratios from the training runs."""
    if "counts" not in section:
        return section.get("skipped") or section.get("error", "")
    stack = section["stack"]
    lines = [markdown(section["counts"]), "", f"Host synchronisations in steps 2–11: {section['syncs']}", ""]
    lines += [f"ms per optimizer step, {stack['layers']}-layer d={stack['d']} stack:", ""]
    lines += ["| optimizer | compile_step | step ms |", "|---|---|---:|"]
    for row in section["timing"]:
        ms = "failed" if row["step_ms"] is None else f"{row['step_ms']:.2f}"
        lines.append(f"| {row['optimizer']} | {row['compile_step']} | {ms} |")
    runs = {r["optimizer"]: r.get("tokens_per_s") for r in (training or {}).get("runs", [])}
    if all(runs.get(n) for n in OPTIMIZERS):
        lines += [
            "",
            f"Training tokens/s: DyKAF/SOAP {runs['dykaf'] / runs['soap']:.2f} (target ≥ 0.8), "
            f"SOAP/AdamW {runs['soap'] / runs['adamw']:.2f} (target ≥ 0.6)",
        ]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    small, large = result["layers"]
    lines = [
        f"Device {result['device']}, d = {result['d']}, ops per step over steps 2–11 (one refresh)",
        "",
        f"| optimizer | ops/step, {small} layers | ops/step, {large} layers | ops/layer at {large} | "
        f"kernels/layer at {large} | {large}:{small} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        cells = [row[f"ops_{small}"], row[f"ops_{large}"], row[f"ops_per_layer_{large}"]]
        cells += [row[f"kernels_per_layer_{large}"]]
        lines.append(
            f"| {row['optimizer']} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d", type=int, default=16, help="model width (the count does not depend on it)")
    parser.add_argument("--layers", type=int, nargs=2, default=[2, 12])
    parser.add_argument("--legacy", help="also count the engine of this git commit (e.g. 1abde54)")
    parser.add_argument("--time", type=int, nargs=2, metavar=("LAYERS", "D"), help="also time steps")
    parser.add_argument("--no-compile", action="store_true", help="with --time: eager only")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"Command: `python bench/op_count.py {' '.join(sys.argv[1:])}`  ")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    result = run(args.device, tuple(args.layers), args.d, OPTIMIZERS, args.legacy)
    print(markdown(result))
    if args.time:
        n_layer, d = args.time
        legacy = load_legacy_engine(args.legacy) if args.legacy else None
        print(
            f"\nms per step, {n_layer}-layer d={d} stack (median of 5 interleaved windows of {FREQUENCY})\n"
        )
        variants = {name: (name, None, False) for name in OPTIMIZERS}
        if not args.no_compile:
            variants.update({f"{n} compile_step": (n, None, True) for n in ("dykaf", "soap")})
        if legacy is not None:
            variants.update({f"{n}@{args.legacy}": (n, legacy, False) for n in ("dykaf", "soap")})
        seconds = time_stacks(variants, n_layer, d, args.device)
        print("| optimizer | ms/step | × today's eager |\n|---|---:|---:|")
        for label, value in seconds.items():
            eager = seconds[label.split(" ")[0].split("@")[0]]
            ratio = f"{value / eager:.2f}" if value and eager else ""
            print(f"| {label} | {'failed' if value is None else f'{1e3 * value:.2f}'} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
