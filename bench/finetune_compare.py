"""Judged by task scores (accuracy, macro-F1, MCC) rather than loss, how do AdamW, SOAP and DyKAF compare
when fine-tuning on the offline demo classification task (which standard-library module a 6-line source
snippet comes from, 5 classes)?

Protocol (fixed before looking at any result, the same for every optimizer):
- task: ``builtin:tiny-bert`` (2-layer BERT, width 64, byte vocabulary, random init, full fine-tuning)
  on the ``stdlib_module`` demo, context 128, batch 16, cosine schedule with 10 % warm-up, clipping 1.0,
  CPU; validation accuracy, macro-F1 and Matthews correlation at every evaluation;
- tuning: 3 learning rates per optimizer on seed 0 (equal budget), the one with the best final
  validation accuracy is selected, then seeds 1 and 2 run at that point (``sweep_selection: first_seed``);
- every other hyperparameter is the registry default;
- report: final validation accuracy, macro-F1 and MCC (mean ± std over the 3 seeds at the selected lr),
  final validation loss, step time.

Run (writes job.json, metrics.csv, runs.csv, summary.csv and curves.png into --out):
    nice python -m bench.finetune_compare --out bench/results/finetune_compare
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from server.jobs.spec import JobSpec
from worker.local import run_job

SWEEP = [3e-4, 1e-3, 3e-3]
OPTIMIZERS = ("adamw", "soap", "dykaf")


def build_job(steps: int, device: str, examples: int, optimizers: tuple[str, ...] = OPTIMIZERS) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "finetune-compare",
            "device": device,
            "seeds": [0, 1, 2],
            "sweep_selection": "first_seed",
            "task": {
                "kind": "classify",
                "context": 128,
                "batch_size": 16,
                "steps": steps,
                "warmup_steps": max(1, steps // 10),
                "schedule": "cosine",
                "grad_clip": 1.0,
                "eval_every": max(1, steps // 5),
                "log_every": max(1, steps // 20),
                "fisher_every": 0,
                "finetune": {"model": "builtin:tiny-bert"},
                "classify": {"demo": "stdlib_module", "demo_examples": examples, "max_val_examples": 256},
            },
            "optimizers": [{"name": name, "sweep": {"lr": SWEEP}} for name in optimizers],
        }
    )


def _fmt(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    spread = f" ± {std:.{digits}f}" if std is not None and math.isfinite(std) else ""
    return f"{mean:.{digits}f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results/finetune_compare")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--examples", type=int, default=600, help="demo examples (80 %% train)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = parser.parse_args()
    job = build_job(args.steps, args.device, args.examples, tuple(args.optimizers.split(",")))
    began = time.perf_counter()
    outcome = run_job(job, args.out, show_progress=False, checkpoints=False)
    print(f"{job.run_count()} runs in {time.perf_counter() - began:.0f} s; results in {args.out}")
    print("| optimizer (selected lr) | val accuracy | val macro-F1 | val MCC | val loss | step ms |")
    print("|---|---|---|---|---|---|")
    for row in outcome.summary:
        if not row["selected"]:
            continue
        print(
            f"| {row['label']} ({row['seeds']} seeds) "
            f"| {_fmt(row.get('final_val_accuracy_mean'), row.get('final_val_accuracy_std'))} "
            f"| {_fmt(row.get('final_val_f1_mean'), row.get('final_val_f1_std'))} "
            f"| {_fmt(row.get('final_val_mcc_mean'), row.get('final_val_mcc_std'))} "
            f"| {_fmt(row.get('final_val_loss_mean'), row.get('final_val_loss_std'))} "
            f"| {_fmt(row.get('step_time_ms_mean'), None, 1)} |"
        )
    if outcome.winner_text:
        print(f"Winner: {outcome.winner_text}")


if __name__ == "__main__":
    main()
