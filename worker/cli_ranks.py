"""``dykaf-lab prepare-ranks``: one run across several machines, under torchrun's own rendezvous.

The service places a run on the devices of one machine (``worker.distributed.launch``). A run larger
than a machine is started the way torch starts multi-node jobs: the same ``torchrun`` command on
every machine, meeting at a c10d rendezvous. This command writes the launch folder those ranks read
(on storage every machine mounts: the ranks' checkpoint parts and rank 0's metrics go there too) and
prints the torchrun command line for each machine (docs/cluster.md, "One run across several
machines").
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from worker.cli_common import load_job_file
from worker.distributed.folder import METRICS_FILE, RESULT_FILE, Launch

RDZV_PORT = 29400


def node_command(folder: Path, nodes: int, per_node: int, endpoint: str, run_id: str) -> list[str]:
    """The command every machine runs (torchrun numbers the machines as they join)."""
    return [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        "--max-restarts=0",
        "-m",
        "worker.distributed.rank_main",
        str(folder),
    ]


def prepare_ranks(
    job_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="job spec (YAML or JSON)")],
    out: Annotated[Path, typer.Option(help="launch folder on storage every machine mounts")],
    nodes: Annotated[int, typer.Option(min=1, help="machines the run spans")],
    head: Annotated[str, typer.Option(help="host of the rendezvous (any one of the machines)")],
    run: Annotated[str | None, typer.Option(help="run key, when the job expands to several runs")] = None,
    port: Annotated[int, typer.Option(help="rendezvous port on the head")] = RDZV_PORT,
) -> None:
    """Write the launch folder of one run and print the torchrun command for its machines."""
    job = load_job_file(job_file)
    runs = job.expand()
    if run is None and len(runs) > 1:
        keys = ", ".join(r.run_key for r in runs)
        typer.echo(f"the job expands to {len(runs)} runs; choose one with --run ({keys})", err=True)
        raise typer.Exit(2)
    chosen = [r for r in runs if run is None or r.run_key == run]
    if not chosen:
        typer.echo(f"no run {run!r} in the job; runs: {', '.join(r.run_key for r in runs)}", err=True)
        raise typer.Exit(2)
    spec = chosen[0]
    devices = spec.task.devices_per_run
    if devices % nodes:
        typer.echo(f"task.devices_per_run ({devices}) is not a multiple of --nodes ({nodes})", err=True)
        raise typer.Exit(2)
    folder = out.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    Launch(spec.model_dump(mode="json"), str(folder / "checkpoints"), "files").write(folder)
    command = node_command(folder, nodes, devices // nodes, f"{head}:{port}", f"dykaf-{spec.job_name}")
    console = Console()
    console.print(f"launch folder for {spec.run_key}: {folder}", markup=False)
    console.print(f"on each of the {nodes} machines, from the project root:", markup=False)
    console.print("  " + shlex.join(command), markup=False, soft_wrap=True)
    console.print(
        f"rank 0 writes {folder / METRICS_FILE} and, at the end, {folder / RESULT_FILE}; "
        "run the same command again to resume from the newest checkpoint",
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command("prepare-ranks")(prepare_ranks)
