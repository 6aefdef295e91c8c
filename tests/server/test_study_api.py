"""Studies over REST: bad input is a 422 naming the field with nothing written; an end-to-end study
on two tiny scales on CPU with a real worker (SQLite + the SQLAlchemy broker) runs its sweeps,
confirmations and the baseline's budget runs, and reports speed-ups in JSON and study.csv."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from server.db.models import Job, Run, Study
from server.db.session import session_scope

TASK = {
    "n_layer": 1,
    "n_head": 2,
    "context": 16,
    "batch_size": 4,
    "steps": 8,
    "warmup_steps": 2,
    "eval_every": 4,
    "eval_batches": 1,
    "log_every": 1,
    "fisher_every": 0,
    "corpus": {"name": "pydoc", "max_chars": 20000},
}


def body(**overrides: Any) -> dict[str, Any]:
    study: dict[str, Any] = {
        "name": "tiny study",
        "device": "cpu",
        "task": TASK,
        "scales": [{"name": "d16", "task": {"d_model": 16}}, {"name": "d32", "task": {"d_model": 32}}],
        "optimizers": [
            {"name": "adamw", "sweep": {"lr": [0.003, 0.01]}},
            {"name": "muon", "sweep": {"lr": [0.01, 0.03]}},
        ],
        "seeds": [0, 1],
        "budgets": [2, 4],
    }
    study.update(overrides)
    return study


def counts(settings: Any) -> tuple[int, int, int]:
    with session_scope(settings.database_url) as session:
        return tuple(
            session.scalar(select(func.count()).select_from(table)) or 0 for table in (Study, Job, Run)
        )  # type: ignore[return-value]


def test_bad_studies_are_422_and_write_nothing(
    sqlite_settings: Any, api_factory: Any, tmp_path: Path
) -> None:
    api = api_factory(sqlite_settings)
    bad = {
        "no sweep": body(optimizers=[{"name": "adamw", "sweep": {"lr": [0.003, 0.01]}}, {"name": "muon"}]),
        "baseline": body(baseline="soap"),
        "strictly increasing": body(budgets=[4, 2]),
        "scales": body(scales=[{"name": "x", "task": {"d_model": 30, "n_head": 4}}]),
        "less than or equal to 200000": body(task={**TASK, "steps": 150_000}),
    }
    for expected, study in bad.items():
        r = api.post("/studies", json=study)
        assert r.status_code == 422, (expected, r.text)
        assert expected in r.text, (expected, r.text)
    assert counts(sqlite_settings) == (0, 0, 0)
    # 60,000 steps per scale is within the job limit, but 240,000 at the baseline's 4x budget is not.
    r = api.post("/studies", json=body(task={**TASK, "steps": 60_000}))
    assert r.status_code == 422, r.text
    assert "at 4x: steps: Input should be less than or equal to 200000" in r.text, r.text
    assert counts(sqlite_settings) == (0, 0, 0)
    assert api.get("/studies/999").status_code == 404
    assert api.client.post("/api/v1/studies", json=body()).status_code == 401  # no key
    assert counts(sqlite_settings) == (0, 0, 0)


def wait_study(api: Any, study_id: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    study: dict[str, Any] = {}
    while time.monotonic() < deadline:
        study = api.get(f"/studies/{study_id}").json()
        if study["status"] not in ("queued", "running"):
            return study
        time.sleep(0.5)
    raise AssertionError(f"study {study_id} still {study.get('status')} after {timeout}s: {study}")


def test_study_end_to_end_on_two_tiny_scales(
    sqlite_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    api = api_factory(sqlite_settings)
    worker = worker_factory(sqlite_settings)
    r = api.post("/studies", json=body())
    assert r.status_code == 201, r.text
    created = r.json()
    assert r.headers["Location"] == f"/api/v1/studies/{created['id']}"
    assert [j["scale"] for j in created["jobs"]] == ["d16", "d32"]
    study = wait_study(api, created["id"], timeout=600)
    assert study["status"] == "succeeded", (study["reason"], worker.log()[-3000:])
    for scale, job in zip(study["report"]["scales"], study["jobs"], strict=True):
        runs = api.get(f"/jobs/{job['id']}").json()["runs"]
        # 4 sweep runs, 2 confirmations, the baseline winner at 2x and 4x on both seeds
        assert len(runs) == 10 and all(run["status"] == "succeeded" for run in runs)
        assert sorted(run["total_steps"] for run in runs if "@" in run["label"]) == [16, 16, 32, 32]
        assert scale["curve_ready"] and [p["multiplier"] for p in scale["baseline_curve"]] == [1, 2, 4]
        assert [p["tokens"] for p in scale["baseline_curve"]] == [8 * 4 * 16, 16 * 4 * 16, 32 * 4 * 16]
        assert scale["parameters"] and scale["parameters"] > 0
        for row in scale["optimizers"]:
            assert row["seeds"] == 2 and row["loss_mean"] > 0
            # the winner is the stored first-seed sweep run with the lowest final loss
            sweep = [
                run for run in runs if run["seed"] == 0 and run["label"].split("[")[0] == row["optimizer"]
            ]
            sweep = [run for run in sweep if "@" not in run["label"]]
            best = min(sweep, key=lambda run: run["summary"]["final_val_loss"])
            assert row["winner"] == best["sweep_point"]
            assert row["token_speedup"]["bound"] in ("=", ">", "<")
            assert row["time_speedup"] is not None
    assert scale["parameters"] > study["report"]["scales"][0]["parameters"]  # d32 is bigger
    text = api.get(f"/studies/{created['id']}/study.csv").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(row["scale"], row["optimizer"]) for row in rows] == [
        ("d16", "adamw"),
        ("d16", "muon"),
        ("d32", "adamw"),
        ("d32", "muon"),
    ]
    assert all(row["winner"].startswith("lr=") and float(row["final_loss_mean"]) > 0 for row in rows)
    listed = api.get("/studies").json()
    assert [s["id"] for s in listed] == [created["id"]] and listed[0]["status"] == "succeeded"
