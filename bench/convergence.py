"""Convergence benchmark: DyKAF vs SOAP vs AdamW vs Muon (and Shampoo) on the embedded pre-training task.

Protocol (fixed before looking at any result, the same for every optimizer):
- task: byte-level GPT (2 layers, width 128, 4 heads, context 64) on the Python documentation
  topics, cosine schedule with warmup, gradient clipping at 1.0, CPU;
- tuning: 5 learning rates per optimizer on seed 0 (equal budget), the one with the lowest final
  validation loss is selected, then seeds 1 and 2 run at that point (``sweep_selection: first_seed``);
- every other hyperparameter is the registry default;
- report: final and best validation loss (mean ± std over the 3 seeds at the selected lr), steps and
  training seconds to reach a target loss, step time split, peak memory.
- the target loss is defined without favouring anyone: the highest (worst) mean final validation
  loss among the selected configurations, i.e. the level every optimizer reaches; steps-to-target
  then says who gets there first.

Run (about 9 minutes on 2 idle CPU cores for the default four; much longer when they are shared):
    nice python -m bench.convergence --out bench/results/convergence
Shampoo (pytorch-optimizer's grafted ScalableShampoo, coupled-Newton inverse roots every 10 steps)
adds about 8 minutes:
    nice python -m bench.convergence --optimizers adamw,soap,dykaf,muon,shampoo
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import ROOT, command_line, set_threads, write_text
from server.jobs.spec import JobSpec
from worker.local import JobOutcome, RunRecord, run_job

# Five points, about half a decade apart, the same span for the three Adam-type methods; Muon's lr
# is on another scale (orthogonalised updates), so its grid is centred on its usual default 0.02.
SWEEPS: dict[str, list[float]] = {
    "adamw": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "soap": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "dykaf": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "muon": [0.005, 0.01, 0.02, 0.05, 0.1],
    "shampoo": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
}
DEFAULT_OPTIMIZERS = ("adamw", "soap", "dykaf", "muon")
TITLE_NAMES = {"adamw": "AdamW", "soap": "SOAP", "dykaf": "DyKAF", "muon": "Muon", "shampoo": "Shampoo"}


def build_job(steps: int, device: str, optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "convergence",
            "device": device,
            "seeds": [0, 1, 2],
            "sweep_selection": "first_seed",
            "task": {
                "kind": "pretrain",
                "n_layer": 2,
                "n_head": 4,
                "d_model": 128,
                "context": 64,
                "batch_size": 8,
                "steps": steps,
                "warmup_steps": max(1, steps // 10),
                "schedule": "cosine",
                "min_lr_ratio": 0.1,
                "grad_clip": 1.0,
                "eval_every": max(1, steps // 10),
                "eval_batches": 4,
                "log_every": max(1, steps // 40),
                "corpus": {"name": "pydoc"},
                "tokenizer": {"kind": "byte"},
            },
            "optimizers": [{"name": name, "sweep": {"lr": SWEEPS[name]}} for name in optimizers],
        }
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def first_reach(record: RunRecord, target: float) -> tuple[float, float]:
    """(step, training seconds) of the first evaluation at or below ``target``; NaN if never."""
    for step, metrics, _ in record.curves.records:
        if "val_loss" in metrics and metrics["val_loss"] <= target:
            return float(step), float(metrics.get("train_time", math.nan))
    return math.nan, math.nan


def _ms(values: list[float], digits: int = 3) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "–"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return f"{statistics.fmean(finite):.{digits}f} ± {std:.{digits}f}"


def report(outcome: JobOutcome, job: JobSpec, command: str, elapsed: float) -> str:
    selected = outcome.selected
    chosen = {group: [r for r in outcome.runs if r.spec.label == label] for group, label in selected.items()}
    finals = {
        g: statistics.fmean(r.result.summary.get("final_val_loss", math.nan) for r in runs)
        for g, runs in chosen.items()
    }
    target = max(v for v in finals.values() if math.isfinite(v))
    names = [TITLE_NAMES[o.name] for o in job.optimizers]
    lines = [
        "# Convergence benchmark: " + " vs ".join(sorted(names, key=lambda n: n != "DyKAF")),
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()} CPU, {platform.python_version()} Python; total wall time "
        f"{elapsed / 60:.1f} min, {torch_threads()} torch thread(s) (2 cores shared with other jobs, so "
        "absolute times are noisy; compare times within one table only).",
        "",
        "Task: byte-level GPT, 2 layers, width 128, 4 heads, context 64, batch 8 sequences, "
        f"{job.task.steps} steps, warmup {job.task.warmup_steps}, cosine to 0.1, clip 1.0; corpus: Python "
        "documentation topics (`pydoc_data`), content-hash 90/10 split; validation on 32 fixed windows "
        f"every {job.task.eval_every} steps. Same batches and initial weights per seed for every optimizer.",
        "",
        f"Tuning: {len(next(iter(SWEEPS.values())))} learning rates per optimizer on seed 0 (equal budget), "
        "best final validation loss "
        "selected, then seeds 1 and 2 at that lr. Other hyperparameters: registry defaults.",
        "",
        "## Learning-rate sweep (seed 0, final validation loss)",
        "",
        "| optimizer | " + " | ".join("lr: loss" for _ in next(iter(SWEEPS.values()))) + " | selected |",
        "|---|" + "---|" * (len(next(iter(SWEEPS.values()))) + 1),
    ]
    for group in selected:
        cells = []
        for record in (r for r in outcome.runs if r.spec.group == group and r.spec.seed == job.seeds[0]):
            value = record.result.summary.get("final_val_loss", math.nan)
            shown = f"{value:.3f}" if record.result.status == "succeeded" else record.result.status
            cells.append(f"{record.spec.sweep_point['lr']:g}: {shown}")
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {selected[group]} |")
    lines += [
        "",
        f"## Selected configurations, 3 seeds (target loss {target:.3f} = worst selected mean final loss)",
        "",
        "| optimizer | final val loss | best val loss | steps to target | train s to target "
        "| step ms | optimizer ms | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(chosen, key=lambda g: finals[g])
    for group in order:
        runs = chosen[group]
        s = [r.result.summary for r in runs]
        reach = [first_reach(r, target) for r in runs]
        reached = sum(math.isfinite(step) for step, _ in reach)
        lines.append(
            f"| {selected[group]} | {_ms([x.get('final_val_loss', math.nan) for x in s])} "
            f"| {_ms([x.get('best_val_loss', math.nan) for x in s])} "
            f"| {_ms([step for step, _ in reach], 0)} ({reached}/{len(runs)}) "
            f"| {_ms([sec for _, sec in reach], 1)} "
            f"| {_ms([x.get('step_time_ms', math.nan) for x in s], 0)} "
            f"| {_ms([x.get('optimizer_ms', math.nan) for x in s], 0)} "
            f"| {max(x.get('peak_memory_mb', math.nan) for x in s):.0f} |"
        )
    statuses = [
        f"{r.spec.run_key}: {r.result.status}" for r in outcome.runs if r.result.status != "succeeded"
    ]
    lines += [
        "",
        "Runs that did not succeed: " + (", ".join(statuses) if statuses else "none") + ".",
        "",
        "Per-step metrics: `steps.csv`, per-run summaries: `runs.csv`, aggregated: `summary.csv`, curves: "
        "`curves.png` in the output directory.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "convergence")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="Markdown report (default: beside --out, named after it: bench/results/convergence.md for "
        "the default --out), so a run elsewhere never overwrites the recorded report",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is far faster on a shared, busy CPU)"
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma-separated, from {', '.join(SWEEPS)} (each gets its 5-point lr grid)",
    )
    args = parser.parse_args(argv)
    optimizers = tuple(name.strip() for name in args.optimizers.split(",") if name.strip())
    unknown = sorted(set(optimizers) - set(SWEEPS))
    if unknown or not optimizers:
        parser.error(f"--optimizers: unknown {unknown or 'empty list'}; choose from {', '.join(SWEEPS)}")
    set_threads(args.threads)
    job = build_job(args.steps, args.device, optimizers)
    started = time.perf_counter()
    outcome = run_job(job, args.out, show_progress=sys.stderr.isatty(), checkpoints=False)
    elapsed = time.perf_counter() - started
    text = report(outcome, job, command_line(argv), elapsed)
    report_path = args.report if args.report is not None else args.out.with_suffix(".md")
    write_text(report_path, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
