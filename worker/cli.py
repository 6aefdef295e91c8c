"""The ``dykaf-lab`` command line (Typer).

``dykaf-lab run JOB.yaml`` runs a whole comparison on this machine and writes CSVs and plots.
Service commands (embedded server, worker, …) live in ``worker/cli_service.py`` and are registered
at the end of this file; what both modules use (reading a job file, the summary table) is in
``worker/cli_common.py``.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from server.jobs.status import RunStatus
from worker import cli_ranks, cli_service, cli_study
from worker.cli_common import load_job_file, summary_table
from worker.lm import cli_data

__all__ = ["app", "load_job_file", "summary_table"]


app = typer.Typer(
    name="dykaf-lab",
    help="Compare DyKAF with AdamW, SOAP, Shampoo, Muon and others on language-model tasks.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """dykaf-lab: optimizer comparisons on language-model tasks."""


class DeviceChoice(enum.StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def run(
    job_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="job spec (YAML or JSON)")],
    out: Annotated[Path | None, typer.Option(help="output directory (default: runs/<job name>)")] = None,
    device: Annotated[DeviceChoice | None, typer.Option(help="override the job's device")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch CPU threads (1 is often fastest on a busy machine)")
    ] = None,
) -> None:
    """Run a comparison job locally: optimizers × sweep points × seeds, then CSVs and plots."""
    # torch and the training code load only for this command: the other commands start fast.
    import torch

    from worker.local import run_job, safe_name

    if threads is not None:
        torch.set_num_threads(threads)

    job = load_job_file(job_file)
    out_dir = out or Path("runs") / safe_name(job.name)
    console = Console(stderr=True)
    console.print(f"[bold]{job.name}[/bold]: {job.run_count()} runs → {out_dir}")
    outcome = run_job(
        job, out_dir, device=device.value if device else None, show_progress=not quiet, console=console
    )
    Console().print(summary_table(outcome.summary, job.target is not None))
    if outcome.fisher_verdict:
        Console().print(f"Fisher fidelity: {outcome.fisher_verdict}", markup=False)
    if outcome.winner_text:
        Console().print(f"Winner: {outcome.winner_text}", markup=False, soft_wrap=True)
    for name, path in outcome.files.items():
        console.print(f"  {name}: {path}")
    bad = [r for r in outcome.runs if r.result.status != RunStatus.SUCCEEDED]
    for record in bad:
        line = f"{record.spec.run_key}: {record.result.status}: {record.result.reason}"
        console.print(f"[yellow]{escape(line)}[/yellow]")
    if bad and len(bad) == len(outcome.runs):
        raise typer.Exit(1)


cli_service.register(app)
cli_data.register(app)  # prepare-data, presets
cli_study.register(app)
cli_ranks.register(app)  # prepare-ranks
