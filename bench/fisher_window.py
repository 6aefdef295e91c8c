"""Does the report's Fisher window W explain where the factor estimators sit against the floor?

The shadow estimators track the β-decayed EMA of ``vec(G)vec(G)ᵀ`` over all past gradients, while
the reports measure them against ``H`` over the last ``W`` gradients only (W = 32 keeps 81 % of the
EMA's weight at β = 0.95). This trains the embedded GPT task exactly as a default job's run does
(worker ``TaskSpec`` defaults: lr schedule, clipping, batches; no evaluation) and measures, at the
same steps and from the same gradient stream, every method against ``H`` over W = 32 and over
W = 128 (99.9 % of the EMA's weight, i.e. ≈ the Fisher the shadows track).

    python -m bench.fisher_window --optimizer adamw --report-at 250,500 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import command_line, markdown_table, set_threads, write_text
from dykaf import build_optimizer
from dykaf.fisher import FisherMonitor

LAYERS = (
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.proj.weight",
    "blocks.0.mlp.fc.weight",
    "blocks.0.mlp.proj.weight",
)
METHODS = ("optimal", "dykaf", "dykaf_seq", "soap_shampoo")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--steps", type=int, default=0, help="default: the TaskSpec's (500)")
    parser.add_argument("--report-at", default="", help="comma-separated steps (default: the last)")
    parser.add_argument("--windows", default="32,128")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from server.jobs.spec import TaskSpec
    from worker.lm.data import WindowBatches
    from worker.lm.task import build_task
    from worker.training.schedule import build_scheduler

    spec = TaskSpec()
    steps = args.steps or spec.steps
    task = build_task(spec, 0)
    model = task.model
    named = task.trainable_parameters()
    params = [p for _, p in named]
    optimizer = build_optimizer(args.optimizer, named, {}, {n: task.roles[n] for n, _ in named})
    scheduler = build_scheduler(
        optimizer,
        steps=spec.steps,
        warmup_steps=spec.warmup_steps,
        schedule=spec.schedule,
        min_lr_ratio=spec.min_lr_ratio,
    )
    windows = [int(w) for w in args.windows.split(",")]
    # Every-step shadows (no schedule) and no reuse of the optimizer's factors: every method is a
    # shadow fed the same clipped gradients; the monitors differ only in their window.
    monitors = {
        w: FisherMonitor(model, optimizer, layers=list(LAYERS), window=w, reuse_own=False, background="off")
        for w in windows
    }
    report_at = {int(s) for s in args.report_at.split(",") if s} or {steps}
    batches = WindowBatches(task.train_tokens, spec.context, spec.batch_size, 0)
    results: dict[tuple[int, int, str, str], float] = {}
    started = time.perf_counter()
    for step in range(1, steps + 1):
        inputs, targets = batches.batch(step - 1)
        optimizer.zero_grad(set_to_none=True)
        logits = task.logits(model, inputs)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        for monitor in monitors.values():
            monitor.observe()
        optimizer.step()
        scheduler.step()
        if step in report_at:
            for w, monitor in monitors.items():
                for row in monitor.report(step):
                    if row.metric == "kron_rel_err" and row.method in METHODS:
                        results[(step, w, row.layer, row.method)] = row.value
            print(f"step {step}: {time.perf_counter() - started:.0f} s", flush=True)

    rows = []
    for step in sorted(report_at):
        for layer in LAYERS:
            for w in windows:
                v = [results.get((step, w, layer, m), float("nan")) for m in METHODS]
                gap = v[3] - v[0]
                closed = (v[3] - v[1]) / gap if gap > 0 else float("nan")
                rows.append([step, layer, w, *(f"{x:.3f}" for x in v), f"{100 * closed:.0f} %"])
    header = [
        "step",
        "layer",
        "W",
        "floor",
        "DyKAF",
        "DyKAF-seq",
        "SOAP/Shampoo",
        "SOAP's gap closed by DyKAF",
    ]
    text = (
        f"`{command_line(argv)}`: `kron_rel_err` against H over the last W gradients "
        "(β = 0.95; every-step shadows).\n\n" + markdown_table(header, rows, align="rlrrrrrr") + "\n"
    )
    print(text)
    if args.output is not None:
        write_text(args.output, text)


if __name__ == "__main__":
    main()
