"""Service benchmark: metric ingestion into PostgreSQL, API latency under load, CSV streaming memory.

    python -m bench.service                                  # all phases, prints a markdown report
    python -m bench.service --out bench/results/service.md   # and writes it
    python -m bench.service --phases ingest,csv --points 1000000 --duration 30 --clients 50

Needs PostgreSQL (``--pg-url``, an admin URL; a temporary database is created and dropped) and
Redis (``--redis-url``; keys under a random prefix, deleted afterwards).

Phases
* ``ingest`` — points/s into ``metrics`` (a) through the worker's ``DatabaseSink`` (buffer,
  one ``INSERT … SELECT unnest(…) ON CONFLICT DO NOTHING`` per flush of 10k points), exactly as a
  training run writes, (b) the raw batched insert, (c) one INSERT round trip per point, for scale.
* ``api`` — a real API server (uvicorn, ``--api-workers`` processes, PostgreSQL + Redis) and
  ``--clients`` concurrent HTTP clients for ``--duration`` seconds per endpoint: job submission
  (validation, 2 runs written, 2 tasks published to Redis) and the downsampled metrics read of a
  finished job holding ``--points`` points (4 runs × 5 metrics), with the read cache off (every
  request aggregates the million rows in PostgreSQL) and on. p50/p99 latency, throughput, errors.
* ``csv`` — the resident memory of a single-process API server while a client streams
  ``metrics.csv`` of a 100k-point and of a ``--points`` job (the peak must not grow with rows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from sqlalchemy import func, select, text, update

from bench._common import ROOT, free_port, write_text
from server.core.config import Settings
from server.crud import jobs as jobs_crud
from server.crud.api_keys import create_key
from server.crud.metrics import insert_metrics
from server.crud.rollups import build_rollups
from server.db import migrate
from server.db.models import MetricPoint, Run
from server.db.session import dispose_engines, get_engine, session_scope
from server.jobs.spec import JobSpec
from worker.cli_service import uvicorn_argv
from worker.execute import DatabaseSink

TINY = {
    "name": "bench-submit",
    "device": "cpu",
    "seeds": [0],
    "task": {
        "n_layer": 1,
        "n_head": 2,
        "d_model": 16,
        "context": 16,
        "batch_size": 4,
        "steps": 50,
        "warmup_steps": 5,
        "corpus": {"name": "pydoc"},
    },
    "optimizers": [
        {"name": "adamw", "hyperparameters": {"lr": 0.003}},
        {"name": "dykaf", "hyperparameters": {"lr": 0.003}},
    ],
}
METRICS = ("train_loss", "lr", "grad_norm", "step_time", "val_loss")
# uvicorn's supervisor replaces a worker that misses its health check (default 5 s); with 50
# clients saturating 2 shared cores a busy worker can miss it, which shows up as dropped requests.
HEALTHCHECK_S = 60


# --- environment ---------------------------------------------------------------------------------
class Postgres:
    def __init__(self, admin_url: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        self.admin = admin_url
        self.name = f"dykaf_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
            self.version = conn.execute("SHOW server_version").fetchone()[0]
        self.url = (
            make_url(admin_url)
            .set(drivername="postgresql+psycopg", database=self.name)
            .render_as_string(hide_password=False)
        )

    def drop(self) -> None:
        import psycopg

        dispose_engines()
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def make_job(settings: Settings, name: str, seeds: list[int]) -> tuple[int, list[int]]:
    spec = JobSpec.model_validate({**TINY, "name": name, "seeds": seeds})
    with session_scope(settings.database_url) as session:
        job = jobs_crud.create_job(session, spec, auto_queue="cpu")
        return job.id, [run.id for run in job.runs]


def fill(settings: Settings, run_ids: list[int], points: int, batch: int = 50_000) -> None:
    """``points`` metric rows spread over the runs and METRICS, written in big batches."""
    per_series = points // (len(run_ids) * len(METRICS))
    engine = get_engine(settings.database_url)
    rows: list[tuple[int, str, int, float, float]] = []
    for run_id in run_ids:
        for name in METRICS:
            for step in range(1, per_series + 1):
                value = 3.0 / (1 + step * 1e-3) + (0.5 if step % 9973 == 0 else 0.0)
                rows.append((run_id, name, step, value, step * 0.05))
                if len(rows) >= batch:
                    with engine.begin() as conn:
                        insert_metrics(conn, rows)
                    rows.clear()
    if rows:
        with engine.begin() as conn:
            insert_metrics(conn, rows)


def finish(settings: Settings, job_id: int) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Run).where(Run.job_id == job_id).values(status="succeeded", step=Run.total_steps)
        )
        jobs_crud.lock_job(session, job_id)
        jobs_crud.recompute_job(session, job_id)


def _require_stored(got: int, expected: int, what: str) -> None:
    """A throughput is only reported for work that happened (correctness itself is tested in tests/)."""
    if got != expected:
        raise RuntimeError(f"{what}: {got:,} stored, expected {expected:,}; no figure reported")


def count_points(settings: Settings, run_ids: list[int]) -> int:
    with session_scope(settings.database_url) as session:
        return int(
            session.scalar(
                select(func.count()).select_from(MetricPoint).where(MetricPoint.run_id.in_(run_ids))
            )
        )


# --- phase: ingestion ----------------------------------------------------------------------------
def bench_ingest(settings: Settings, points: int) -> list[str]:
    _, (run_a, run_b, run_c, run_d) = make_job(settings, "ingest", [0, 1])
    engine = get_engine(settings.database_url)
    out = [
        "## Ingestion into PostgreSQL",
        "",
        "| path | points | seconds | points/s |",
        "|---|---:|---:|---:|",
    ]

    steps = points // 10
    sink = DatabaseSink(engine, run_a, flush_every_points=10_000, flush_every_s=3600)
    names = [f"m{i}" for i in range(10)]
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        sink.log_metrics(step, {name: step * 1e-3 + i for i, name in enumerate(names)}, step * 0.01)
    sink.close()
    dt = time.perf_counter() - t0
    _require_stored(count_points(settings, [run_a]), steps * 10, "the sink's points")
    out.append(
        f"| DatabaseSink (worker path: 10k-point buffer, one COPY + merge per flush) | {steps * 10:,} | "
        f"{dt:.2f} | **{steps * 10 / dt:,.0f}** |"
    )

    rows = [(run_b, f"m{i % 10}", i // 10 + 1, float(i), 0.0) for i in range(points)]
    t0 = time.perf_counter()
    for start in range(0, len(rows), 50_000):
        with engine.begin() as conn:
            insert_metrics(conn, rows[start : start + 50_000])
    dt = time.perf_counter() - t0
    out.append(f"| insert_metrics, 50k-row batches | {points:,} | {dt:.2f} | {points / dt:,.0f} |")

    t0 = time.perf_counter()
    with engine.begin() as conn:
        insert_metrics(conn, rows[:200_000])  # replay: every row conflicts
    dt = time.perf_counter() - t0
    out.append(
        f"| replay of 200k existing points (ON CONFLICT DO NOTHING) | 200,000 | {dt:.2f} | "
        f"{200_000 / dt:,.0f} |"
    )

    single = 5_000
    t0 = time.perf_counter()
    with engine.begin() as conn:
        for i in range(single):
            conn.execute(
                text(
                    "INSERT INTO metrics (run_id, name, step, value, wall_time) VALUES "
                    "(:r, 'x', :s, 1.0, 0.0) ON CONFLICT DO NOTHING"
                ),
                {"r": run_c, "s": i},
            )
    dt = time.perf_counter() - t0
    out.append(
        f"| one INSERT per point (what the sink avoids) | {single:,} | {dt:.2f} | {single / dt:,.0f} |"
    )
    _require_stored(count_points(settings, [run_b]), points, "the batched insert's points")
    del run_d
    return out


# --- phase: API latency --------------------------------------------------------------------------
class Server:
    def __init__(self, settings: Settings, workers: int, **env: str) -> None:
        import tempfile

        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - read in restarts()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **settings.env(), "DYKAF_RECONCILE": "0", "PYTHONPATH": str(ROOT), **env}
        self.proc = subprocess.Popen(
            uvicorn_argv("127.0.0.1", self.port, workers=workers, access_log=False),
            cwd=ROOT,
            env=full_env,
        )
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("API server did not start")
            time.sleep(0.2)

    def restarts(self) -> int:
        """Worker processes the uvicorn supervisor replaced (missed health checks, crashes)."""
        self.log.seek(0)
        text_log = self.log.read().decode(errors="replace")
        return text_log.count("Child process") + text_log.count("died")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _load(base: str, clients: int, duration: float, make_request: Any) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        stop_at = time.perf_counter() + duration

        async def one_client() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    response = await make_request(client)
                    ok = response.status_code < 400
                    key = str(response.status_code)
                except Exception as exc:  # counted, not raised: the report says how many
                    ok, key = False, type(exc).__name__
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[key] = errors.get(key, 0) + 1

        t_start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - t_start
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")
        )

    return {
        "n": len(latencies),
        "errors": errors,
        "p50": pct(0.50),
        "p99": pct(0.99),
        "mean": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "rps": len(latencies) / elapsed,
    }


def bench_api(settings: Settings, points: int, clients: int, duration: float, workers: int) -> list[str]:
    job_id, run_ids = make_job(settings, "read-1m", [0, 1])
    t0 = time.perf_counter()
    fill(settings, run_ids, points)
    fill_s = time.perf_counter() - t0
    finish(settings, job_id)
    t0 = time.perf_counter()
    with get_engine(settings.database_url).begin() as conn:
        for run_id in run_ids:  # what each worker does when its run ends
            build_rollups(conn, run_id)
    rollup_s = time.perf_counter() - t0
    total = count_points(settings, run_ids)
    with session_scope(settings.database_url) as session:
        _, token = create_key(session, "bench")
        session.execute(text("ANALYZE metrics"))
    headers = {"Authorization": f"Bearer {token}"}
    read_params = {"max_points": 1000, "view": "runs"}
    out = [
        "## API latency under load",
        "",
        f"{clients} concurrent clients (one asyncio process, httpx, keep-alive), {duration:.0f} s per row; "
        f"uvicorn with {workers} worker processes; PostgreSQL + Redis. Read target: a finished job of "
        f"{total:,} points (4 runs × 5 metrics × {total // 20:,} steps; written in {fill_s:.1f} s; rollups "
        f"built in {rollup_s:.1f} s), "
        f"`GET /api/v1/jobs/{{id}}/metrics?max_points=1000&view=runs` → 20 series × ≤1000 min/max buckets.",
        "",
        "| endpoint | requests | errors | p50 ms | p99 ms | mean ms | req/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, r: dict[str, Any]) -> str:
        errs = sum(r["errors"].values())
        err_text = f"{errs}" + (f" {r['errors']}" if errs else "")
        return (
            f"| {label} | {r['n']:,} | {err_text} | {r['p50']:.0f} | {r['p99']:.0f} | {r['mean']:.0f} | "
            f"{r['rps']:.1f} |"
        )

    async def submit(client: Any) -> Any:
        return await client.post("/api/v1/jobs", json=TINY, headers=headers)

    async def read(client: Any) -> Any:
        return await client.get(f"/api/v1/jobs/{job_id}/metrics", params=read_params)

    restarts = 0
    server = Server(settings, workers, DYKAF_READ_CACHE_ENTRIES="0")
    try:
        # unloaded latency first: one client, a few seconds per endpoint
        out.append(row("POST /jobs, 1 client", asyncio.run(_load(server.base, 1, 5, submit))))
        out.append(row("GET metrics, cache off, 1 client", asyncio.run(_load(server.base, 1, 5, read))))
        out.append(
            row(
                "POST /jobs (2 runs, 2 Redis publishes)",
                asyncio.run(_load(server.base, clients, duration, submit)),
            )
        )
        out.append(
            row(
                "GET metrics, 1M points, read cache off",
                asyncio.run(_load(server.base, clients, duration, read)),
            )
        )
    finally:
        restarts += server.restarts()
        server.stop()
    server = Server(settings, workers)
    try:
        out.append(
            row(
                "GET metrics, 1M points, read cache on",
                asyncio.run(_load(server.base, clients, duration, read)),
            )
        )
    finally:
        restarts += server.restarts()
        server.stop()
    out += [
        "",
        f"uvicorn worker restarts during the runs: {restarts} (health-check timeout {HEALTHCHECK_S} s).",
    ]
    return out


# --- phase: CSV memory ---------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_csv(settings: Settings, points: int) -> list[str]:
    import httpx

    small_id, small_runs = make_job(settings, "csv-100k", [0, 1])
    fill(settings, small_runs, 100_000)
    big_id, big_runs = make_job(settings, "csv-1m", [0, 1])
    fill(settings, big_runs, points)
    out = [
        "## CSV streaming memory",
        "",
        "Single-process API server; its RSS sampled every 20 ms while one client downloads "
        "`/api/v1/jobs/{id}/metrics.csv` and discards it.",
        "",
        "| rows | MB sent | seconds | rows/s | RSS before MB | RSS peak MB | growth MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    server = Server(settings, 1)
    try:
        for job_id, runs in ((small_id, small_runs), (big_id, big_runs)):
            rows = count_points(settings, runs)
            before = rss_mb(server.proc.pid)
            peak = [before]
            done = threading.Event()

            def sample(peak: list[float] = peak, done: threading.Event = done) -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss_mb(server.proc.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample)
            sampler.start()
            sent = lines = 0
            t0 = time.perf_counter()
            with httpx.stream(
                "GET", f"{server.base}/api/v1/jobs/{job_id}/metrics.csv", timeout=600
            ) as response:
                response.raise_for_status()
                for chunk in response.iter_bytes():
                    sent += len(chunk)
                    lines += chunk.count(b"\n")
            dt = time.perf_counter() - t0
            done.set()
            sampler.join()
            _require_stored(lines - 1, rows, "CSV rows streamed")
            out.append(
                f"| {rows:,} | {sent / 2**20:.0f} | {dt:.1f} | {rows / dt:,.0f} | {before:.0f} | "
                f"{peak[0]:.0f} | {peak[0] - before:.0f} |"
            )
    finally:
        server.stop()
    return out


# --- phase: GPU worker (embedded stack on a CUDA machine) ------------------------------------
def bench_gpu(device: str = "cuda") -> list[str]:
    """A real Celery worker started the way ``dykaf-lab worker --queue gpu --gpu 0`` starts one
    (CUDA_VISIBLE_DEVICES, DYKAF_WORKER_DEVICE=cuda, solo pool) trains a small job from the
    embedded stack (SQLite + SQLAlchemy broker; no PostgreSQL/Redis needed), then the stored rows are
    checked: every run on cuda, metrics and Fisher rows complete, rollups built, CSV complete."""
    import tempfile

    from server.csv_export import metrics_csv
    from server.db.models import FisherValue, Job
    from server.db.session import session_factory
    from server.jobs.publish import enqueue_run
    from worker.cli_service import celery_worker_argv

    tmp = Path(tempfile.mkdtemp(prefix="dykaf-gpu-"))
    settings = Settings(data_dir=tmp, heartbeat_s=0.5, flush_every_s=0.5, reconcile=False)
    migrate.upgrade(settings.database_url)
    steps = 300
    spec = JobSpec.model_validate(
        {
            **TINY,
            "name": "gpu-check",
            "device": device,
            "seeds": [0, 1],
            "task": {
                **TINY["task"],
                "n_layer": 2,
                "n_head": 4,
                "d_model": 128,
                "context": 128,
                "batch_size": 32,
                "steps": steps,
                "warmup_steps": 20,
                "log_every": 1,
                "eval_every": 100,
                "fisher_every": 50,
                "checkpoint_every": 50,
            },
        }
    )
    with session_scope(settings.database_url) as session:
        job = jobs_crud.create_job(session, spec, auto_queue="gpu")
        job_id, runs = job.id, [(run.id, run.queue) for run in job.runs]
    env = {
        **os.environ,
        **settings.env(),
        "DYKAF_WORKER_DEVICE": device,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = "0"  # what `dykaf-lab worker --gpu 0` sets
    log_path = tmp / "worker.log"
    with open(log_path, "wb") as log_file:
        worker = subprocess.Popen(
            celery_worker_argv("gpu" if device == "cuda" else "cpu", "gpu0@%h"),
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        t0 = time.perf_counter()
        for run_id, queue in runs:
            enqueue_run(settings, run_id, queue)
        status = "queued"
        while time.perf_counter() - t0 < 400 and worker.poll() is None:
            with session_scope(settings.database_url) as session:
                status = session.get(Job, job_id).status
            if status in ("succeeded", "failed", "diverged", "cancelled"):
                break
            time.sleep(1)
        elapsed = time.perf_counter() - t0
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    lines = [
        "## GPU worker check",
        "",
        f"Job status **{status}** after {elapsed:.0f} s (worker start included).",
        "",
        "| run | status | device | attempt | step | final val loss | step ms | metric rows | Fisher rows |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    ok = status == "succeeded"
    with session_scope(settings.database_url) as session:
        for run in session.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.index)):
            n_metrics = count_points(settings, [run.id])
            n_fisher = session.scalar(
                select(func.count()).select_from(FisherValue).where(FisherValue.run_id == run.id)
            )
            train = session.scalar(
                select(func.count())
                .select_from(MetricPoint)
                .where(MetricPoint.run_id == run.id, MetricPoint.name == "train_loss")
            )
            summary = run.summary or {}
            lines.append(
                f"| {run.label} s{run.seed} | {run.status} | {run.device} | {run.attempt} | {run.step} | "
                f"{summary.get('final_val_loss', float('nan')):.4f} | {summary.get('step_time_ms', 0):.1f} | "
                f"{n_metrics} | {n_fisher} |"
            )
            ok = ok and run.device == device and train == steps and n_fisher > 0 and run.rollup_built
    csv_rows = (
        sum(chunk.count("\n") for chunk in metrics_csv(session_factory(settings.database_url), job_id)) - 1
    )
    with session_scope(settings.database_url) as session:
        total = count_points(settings, [r for r, _ in runs])
    ok = ok and csv_rows == total
    lines += [
        "",
        f"metrics.csv rows {csv_rows} = stored points {total}; check {'PASSED' if ok else 'FAILED'}.",
    ]
    if not ok:
        lines += ["", "```", log_path.read_text(errors="replace")[-6000:], "```"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("DYKAF_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("DYKAF_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--phases", default="ingest,api,csv")
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda", help="gpu phase: cuda, or cpu for a dry run")
    args = parser.parse_args()

    if args.phases == "gpu":  # on a CUDA machine without PostgreSQL/Redis
        text_out = "\n".join(["# Service GPU check", "", *bench_gpu(args.device)])
        print(text_out)
        if args.out:
            write_text(args.out, text_out + "\n")
        return

    import tempfile

    import redis

    pg = Postgres(args.pg_url)
    prefix = f"dykaf-bench-{uuid.uuid4().hex[:8]}:"
    tmp = tempfile.mkdtemp(prefix="dykaf-bench-")
    settings = Settings(
        data_dir=Path(tmp),
        database_url=pg.url,
        broker_url=args.redis_url,
        broker_key_prefix=prefix,
        reconcile=False,
        write_rate_per_min=0,  # measure submissions, not the per-key 429 path
    )
    report = [
        "# Service benchmark",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), shared with other "
        f"work; PostgreSQL {pg.version} and Redis on localhost; Python {platform.python_version()}.",
        "",
        f"Command: `python -m bench.service --points {args.points} --clients {args.clients} "
        f"--duration {args.duration:.0f} --api-workers {args.api_workers} --out bench/results/service.md`",
        "",
    ]
    try:
        migrate.upgrade(pg.url)
        phases = args.phases.split(",")
        if "ingest" in phases:
            report += [*bench_ingest(settings, args.points), ""]
            print("\n".join(report), flush=True)
        if "api" in phases:
            report += [*bench_api(settings, args.points, args.clients, args.duration, args.api_workers), ""]
            print("\n".join(report[-12:]), flush=True)
        if "csv" in phases:
            report += [*bench_csv(settings, args.points), ""]
    finally:
        pg.drop()
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    text_out = "\n".join(report)
    print(text_out)
    if args.out:
        write_text(args.out, text_out + "\n")


if __name__ == "__main__":
    main()
