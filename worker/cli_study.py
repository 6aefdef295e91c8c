"""``dykaf-lab study submit FILE`` and ``dykaf-lab study show ID``: studies through a server.

A study (several scales, every optimizer tuned on the same sweep budget, speed-up over a baseline)
is validated locally first (same schema as the server: ``server.studies.spec``), then submitted; the
server expands it into one job per scale. ``show`` prints the study's report as one table per
scale: each optimizer's winning hyperparameters, final validation loss over seeds, and its token
and time speed-ups over the baseline (``> 4×`` marks a bound: outside the measured range).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.studies.spec import format_study_error, parse_study
from worker.cli_common import read_spec_file
from worker.cli_service import _client, _request, _server

study_app = typer.Typer(help="Studies: several scales, equal-budget tuning, speed-up over AdamW.")
console = Console(stderr=True)
out = Console()

ServerOpt = Annotated[
    str | None, typer.Option("--server", "-s", help="API base URL (default: $DYKAF_SERVER or local)")
]
KeyOpt = Annotated[
    str | None, typer.Option("--key", help="API key (default: $DYKAF_API_KEY or .lab/api_key)")
]


def load_study_file(path: Path) -> Any:
    """Parse a study file into a validated ``StudySpec``; exits 2 with a readable error."""
    return read_spec_file(
        path, parse_study, format_study_error, what="study", needs="'scales' and 'optimizers'"
    )


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _point(point: dict[str, Any] | None) -> str:
    if point is None:
        return "-"
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(point.items()))


def study_tables(report: dict[str, Any]) -> list[Table]:
    """One table per scale: optimizer, winner, final loss mean ± std, token and time speed-ups."""
    tables = []
    for scale in report["scales"]:
        params = f", {scale['parameters'] / 1e6:.2f} M params" if scale.get("parameters") else ""
        title = f"{scale['name']} ({scale.get('status', '?')}{params}) — speed-up over {report['baseline']}"
        table = Table(title=title)
        for column in ("optimizer", "winner", "final val loss", "seeds", "token speed-up", "time speed-up"):
            table.add_column(column)
        for row in scale["optimizers"]:
            loss = _num(row["loss_mean"])
            if row["loss_std"] is not None:
                loss += f" ± {row['loss_std']:.3f}"
            pending = f" (+{row['pending']} pending)" if row["pending"] else ""
            table.add_row(
                escape(row["optimizer"]) + (" (edge)" if row["edges"] else ""),
                escape(_point(row["winner"])),
                loss,
                f"{row['seeds']}{pending}",
                (row["token_speedup"] or {}).get("text", "-"),
                (row["time_speedup"] or {}).get("text", "-"),
            )
        tables.append(table)
    return tables


@study_app.command("submit")
def submit(
    study_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="study spec (YAML or JSON)")
    ],
    server: ServerOpt = None,
    key: KeyOpt = None,
) -> None:
    """Submit a study (validated locally first, then by the server): one job per scale."""
    spec = load_study_file(study_file)
    with _client(server, key) as client:
        study = _request(client, "POST", "/studies", json=spec.model_dump(mode="json")).json()
    jobs = ", ".join(f"{j['scale']}: job {j['id']}" for j in study["jobs"])
    out.print(
        f"study {study['id']} ({study['name']}): {spec.run_count()} runs planned ({jobs})", markup=False
    )
    for warning in study.get("warnings", []):
        console.print(f"[yellow]{escape(warning)}[/yellow]")
    out.print(f"  {_server(server)}/studies/{study['id']}", markup=False)


@study_app.command("show")
def show(
    study_id: Annotated[int, typer.Argument(min=1, help="study id")],
    server: ServerOpt = None,
    key: KeyOpt = None,
) -> None:
    """The study's summary: per scale, each optimizer's winner, loss and speed-ups over the baseline."""
    with _client(server, key) as client:
        study = _request(client, "GET", f"/studies/{study_id}").json()
    out.print(f"study {study['id']} ({study['name']}): {study['status']}", markup=False)
    for table in study_tables(study["report"]):
        out.print(table)
    for warning in study.get("warnings", []):
        console.print(f"[yellow]{escape(warning)}[/yellow]")


def register(app: typer.Typer) -> None:
    """Add ``dykaf-lab study …`` to the command line (called at the end of worker/cli.py)."""
    app.add_typer(study_app, name="study")
