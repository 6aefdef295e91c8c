"""Aten ops per optimizer step on a GPT-shaped parameter stack, counted with a TorchDispatchMode.

    python bench/op_count.py                        # CPU; DyKAF, SOAP, AdamW (foreach) at 2 and 12 layers
    python bench/op_count.py --legacy 1abde54       # also the per-matrix engine of that commit (needs git)
    python bench/op_count.py --device cuda          # the same count on a GPU (bench/gpu_check.py runs it)

Each transformer layer holds the matrices ``3d×d`` (qkv), ``d×d`` (attention out), ``4d×d`` (MLP in),
``d×4d`` (MLP out) and two ``d`` vectors (norms). The count covers steps 2–11 with
``precondition_frequency=10``, so it includes exactly one eigenbasis refresh and no initialisation,
and is reported per step. On a GPU a small model's optimizer step is launch-bound: its time follows
this count, not its FLOPs. "ops" counts every aten call (each costs host time); "kernels" leaves
out the ops that only relabel memory (views), which launch nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dykaf import SOAP, DyKAF  # noqa: E402

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
    module = types.ModuleType(f"dykaf_optimizer_{commit}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{commit}:dykaf/optimizer.py", "exec"), module.__dict__)
    return module


def build(name: str, params: list[torch.nn.Parameter], legacy: types.ModuleType | None = None) -> Any:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    engine = legacy.DyKAF if legacy is not None else DyKAF
    if name == "soap":
        return (legacy.SOAP if legacy is not None else SOAP)(params, precondition_frequency=FREQUENCY)
    if name == "dykaf":
        return engine(params, precondition_frequency=FREQUENCY)
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
    args = parser.parse_args()
    print(f"Command: `python bench/op_count.py {' '.join(sys.argv[1:])}`  ")
    print(f"torch {torch.__version__}\n")
    result = run(args.device, tuple(args.layers), args.d, OPTIMIZERS, args.legacy)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
