"""Study benchmark: is each optimizer's speed-up over a well-tuned AdamW still there at a larger scale?

Runs a whole study (``server.studies``) on this machine, without the service: per scale, the job's
sweep on the first seed and its winners on every seed (``worker.local.run_job``, the
``first_seed`` rule the service uses), then AdamW's winner at 2× and 4× the steps on every seed,
and reports the study's tables (token and wall-clock speed-up over AdamW, bounds outside the
measured range) exactly as ``GET /api/v1/studies/{id}`` computes them.

Protocol (fixed before looking at any result): byte-level GPTs on the Python documentation topics
(embedded corpus), cosine schedule with warm-up, clipping at 1.0; three learning rates per
optimizer (equal budget, ``SWEEPS``), every other
hyperparameter the registry default; seeds 0 and 1.

Run:
    nice python -m bench.study --out bench/results/study
or any study file (the schema of ``dykaf-lab study submit``):
    nice python -m bench.study --study my-study.yaml
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import ROOT, command_line, markdown_table, set_threads, write_text
from server.studies.report import CSV_COLUMNS, RunRecord, csv_rows, study_report, tokens_of
from server.studies.spec import StudySpec, budget_run_specs, parse_study

# Four points per optimizer (equal budget). A first run with three points per grid had every
# contender's winner on an edge of its grid (SOAP and DyKAF at the largest lr, Muon at the smallest);
# these grids extend them by one point in that direction (BENCHMARKS.md, "Scale study").
SWEEPS: dict[str, list[float]] = {
    "adamw": [1e-3, 3e-3, 1e-2, 3e-2],
    "soap": [1e-3, 3e-3, 1e-2, 3e-2],
    "dykaf": [1e-3, 3e-3, 1e-2, 3e-2],
    "muon": [0.002, 0.005, 0.01, 0.02],
}
SCALES = {
    "d64x2": {"n_layer": 2, "n_head": 4, "d_model": 64},
    "d128x4": {"n_layer": 4, "n_head": 4, "d_model": 128},
}


def default_study(steps: int, optimizers: list[str], scales: list[str]) -> StudySpec:
    return parse_study(
        {
            "name": "cpu-study",
            "device": "cpu",
            "task": {
                "kind": "pretrain",
                "context": 64,
                "batch_size": 8,
                "steps": steps,
                "warmup_steps": max(1, steps // 10),
                "eval_every": max(1, steps // 5),
                "eval_batches": 4,
                "log_every": max(1, steps // 20),
                "fisher_every": 0,
                "corpus": {"name": "pydoc"},
            },
            "scales": [{"name": name, "task": SCALES[name]} for name in scales],
            "optimizers": [{"name": name, "sweep": {"lr": SWEEPS[name]}} for name in optimizers],
            "seeds": [0, 1],
            "budgets": [2, 4],
        }
    )


def record(spec: Any, result: Any) -> RunRecord:
    return RunRecord(
        group=spec.group,
        sweep_point=spec.sweep_point,
        seed=spec.seed,
        status=result.status,
        tokens=tokens_of(spec.task.model_dump()),
        summary=result.summary,
    )


def run_scale(study: StudySpec, index: int, out: Path, quiet: bool) -> list[RunRecord]:
    """The scale's job (sweep, then winners on every seed), then the baseline's budget runs."""
    from rich.progress import Progress

    from worker.local import run_job
    from worker.training.runner import execute_run
    from worker.training.sinks import MemorySink

    job = study.job_spec(index)
    outcome = run_job(job, out, device="cpu", show_progress=not quiet, checkpoints=False)
    records = [record(r.spec, r.result) for r in outcome.runs]
    label = outcome.selected[study.baseline]
    point = next(r.spec.sweep_point for r in outcome.runs if r.spec.label == label)
    budget_runs = budget_run_specs(job, study.baseline, point, study.budgets)
    with Progress(disable=quiet) as progress:
        for spec in progress.track(budget_runs, description=f"{study.baseline} at larger budgets"):
            records.append(record(spec, execute_run(spec, MemorySink(), device="cpu")))
    return records


def markdown(study: StudySpec, report: dict[str, Any], seconds: float, threads: int) -> str:

    lines = [
        f"Command: `{command_line()}` ({threads} torch thread(s), {seconds / 60:.1f} min wall-clock).",
        "",
    ]
    for scale in report["scales"]:
        params = f"{scale['parameters'] / 1e6:.2f} M parameters" if scale["parameters"] else ""
        curve = ", ".join(
            f"{p['multiplier']:g}× {p['loss_mean']:.4f}" for p in scale["baseline_curve"] if p["loss_mean"]
        )
        lines.append(
            f"**{scale['name']}** ({params}, {scale['tokens']:.0f} tokens at 1×; {study.baseline}: {curve})"
        )
        lines.append("")
        rows = []
        for row in scale["optimizers"]:
            winner = ", ".join(f"{k}={v:g}" for k, v in sorted((row["winner"] or {}).items()))
            loss = "-" if row["loss_mean"] is None else f"{row['loss_mean']:.4f} ± {row['loss_std'] or 0:.4f}"
            rows.append(
                [
                    row["optimizer"] + (" (edge)" if row["edges"] else ""),
                    winner,
                    loss,
                    (row["token_speedup"] or {}).get("text", "-"),
                    (row["time_speedup"] or {}).get("text", "-"),
                ]
            )
        header = ["optimizer", "winner", "final val loss", "token speed-up", "time speed-up"]
        lines += [markdown_table(header, rows), ""]
    lines += [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", type=Path, help="a study file (YAML/JSON); default: the protocol above")
    parser.add_argument("--steps", type=int, default=150, help="steps at 1x (default study)")
    parser.add_argument("--optimizers", default="adamw,soap,muon,dykaf")
    parser.add_argument("--scales", default=",".join(SCALES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "study")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    if args.study:
        import yaml

        study = parse_study(yaml.safe_load(args.study.read_text(encoding="utf-8")))
    else:
        study = default_study(args.steps, args.optimizers.split(","), args.scales.split(","))
    started = time.monotonic()
    runs = [run_scale(study, i, args.out / scale.name, args.quiet) for i, scale in enumerate(study.scales)]
    seconds = time.monotonic() - started
    report = study_report(study, runs)
    write_text(args.out / "report.json", json.dumps(report, indent=2, default=str))
    with (args.out / "study.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_rows(report))
    text = markdown(study, report, seconds, threads)
    write_text(args.out / "study.md", text)
    print(text)


if __name__ == "__main__":
    main()
