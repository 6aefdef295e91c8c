"""End to end over REST with a real worker (embedded mode: SQLite + the SQLAlchemy broker): a
classification job and an instruct job on the offline demo tasks, each comparing two optimizers,
finish with their task-quality metrics in metrics.csv, runs.csv and summary.csv, and the summary
judges them by the task's primary metric in the right direction."""

from __future__ import annotations

import csv
import io
from typing import Any

ENDED = {"succeeded", "failed", "diverged", "cancelled"}


def demo_job(kind: str, model: str, data: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"demo-{kind}",
        "device": "cpu",
        "seeds": [0],
        "target_metric": target,
        "task": {
            "kind": kind,
            "context": 160 if kind == "instruct" else 64,
            "batch_size": 8,
            "steps": 4,
            "warmup_steps": 1,
            "eval_every": 2,
            "log_every": 1,
            "fisher_every": 0,
            "finetune": {"model": model},
            kind: data,
        },
        "optimizers": [
            {"name": "adamw", "hyperparameters": {"lr": 1e-3}},
            {"name": "soap", "hyperparameters": {"lr": 1e-3}},
        ],
    }


def rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def check_job(api: Any, worker: Any, body: dict[str, Any], metrics: tuple[str, ...], primary: str) -> None:
    r = api.post("/jobs", json=body)
    assert r.status_code == 201, r.text
    job = api.wait_job(r.json()["id"], ENDED, timeout=400)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    job_id = job["id"]
    points = rows(api.get(f"/jobs/{job_id}/metrics.csv").text)
    for run in job["runs"]:
        for name in metrics:
            steps = sorted(
                int(p["step"]) for p in points if p["name"] == name and int(p["run_id"]) == run["id"]
            )
            assert steps == [0, 2, 4], (name, steps)
    # the dashboard's curve request for the quality chart
    curves = api.get(f"/jobs/{job_id}/metrics", params={"name": primary, "view": "aggregate"}).json()
    assert {a["name"] for a in curves["aggregates"]} == {primary} and len(curves["aggregates"]) == 2
    runs = rows(api.get(f"/jobs/{job_id}/runs.csv").text)
    assert len(runs) == 2
    for run in runs:
        for name in metrics:
            assert 0.0 <= abs(float(run[f"final_{name}"])) <= 1.0
    summary_rows = rows(api.get(f"/jobs/{job_id}/summary.csv").text)
    assert {r["optimizer"] for r in summary_rows} == {"adamw", "soap"}
    for row in summary_rows:
        for name in metrics:
            assert row[f"final_{name}_mean"] != ""
    summary = api.get(f"/jobs/{job_id}/summary").json()
    assert summary["primary_metric"] == f"final_{primary}"
    assert summary["primary"]["better"] == "max"
    assert summary["target_metric"]["name"] == primary
    winner = summary["winner"]
    assert winner is not None and winner["higher_is_better"] is True
    means = {r["label"]: r[f"final_{primary}_mean"] for r in summary["rows"]}
    assert means[winner["label"]] == max(means.values())
    assert f"final_{primary}" in summary["best"]


def test_classify_and_instruct_jobs_report_task_metrics(
    sqlite_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    settings = sqlite_settings
    api = api_factory(settings)
    worker = worker_factory(settings)
    classify = demo_job(
        "classify",
        "builtin:tiny-bert",
        {"demo": "stdlib_module", "demo_examples": 120},
        {"name": "val_accuracy", "op": ">=", "value": 0.0},
    )
    check_job(api, worker, classify, ("val_accuracy", "val_f1", "val_mcc"), "val_accuracy")
    instruct = demo_job(
        "instruct",
        "builtin:tiny-gpt2",
        {"demo_examples": 60, "eval_examples": 4, "max_new_tokens": 8},
        {"name": "val_exact_match", "op": ">=", "value": 0.0},
    )
    check_job(api, worker, instruct, ("val_exact_match",), "val_exact_match")
