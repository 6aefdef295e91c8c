"""Mixed API load on loopback while a worker writes metrics.

    python -m bench.load --clients 100 --duration 60 --out bench/results/load.md

Starts a real stack on this machine: a temporary PostgreSQL database (``--pg-url``, an admin URL;
dropped afterwards), Redis under a random key prefix (``--redis-url``), an API server (uvicorn,
``--api-workers`` processes) and one Celery worker training a long single-run job (a metric point
per step, flushed every 0.5 s). Then ``--clients`` concurrent httpx clients (one asyncio process,
keep-alive) loop for ``--duration`` seconds. Each client is a user: request, then think for a
uniform 0.5–1.5 × ``--think`` seconds (default 1 s, a dashboard polling about once a second), so
100 clients offer about 100 requests/s; ``--think 0`` turns the clients into a closed loop that
measures saturation throughput (latency is then clients / throughput by Little's law). Each
request is drawn at random:

* 10 % ``POST /api/v1/jobs`` (a 2-run job: validation, rows written, 2 tasks published),
* 45 % ``GET /api/v1/jobs/{id}`` status polls of the running job or a submitted one,
* 45 % ``GET /api/v1/jobs/{id}/metrics?max_points=200`` of the running job (the job is not
  finished, so the API aggregates in PostgreSQL at most once per ``live_read_ttl_s`` per process
  and serves the stored bytes in between; ``--live-ttl 0`` makes every read aggregate).

Reports throughput, p50/p99 latency and errors per kind, and the metric points the worker stored
during the window (it must keep writing under load). The per-key write limit is turned off for
the run (``DYKAF_WRITE_RATE_PER_MIN=0``), otherwise the submissions would measure the 429 path.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if not __package__:  # run as `python bench/NAME.py`: import as under `python -m bench.NAME`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench._common import ROOT, write_text
from bench.service import TINY, Postgres, Server
from server.core.config import HTTP_KEEP_ALIVE_S, Settings
from server.crud.api_keys import create_key
from server.db import migrate
from server.db.session import session_scope

KINDS = ("submit", "status", "metrics")
SETUP_TIMEOUT_S = 60.0
WEIGHTS = (0.10, 0.45, 0.45)


def metric_count(settings: Settings) -> int:
    from sqlalchemy import func, select

    from server.db.models import MetricPoint

    with session_scope(settings.database_url) as session:
        return int(session.scalar(select(func.count()).select_from(MetricPoint)) or 0)


def start_worker(settings: Settings, log_path: Path, nice: int = 0) -> subprocess.Popen[bytes]:
    from worker.cli_service import celery_worker_argv

    env = {**os.environ, **settings.env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = celery_worker_argv("gpu,cpu", f"load-{uuid.uuid4().hex[:6]}@%h")
    return subprocess.Popen(
        ["nice", "-n", str(nice), *argv] if nice else argv,
        cwd=ROOT,
        env=env,
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
    )


async def run_load(
    base: str, token: str, job_id: int, clients: int, duration: float, think: float, warmup: float
) -> dict[str, Any]:
    """Run the clients for ``warmup`` + ``duration`` seconds; latencies count from the end of the
    warm-up (connections opened, pools and statement caches filled), errors over the whole run."""
    import httpx

    lat: dict[str, list[float]] = {k: [] for k in KINDS}
    reads: list[tuple[float, float]] = []  # (start offset, latency) of successful reads
    errors: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    known = [job_id]
    auth = {"Authorization": f"Bearer {token}"}
    body = {**TINY, "name": "load", "seeds": [0]}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def one_client() -> None:
            if think > 0:  # users arrive spread over one think time, not all in the same instant
                await asyncio.sleep(rng.uniform(0.0, think))
            while time.perf_counter() < stop_at:
                kind = rng.choices(KINDS, WEIGHTS)[0]
                t0 = time.perf_counter()
                try:
                    if kind == "submit":
                        r = await client.post("/api/v1/jobs", json=body, headers=auth)
                        if r.status_code == 201:
                            known.append(r.json()["id"])
                    elif kind == "status":
                        r = await client.get(f"/api/v1/jobs/{rng.choice(known)}")
                    else:
                        r = await client.get(f"/api/v1/jobs/{job_id}/metrics", params={"max_points": 200})
                    key = str(r.status_code) if r.status_code >= 400 else ""
                except Exception as exc:  # counted, not raised
                    key = type(exc).__name__
                if key:
                    errors[kind][key] = errors[kind].get(key, 0) + 1
                elif t0 >= measure_from:
                    lat[kind].append(time.perf_counter() - t0)
                    if kind != "submit":
                        reads.append((t0 - measure_from, time.perf_counter() - t0))
                if think > 0:
                    await asyncio.sleep(think * rng.uniform(0.5, 1.5))

        measure_from = time.perf_counter() + warmup
        stop_at = measure_from + duration
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - measure_from

    def pct(values: list[float], p: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else float("nan")

    rows = {}
    for kind in [*KINDS, "all"]:
        values = [v for k in KINDS for v in lat[k]] if kind == "all" else lat[kind]
        errs = sum(sum(e.values()) for e in errors.values()) if kind == "all" else sum(errors[kind].values())
        rows[kind] = {
            "n": len(values),
            "errors": errs,
            "p50": pct(values, 0.50),
            "p99": pct(values, 0.99),
            "mean": statistics.fmean(values) * 1000 if values else float("nan"),
            "rps": len(values) / elapsed,
        }
    windows = [
        pct([lat for start, lat in reads if lo <= start < lo + 10.0], 0.99)
        for lo in range(0, max(1, math.ceil(duration)), 10)
    ]
    return {
        "rows": rows,
        "errors": errors,
        "elapsed": elapsed,
        "submitted": len(known) - 1,
        "read_p99_windows": windows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("DYKAF_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("DYKAF_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds, after the warm-up")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before measuring")
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument(
        "--think",
        type=float,
        default=1.0,
        help="mean think time per client, s (0: closed loop)",
    )
    parser.add_argument(
        "--writer-log-every", type=int, default=1, help="log_every of the job the worker trains meanwhile"
    )
    parser.add_argument(
        "--worker-nice", type=int, default=0, help="run the training worker at this niceness (CPU training)"
    )
    parser.add_argument("--live-ttl", type=float, default=None, help="API's DYKAF_LIVE_READ_TTL_S")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import tempfile

    import redis

    tmp = Path(tempfile.mkdtemp(prefix="dykaf-load-"))
    pg = Postgres(args.pg_url)
    prefix = f"dykaf-load-{uuid.uuid4().hex[:8]}:"
    settings = Settings(
        data_dir=tmp / "lab",
        database_url=pg.url,
        broker_url=args.redis_url,
        broker_key_prefix=prefix,
        reconcile=False,
        auto_queue="cpu",
        flush_every_s=0.5,
        heartbeat_s=1.0,
        write_rate_per_min=0,
        **({} if args.live_ttl is None else {"live_read_ttl_s": args.live_ttl}),
    )
    server = worker = None
    try:
        migrate.upgrade(settings.database_url)
        with session_scope(settings.database_url) as session:
            _, token = create_key(session, "load")
        server = Server(settings, args.api_workers, DYKAF_WRITE_RATE_PER_MIN="0")
        import httpx

        long_job = {
            **TINY,
            "name": "writer",
            "seeds": [0],
            "task": {
                **TINY["task"],
                "steps": 200_000,
                "log_every": args.writer_log_every,
                "eval_every": 100_000,
                "fisher_every": 100_000,
                "checkpoint_every": 100_000,
            },
            "optimizers": [TINY["optimizers"][0]],
        }
        # Set-up requests wait as long as the loaded machine needs (httpx's default is 5 s).
        r = httpx.post(
            f"{server.base}/api/v1/jobs",
            json=long_job,
            headers={"Authorization": f"Bearer {token}"},
            timeout=SETUP_TIMEOUT_S,
        )
        r.raise_for_status()
        job_id = r.json()["id"]
        worker = start_worker(settings, tmp / "worker.log", args.worker_nice)
        deadline = time.monotonic() + 120
        status_url = f"{server.base}/api/v1/jobs/{job_id}"
        while httpx.get(status_url, timeout=SETUP_TIMEOUT_S).json()["runs"][0]["step"] < 50:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(
                    "worker did not start writing:\n" + (tmp / "worker.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        before = metric_count(settings)
        result = asyncio.run(
            run_load(server.base, token, job_id, args.clients, args.duration, args.think, args.warmup)
        )
        written = metric_count(settings) - before
        restarts = server.restarts()
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGQUIT)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
        if server is not None:
            server.stop()
        pg.drop()
        client = redis.Redis.from_url(args.redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)

    cmd = " ".join(["python", "bench/load.py", *sys.argv[1:]])
    lines = [
        "# Mixed API load while a worker writes metrics",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), shared with other work; "
        f"PostgreSQL {pg.version} and Redis on localhost; Python {platform.python_version()}.",
        "",
        f"Command: `{cmd}`",
        "",
        f"{args.clients} concurrent clients (one asyncio process, httpx, keep-alive) for "
        f"{result['elapsed']:.0f} s measured after a {args.warmup:g} s warm-up (latencies from the measured "
        "part, errors from both), "
        + (
            f"each thinking 0.5–1.5 × {args.think:g} s between requests (offered ≈ "
            f"{args.clients / args.think:.0f} req/s); "
            if args.think > 0
            else "closed loop without think time (saturation: latency ≈ clients / throughput); "
        )
        + f"API keep-alive {HTTP_KEEP_ALIVE_S} s, running-job reads cached "
        f"≥ {settings.live_read_ttl_s:g} s; "
        f"uvicorn with {args.api_workers} worker processes; one Celery worker (niceness "
        f"{args.worker_nice}) training a single-run job throughout (10 metrics every "
        f"{args.writer_log_every} step(s)). Mix: 10 % submissions (2-run job), "
        f"45 % status polls, 45 % downsampled metric reads of the running job (max_points=200).",
        "",
        "| kind | requests | errors | p50 ms | p99 ms | mean ms | req/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in result["rows"].items():
        lines.append(
            f"| {kind} | {row['n']:,} | {row['errors']} | {row['p50']:.0f} | {row['p99']:.0f} | "
            f"{row['mean']:.0f} | {row['rps']:.1f} |"
        )
    lines += [
        "",
        f"Errors by kind and status: {result['errors']}",
        f"Jobs submitted during the window: {result['submitted']:,}. Metric points the worker stored "
        f"during the window: {written:,} ({written / (result['elapsed'] + args.warmup):.0f}/s). "
        f"uvicorn worker restarts: {restarts}.",
        "Read p99 per 10 s window (ms): " + ", ".join(f"{v:.0f}" for v in result["read_p99_windows"]) + ".",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        write_text(args.out, report)


if __name__ == "__main__":
    main()
