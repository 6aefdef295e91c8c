"""Embedded mode through the real command line: ``dykaf-lab up`` (uvicorn + a Celery worker on
SQLite), the CLI client (submit/status/watch/cancel/download) against it, Ctrl-C, and a second
``up`` that keeps the earlier jobs and resumes a run interrupted by the first one's shutdown."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.services import ROOT, tiny_job

# The `dykaf-lab` entry point, independent of whether the console script is on PATH.
DYKAF_LAB = [sys.executable, "-c", "from worker.cli import app; app()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Up:
    """``dykaf-lab up`` as a subprocess, stopped with SIGINT like Ctrl-C."""

    def __init__(self, data_dir: Path, port: int, example: Path, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log
        env = {
            **os.environ,
            "DYKAF_DATA_DIR": str(data_dir),
            "DYKAF_HEARTBEAT_S": "0.25",
            "DYKAF_FLUSH_EVERY_S": "0.25",
            "DYKAF_AUTO_QUEUE": "cpu",
            "OMP_NUM_THREADS": "1",  # one torch thread: the shared 2-core CI box is oversubscribed
        }
        env.pop("DYKAF_DATABASE_URL", None)
        env.pop("DYKAF_BROKER_URL", None)
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*DYKAF_LAB, "up", "--port", str(port), "--example", str(example)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while "dykaf-lab is up" not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> float:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()
        return time.monotonic() - t0


LONG_STEPS = 1500


def cli(*args: str, data_dir: Path, server: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DYKAF_DATA_DIR": str(data_dir), "DYKAF_SERVER": server, **env}
    return subprocess.run(
        [*DYKAF_LAB, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def jobs_named(base: str, name: str) -> list[dict[str, Any]]:
    return httpx.get(f"{base}/api/v1/jobs", params={"name": name}).json()["items"]


def test_up_client_ctrl_c_and_restart(tmp_path: Path) -> None:
    data = tmp_path / "lab"
    example = tmp_path / "example.yaml"
    example.write_text(yaml.safe_dump(tiny_job(name="example")))
    long_job = tmp_path / "long.yaml"
    long_job.write_text(
        yaml.safe_dump(
            # Long enough that it cannot finish between "step >= 30" and the Ctrl-C taking effect on
            # an idle machine (a tiny step takes a few ms): the run must be interrupted and resumed.
            tiny_job(
                name="long", steps=LONG_STEPS, checkpoint_every=10, eval_every=LONG_STEPS, fisher_every=0
            )
            | {"optimizers": [{"name": "adamw", "hyperparameters": {"lr": 0.003}}]}
        )
    )
    port = free_port()
    up = Up(data, port, example, tmp_path / "up1.log")
    try:
        key_file = data / "api_key"
        assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
        token = key_file.read_text().strip()
        assert f"dashboard {up.base}/" in up.output()
        (job,) = jobs_named(up.base, "example")  # submitted by `up`

        r = cli("watch", str(job["id"]), data_dir=data, server=up.base)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"job {job['id']}: succeeded" in r.stdout
        # The results, as `dykaf-lab run` prints them: the summary table and the Fisher verdict.
        assert "summary (mean ± std over seeds)" in r.stdout and "dykaf" in r.stdout
        assert "Fisher fidelity: On dykaf's gradients (2 layers × " in r.stdout, r.stdout
        summary = httpx.get(f"{up.base}/api/v1/jobs/{job['id']}/summary").json()
        assert summary["winner_text"] and f"Winner: {summary['winner_text']}" in r.stdout
        # `up` itself followed the example job and ended with its winner and where the results are.
        deadline = time.monotonic() + 30
        while f"example job {job['id']}: succeeded" not in up.output():
            assert time.monotonic() < deadline, up.output()
            time.sleep(0.2)
        final = next(
            line for line in up.output().splitlines() if f"example job {job['id']}: succeeded" in line
        )
        assert f"winner {summary['winner_text']}" in final and f"{up.base}/jobs/{job['id']}" in final, final
        # The embedded worker trains at a lower CPU priority than the API beside it.
        from worker.cli_service import EMBEDDED_WORKER_NICE

        worker_pid = int(
            httpx.get(f"{up.base}/api/v1/jobs/{job['id']}").json()["runs"][0]["worker"].split(":")[-1]
        )
        assert (
            os.getpriority(os.PRIO_PROCESS, worker_pid) - os.getpriority(os.PRIO_PROCESS, 0)
            == EMBEDDED_WORKER_NICE
        )

        r = cli("status", data_dir=data, server=up.base)
        assert r.returncode == 0 and "example" in r.stdout and "succeeded" in r.stdout
        assert "100%" in r.stdout and "24/24" in r.stdout and summary["winner"]["label"] in r.stdout

        out_dir = tmp_path / "csv"
        r = cli("download", str(job["id"]), "--out", str(out_dir), data_dir=data, server=up.base)
        assert r.returncode == 0, r.stderr
        # The names `dykaf-lab run` writes, with the same content.
        assert sorted(p.name for p in out_dir.iterdir()) == [
            "fisher.csv",
            "metrics.csv",
            "runs.csv",
            "summary.csv",
        ]
        rows = list(csv.DictReader((out_dir / "metrics.csv").read_text().splitlines()))
        assert len([x for x in rows if x["name"] == "train_loss"]) == 2 * 12
        assert (out_dir / "runs.csv").read_text().count("succeeded") == 2
        per_optimizer = list(csv.DictReader((out_dir / "summary.csv").read_text().splitlines()))
        assert [(r["label"], r["succeeded"]) for r in per_optimizer] == [("adamw", "1"), ("dykaf", "1")]
        assert len((out_dir / "fisher.csv").read_text().splitlines()) > 1

        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(tiny_job(steps=0)))
        r = cli("submit", str(bad), data_dir=data, server=up.base)
        assert r.returncode == 2 and "task.steps" in r.stdout + r.stderr
        r = cli("submit", str(long_job), data_dir=data, server=up.base, DYKAF_API_KEY="dykaf_wrong")
        assert r.returncode == 1 and "401" in r.stdout + r.stderr

        r = cli("submit", str(long_job), data_dir=data, server=up.base)
        assert r.returncode == 0, r.stderr
        (long,) = jobs_named(up.base, "long")
        deadline = time.monotonic() + 90
        while httpx.get(f"{up.base}/api/v1/jobs/{long['id']}").json()["runs"][0]["step"] < 30:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        took = up.stop()
    assert up.proc.returncode == 0, up.output()
    assert took < 30 and "stopped" in up.output()
    with httpx.Client() as client:  # everything is down
        try:
            client.get(f"{up.base}/healthz", timeout=1)
            raise AssertionError("API still answering after Ctrl-C")
        except httpx.HTTPError:
            pass

    # Second start: same database, same key, example not resubmitted, the interrupted run resumes.
    up = Up(data, port, example, tmp_path / "up2.log")
    try:
        assert (data / "api_key").read_text().strip() == token
        assert len(jobs_named(up.base, "example")) == 1 and "exists" in up.output()
        r = cli("watch", str(long["id"]), data_dir=data, server=up.base)
        assert r.returncode == 0, r.stdout + r.stderr
        run = httpx.get(f"{up.base}/api/v1/jobs/{long['id']}").json()["runs"][0]
        assert run["attempt"] == 2 and run["step"] == LONG_STEPS
        assert run["summary"]["resumed_from_step"] >= 30
        rows = list(
            csv.DictReader(httpx.get(f"{up.base}/api/v1/jobs/{long['id']}/metrics.csv").text.splitlines())
        )
        steps = sorted(int(x["step"]) for x in rows if x["name"] == "train_loss")
        assert steps == list(range(1, LONG_STEPS + 1))
        r = cli("cancel", str(long["id"]), data_dir=data, server=up.base)
        assert r.returncode == 0 and "succeeded" in r.stdout  # cancelling a finished job changes nothing
    finally:
        up.stop()
    assert up.proc.returncode == 0
