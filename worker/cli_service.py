"""Service commands of ``dykaf-lab``: the embedded stack, API and worker processes, and a client.

* ``up``        — embedded mode: migrate SQLite under ``DYKAF_DATA_DIR`` (default ``./.lab``), start
                  uvicorn and one Celery worker (SQLAlchemy transport on its own SQLite file, solo
                  pool), create a local API key in ``.lab/api_key``, submit ``examples/quick.yaml``
                  once, print the dashboard URL; Ctrl-C stops everything.
* ``api``       — the API server alone (cluster mode: set DYKAF_DATABASE_URL / DYKAF_BROKER_URL).
* ``worker``    — one Celery worker process (one per GPU: ``--gpu 0``; one per machine: ``--gpus all``;
                  CPU: ``--queue cpu --cpus N``).
* ``migrate``   — apply Alembic migrations to DYKAF_DATABASE_URL.
* ``keys``      — create / list / revoke API keys (direct DB access).
* ``submit``, ``status``, ``watch``, ``cancel``, ``download`` — HTTP client for any server URL
  (``--server`` or DYKAF_SERVER; the key from ``--key``, DYKAF_API_KEY or ``.lab/api_key``).

Nothing here imports torch or the Celery app at import time (the local runner behind the printed
summary loads inside its command): ``dykaf-lab worker`` replaces itself
with the ``celery worker`` process after setting ``CUDA_VISIBLE_DEVICES``, so CUDA is never
initialised in a parent that forks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from server.core.config import HTTP_KEEP_ALIVE_S, Settings
from server.crud.api_keys import create_key, list_keys, revoke_key, verify_token
from server.db import migrate as m
from server.db.session import session_scope
from server.jobs.queues import consumed_queues
from server.jobs.status import TERMINAL, RunStatus
from worker.cli_common import load_job_file, summary_table
from worker.worker_plan import celery_worker_argv, plan_worker

console = Console(stderr=True)
out = Console()

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVER = "http://127.0.0.1:8000"
EXAMPLE = ROOT / "examples" / "quick.yaml"

ServerOpt = Annotated[
    str | None, typer.Option("--server", "-s", help="API base URL (default: $DYKAF_SERVER or local)")
]
KeyOpt = Annotated[
    str | None, typer.Option("--key", help="API key (default: $DYKAF_API_KEY or .lab/api_key)")
]


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(**{k: v for k, v in overrides.items() if v is not None})


# --- client helpers ------------------------------------------------------------------------------
def _server(server: str | None) -> str:
    return (server or os.environ.get("DYKAF_SERVER") or DEFAULT_SERVER).rstrip("/")


def _key(key: str | None) -> str | None:
    if key:
        return key
    if os.environ.get("DYKAF_API_KEY"):
        return os.environ["DYKAF_API_KEY"]
    path = _settings().data_dir / "api_key"
    return path.read_text().strip() if path.exists() else None


def _client(server: str | None, key: str | None, timeout: float = 30.0) -> Any:
    import httpx

    headers = {}
    token = _key(key)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=f"{_server(server)}/api/v1", headers=headers, timeout=timeout)


def _fail(response: Any) -> None:
    """Print the API's error list (loc: msg) and exit non-zero."""
    try:
        detail = response.json().get("detail")
    except Exception:
        detail = response.text
    console.print(f"[red]HTTP {response.status_code}[/red]")
    if isinstance(detail, list):
        for item in detail:
            loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
            console.print(f"  {loc or '(request)'}: {item.get('msg')}", markup=False, highlight=False)
    else:
        console.print(str(detail), markup=False)
    raise typer.Exit(1)


def _request(client: Any, method: str, path: str, **kwargs: Any) -> Any:
    import httpx

    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        console.print(f"[red]{escape(f'cannot reach {client.base_url}: {exc}')}[/red]")
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        _fail(response)
    return response


# --- client commands -----------------------------------------------------------------------------
def submit(
    job_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="job spec (YAML or JSON)")],
    server: ServerOpt = None,
    key: KeyOpt = None,
    watch_: Annotated[bool, typer.Option("--watch", help="follow progress until the job ends")] = False,
) -> None:
    """Submit a job to a server (validated locally first, then by the server)."""
    spec = load_job_file(job_file)
    with _client(server, key) as client:
        job = _request(client, "POST", "/jobs", json=spec.model_dump(mode="json")).json()
    out.print(f"job {job['id']} ({job['name']}): {len(job['runs'])} runs queued", markup=False)
    for warning in job.get("warnings", []):
        console.print(f"[yellow]{escape(warning)}[/yellow]")
    out.print(f"  {_server(server)}/api/v1/jobs/{job['id']}")
    if watch_:
        watch(job["id"], server=server, key=key)


def status(
    job_id: Annotated[int | None, typer.Argument(help="a job id; omit to list recent jobs")] = None,
    server: ServerOpt = None,
    key: KeyOpt = None,
    limit: Annotated[int, typer.Option(help="jobs to list")] = 20,
) -> None:
    """List jobs, or show one job's runs."""
    from rich.table import Table

    with _client(server, key) as client:
        if job_id is None:
            page = _request(client, "GET", "/jobs", params={"limit": limit}).json()
            table = Table(title="jobs")
            for col in ("id", "name", "status", "progress", "runs", "best", "created", "reason"):
                table.add_column(col)
            for job in page["items"]:
                prog = job["progress"]
                runs = ", ".join(f"{k} {v}" for k, v in sorted(prog["runs"].items()))
                winner = job.get("winner")
                table.add_row(
                    str(job["id"]),
                    escape(job["name"]),
                    job["status"],
                    progress_text(prog, job["status"]),
                    runs,
                    escape(winner["label"]) if winner else "-",
                    job["created_at"][:19],
                    escape(job["reason"] or ""),
                )
            out.print(table)
            return
        job = _request(client, "GET", f"/jobs/{job_id}").json()
    reason = f" ({job['reason']})" if job["reason"] else ""
    how_far = progress_text(job["progress"], job["status"])
    table = Table(title=escape(f"job {job['id']} {job['name']}: {job['status']}, {how_far}{reason}"))
    for col in ("run", "label", "seed", "status", "step", "attempt", "device", "final val loss", "reason"):
        table.add_column(col)
    for run in job["runs"]:
        final = (run.get("summary") or {}).get("final_val_loss")
        table.add_row(
            str(run["id"]),
            escape(run["label"]),
            str(run["seed"]),
            run["status"],
            f"{run['step']}/{run['total_steps']}",
            str(run["attempt"]),
            run["device"] or "",
            "-" if final is None else f"{final:.4f}",
            escape(run["reason"] or ""),
        )
    out.print(table)


def progress_text(progress: dict[str, Any], status: str) -> str:
    """``"23% (1,141/5,000 steps)"``: steps actually trained, so a job that ended early says how far
    it got (``stopped at`` once it has ended)."""
    done, total = progress["steps_done"], progress["steps_total"]
    text = f"{100 * progress['fraction']:.0f}% ({done:,}/{total:,} steps)"
    return f"stopped at {text}" if status in TERMINAL and done < total else text


def watch(
    job_id: Annotated[int, typer.Argument(help="job id")],
    server: ServerOpt = None,
    key: KeyOpt = None,
    interval: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
) -> None:
    """Progress bars for every run of a job until it ends, then its summary and Fisher verdict."""
    with _client(server, key) as client:
        job = _follow(client, job_id, interval)
        _print_results(client, job)
    reason = f" ({job['reason']})" if job["reason"] else ""
    out.print(f"job {job_id}: {job['status']}{reason}", markup=False)
    if job["status"] != RunStatus.SUCCEEDED:
        raise typer.Exit(1)


def _follow(client: Any, job_id: int, interval: float) -> dict[str, Any]:
    """Poll the job, one progress bar per run, until it ends; returns its last state."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeElapsedColumn())
    with Progress(TextColumn("{task.description}"), *columns, console=console) as progress:
        bars: dict[int, Any] = {}
        while True:
            job = _request(client, "GET", f"/jobs/{job_id}").json()
            for run in job["runs"]:
                if run["id"] not in bars:
                    name = escape(f"{run['label']} s{run['seed']}")
                    bars[run["id"]] = progress.add_task(name, total=run["total_steps"], status=run["status"])
                progress.update(bars[run["id"]], completed=run["step"], status=run["status"])
            if job["status"] in TERMINAL:
                return job
            time.sleep(interval)


def _print_results(client: Any, job: dict[str, Any]) -> None:
    """What ``dykaf-lab run`` prints at the end, as the server computed it (``GET /jobs/{id}/summary``,
    ``server.summary``): the summary table, the Fisher verdict line and the winner."""

    result = _request(client, "GET", f"/jobs/{job['id']}/summary").json()
    rows = [row for row in result["rows"] if row["seeds"] > row["pending"]]
    if not rows:
        return
    out.print(
        summary_table(rows, result.get("target_metric") is not None or result["target_loss"] is not None)
    )
    verdict = (result.get("fisher") or {}).get("verdict")
    if verdict:
        out.print(f"Fisher fidelity: {verdict}", markup=False)
    if result.get("winner_text"):
        out.print(f"Winner: {result['winner_text']}", markup=False, soft_wrap=True)


def cancel(
    job_id: Annotated[int, typer.Argument(help="job id")], server: ServerOpt = None, key: KeyOpt = None
) -> None:
    """Cancel a job: queued runs never start, running ones stop within seconds (data kept)."""
    with _client(server, key) as client:
        response = _request_allowing(client, 409, "POST", f"/jobs/{job_id}/cancel")
    if response.status_code == 409:  # already ended: the server changed nothing
        out.print(f"job {job_id}: {response.json()['detail'][0]['msg']}", markup=False)
        return
    out.print(f"job {job_id}: {response.json()['status']} (cancel requested)")


def _request_allowing(client: Any, allowed: int, method: str, path: str) -> Any:
    """``_request``, but a response with status ``allowed`` is returned instead of failing."""
    import httpx

    try:
        response = client.request(method, path)
    except httpx.HTTPError as exc:
        console.print(f"[red]{escape(f'cannot reach {client.base_url}: {exc}')}[/red]")
        raise typer.Exit(1) from None
    if response.status_code >= 400 and response.status_code != allowed:
        _fail(response)
    return response


def download(
    job_id: Annotated[int, typer.Argument(help="job id")],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="directory for the CSV files (default: job-<id>)")
    ] = None,
    server: ServerOpt = None,
    key: KeyOpt = None,
) -> None:
    """Download metrics.csv, runs.csv, summary.csv and fisher.csv (the files ``dykaf-lab run`` writes,
    same columns; full fidelity, streamed to disk)."""
    out_dir = out_dir or Path(f"job-{job_id}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _client(server, key, timeout=300) as client:
        for kind in ("metrics", "runs", "summary", "fisher"):
            target = out_dir / f"{kind}.csv"
            with client.stream("GET", f"/jobs/{job_id}/{kind}.csv") as response:
                if response.status_code >= 400:
                    response.read()
                    _fail(response)
                with open(target, "wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
            out.print(f"  {target}")


# --- database and keys ---------------------------------------------------------------------------
def migrate(
    revision: Annotated[str, typer.Option(help="target revision")] = "head",
    downgrade: Annotated[bool, typer.Option(help="downgrade to --revision (e.g. base) instead")] = False,
) -> None:
    """Apply the Alembic migrations to DYKAF_DATABASE_URL (default: the embedded SQLite file)."""
    settings = _settings()
    if downgrade:
        m.downgrade(settings.database_url, revision)
    else:
        m.upgrade(settings.database_url, revision)
    console.print(f"database at revision {m.current_revision(settings.database_url)}")


keys_app = typer.Typer(help="API keys (stored hashed; the token is shown once).", no_args_is_help=True)


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option(help="who or what the key is for")] = "cli") -> None:
    """Create a key and print its token."""
    with session_scope(_settings().database_url) as session:
        row, token = create_key(session, name)
        key_id = row.id
    console.print(f"key {key_id} ({name}) created; store the token now, it is not shown again:")
    out.print(token)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (id, prefix, name, created, last used, revoked)."""
    with session_scope(_settings().database_url) as session:
        for row in list_keys(session):
            revoked = f" revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else ""
            used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never used"
            out.print(
                f"{row.id}\t{row.prefix}…\t{row.name}\t{row.created_at:%Y-%m-%d %H:%M}\t{used}{revoked}"
            )


@keys_app.command("revoke")
def keys_revoke(ident: Annotated[str, typer.Argument(help="key id, prefix or full token")]) -> None:
    """Revoke a key; requests using it get 401 from then on."""
    with session_scope(_settings().database_url) as session:
        count = revoke_key(session, ident)
    if not count:
        console.print(f"[red]no active key matches {ident!r}[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {count} key(s)")


# --- processes -----------------------------------------------------------------------------------
# Niceness of the worker that `up` starts beside the API on the same machine. CPU training takes
# every core it gets; at equal priority the dashboard's requests queue behind it, while a niced
# worker still trains at full speed on the CPU left over (read latencies of both: BENCHMARKS.md,
# "Mixed load").
EMBEDDED_WORKER_NICE = 10
# CPU ranks the embedded worker offers unless DYKAF_WORKER_CPU_RANKS says otherwise: a job with
# `devices_per_run: 2` runs out of the box (two Gloo processes), still one run at a time.
EMBEDDED_CPU_RANKS = 2


def embedded_worker(settings: Settings) -> tuple[Settings, list[str]]:
    """The embedded worker's settings and queues: both device families (``auto`` runs go to the
    ``gpu`` family and train on the CPU of a machine without a GPU) and their sized queues up to
    its CPU ranks (``gpu,cpu,gpu-x2,cpu-x2`` by default)."""
    if not os.environ.get("DYKAF_WORKER_CPU_RANKS"):
        settings = settings.with_(worker_cpu_ranks=EMBEDDED_CPU_RANKS)
    return settings, consumed_queues(["gpu", "cpu"], settings.worker_cpu_ranks)


def uvicorn_argv(host: str, port: int, *, workers: int = 1, access_log: bool = True) -> list[str]:
    """The API server command line (``up``, the benchmarks and the tests all start this one),
    with the keep-alive above the clients' (``HTTP_KEEP_ALIVE_S``)."""
    argv = [sys.executable, "-m", "uvicorn", "--factory", "server.main:create_app"]
    argv += ["--host", host, "--port", str(port), "--workers", str(workers)]
    argv += ["--timeout-keep-alive", str(HTTP_KEEP_ALIVE_S), "--log-level", "warning"]
    return argv if access_log else [*argv, "--no-access-log"]


def worker(
    queue: Annotated[
        str | None,
        typer.Option(help="base queue(s): gpu, cpu or gpu,cpu (default: cpu with --cpus, else gpu)"),
    ] = None,
    gpu: Annotated[
        int | None, typer.Option(help="the one GPU this worker owns (sets CUDA_VISIBLE_DEVICES); = --gpus N")
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="GPUs this worker owns: 0-7, 0,2,5 or all (nvidia-smi -L); several GPUs make a node worker "
            "that runs one run per free GPU and runs on up to all of them"
        ),
    ] = None,
    cpus: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="CPU ranks (Gloo processes) offered to runs on several devices"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="worker node name")] = None,
    loglevel: Annotated[str, typer.Option(help="log level")] = "INFO",
    nice: Annotated[
        int,
        typer.Option(
            min=0, max=19, help="lower the worker's CPU priority (use when it shares a machine with the API)"
        ),
    ] = 0,
) -> None:
    """Run one Celery worker process (one per GPU, or one per machine with --gpus); replaces this
    process with ``celery worker`` (queues, pool and devices: ``worker.worker_plan``)."""
    try:
        plan = plan_worker(queue=queue, gpu=gpu, gpus=gpus, cpus=cpus, name=name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if nice:
        os.nice(nice)  # inherited by the exec'd worker
    env = plan.env
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    argv = plan.argv(loglevel)
    os.execvpe(argv[0], argv, env)


def api(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    migrate_first: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="apply migrations first")
    ] = False,
) -> None:
    """Run the API server (uvicorn) against DYKAF_DATABASE_URL and DYKAF_BROKER_URL."""
    import uvicorn

    if migrate_first:
        m.upgrade(_settings().database_url)
    uvicorn.run(
        "server.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        timeout_keep_alive=HTTP_KEEP_ALIVE_S,
    )


def _corpus_roots() -> str:
    """Where jobs may read local files (``server.jobs.paths``): ``DYKAF_DATA_ROOTS``, else ``./data``,
    which ``up`` creates so that it is there to copy files into."""
    if os.environ.get("DYKAF_DATA_ROOTS"):
        return os.environ["DYKAF_DATA_ROOTS"] + "  (DYKAF_DATA_ROOTS)"
    default = ROOT / "data"
    default.mkdir(exist_ok=True)
    return f"{default}  (set DYKAF_DATA_ROOTS to change)"


def _ensure_local_key(settings: Any) -> str:
    """The key in ``data_dir/api_key`` if it is still valid, else a new one written there (0600)."""
    path = settings.data_dir / "api_key"
    with session_scope(settings.database_url) as session:
        if path.exists():
            token = path.read_text().strip()
            if verify_token(session, token) is not None:
                return token
        _, token = create_key(session, "local (dykaf-lab up)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def _wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API process exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"the API did not become ready at {base} within {timeout:.0f}s")


def _submit_example(base: str, token: str, example: Path) -> int | None:
    import httpx
    import yaml

    spec = yaml.safe_load(example.read_text())
    headers = {"Authorization": f"Bearer {token}"}
    found = httpx.get(
        f"{base}/api/v1/jobs", params={"name": spec["name"], "limit": 1}, headers=headers, timeout=30
    )
    found.raise_for_status()
    if found.json()["items"]:
        job = found.json()["items"][0]
        console.print(f"example job {spec['name']!r} exists (job {job['id']}, {job['status']})")
        return int(job["id"])
    response = httpx.post(f"{base}/api/v1/jobs", json=spec, headers=headers, timeout=60)
    if response.status_code >= 400:
        console.print(f"[yellow]example job not submitted: {response.status_code} {response.text}[/yellow]")
        return None
    console.print(f"submitted example job {spec['name']!r} (job {response.json()['id']})")
    return int(response.json()["id"])


class ExampleReporter:
    """What ``up`` shows of the example job after the dashboard URL: a progress bar while it runs,
    then one line with its outcome, the winner and where the results are. Polled from ``up``'s
    supervision loop; a failed poll is skipped (the API may be busy), never fatal."""

    POLL_S = 2.0

    def __init__(self, base: str, token: str, job_id: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.base, self.job_id = base, job_id
        self.headers = {"Authorization": f"Bearer {token}"}
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[text]}"),
            TimeElapsedColumn(),
            console=out,
        )
        self.task: Any = None
        self.next_poll = 0.0
        self.done = False

    def poll(self) -> None:
        import httpx

        if self.done or time.monotonic() < self.next_poll:
            return
        self.next_poll = time.monotonic() + self.POLL_S
        try:
            job = httpx.get(f"{self.base}/api/v1/jobs/{self.job_id}", headers=self.headers, timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return
        prog = job["progress"]
        if self.task is None:
            self.progress.start()
            name = f"example job {self.job_id}"
            self.task = self.progress.add_task(name, total=prog["steps_total"], text="")
        text = f"{progress_text(prog, job['status'])} · {job['status']}"
        self.progress.update(self.task, total=prog["steps_total"], completed=prog["steps_done"], text=text)
        if job["status"] in TERMINAL:
            self.finish(job)

    def finish(self, job: dict[str, Any]) -> None:
        import httpx

        self.progress.stop()
        self.done = True
        try:
            summary = httpx.get(
                f"{self.base}/api/v1/jobs/{self.job_id}/summary", headers=self.headers, timeout=30
            ).json()
        except (httpx.HTTPError, ValueError):
            summary = {}
        winner = summary.get("winner_text") or "none (see the summary)"
        out.print(
            f"example job {self.job_id}: {job['status']}; winner {winner}; results "
            f"{self.base}/jobs/{self.job_id} (CSV: dykaf-lab download {self.job_id})",
            markup=False,
            soft_wrap=True,
        )

    def stop(self) -> None:
        if self.task is not None and not self.done:
            self.progress.stop()


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM every child (the worker checkpoints and requeues its run), then SIGKILL stragglers."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def up(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    data_dir: Annotated[
        Path | None, typer.Option(help="state directory (default: $DYKAF_DATA_DIR or ./.lab)")
    ] = None,
    example: Annotated[Path | None, typer.Option(help="job submitted on first start")] = None,
    no_example: Annotated[bool, typer.Option("--no-example", help="do not submit the example job")] = False,
) -> None:
    """Embedded mode: SQLite + SQLAlchemy broker + API + one worker, started and stopped together."""
    settings, worker_queues = embedded_worker(_settings(data_dir=data_dir))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    m.upgrade(settings.database_url)
    token = _ensure_local_key(settings)
    env = {**os.environ, **settings.env()}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    base = f"http://{host}:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    handles = [open(logs / "api.log", "ab"), open(logs / "worker.log", "ab")]  # noqa: SIM115
    interrupted = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    # SIGINT too, explicitly: a process started in the background by a non-interactive shell inherits
    # SIGINT as ignored, and Python then installs no handler, so Ctrl-C (or `kill -INT`) would do nothing.
    previous_int = signal.signal(signal.SIGINT, on_signal)
    reporter: ExampleReporter | None = None
    try:
        procs.append(
            subprocess.Popen(
                uvicorn_argv(host, port),
                env=env,
                stdout=handles[0],
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )
        )
        procs.append(
            subprocess.Popen(
                celery_worker_argv(",".join(worker_queues), "embedded@%h", "INFO"),
                env=env,
                stdout=handles[1],
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
                preexec_fn=lambda: os.nice(EMBEDDED_WORKER_NICE),  # `up` starts no threads before this
            )
        )
        _wait_ready(base, procs[0])
        chosen = example or EXAMPLE
        example_id = _submit_example(base, token, chosen) if not no_example and chosen.exists() else None
        out.print(f"dykaf-lab is up: dashboard {base}/  (API docs {base}/docs)")
        out.print(f"  data: {settings.data_dir.resolve()}  logs: {logs.resolve()}")
        out.print(f"  corpora and models for jobs: {_corpus_roots()}")
        out.print(f"  API key for the CLI: {settings.data_dir / 'api_key'}")
        out.print("  Ctrl-C stops everything")
        reporter = ExampleReporter(base, token, example_id) if example_id is not None else None
        while True:
            for proc, what in zip(procs, ("API", "worker"), strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"the {what} process exited with code {proc.returncode}; see {logs}")
            if reporter is not None:
                reporter.poll()
            time.sleep(0.5)
    except KeyboardInterrupt:
        if reporter is not None:
            reporter.stop()
        console.print("stopping…")
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/red]")
        _stop(procs)
        raise typer.Exit(1) from None
    finally:
        _stop(procs)
        for handle in handles:
            handle.close()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    console.print("stopped")


def register(app: typer.Typer) -> None:
    """Add the service commands to the ``dykaf-lab`` Typer app (called at the end of worker/cli.py)."""
    app.command()(up)
    app.command()(api)
    app.command()(worker)
    app.command()(migrate)
    app.command()(submit)
    app.command()(status)
    app.command()(watch)
    app.command()(cancel)
    app.command()(download)
    app.add_typer(keys_app, name="keys")
