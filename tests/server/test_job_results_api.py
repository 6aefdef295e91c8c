"""What the API says about a job's results is true: progress counts steps trained, the summary
averages only runs that finished their schedule (partial ones counted and marked), the result files
have the names and columns ``dykaf-lab run`` writes, a finished job's cancel changes nothing, and
the jobs list names each finished job's winner.

Run outcomes are written straight into the database (no worker), so every number is exact.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from sqlalchemy import select

from server.crud.jobs import lock_job, recompute_job
from server.crud.metrics import insert_fisher
from server.csv_export import RUNS_FIXED
from server.db.models import Job, Run
from server.db.session import get_engine, session_scope
from tests.support.services import tiny_job


@pytest.fixture
def api(any_settings: Any, api_factory: Any) -> Any:
    return api_factory(any_settings)


def set_runs(api: Any, job_id: int, outcomes: list[tuple[str, int, dict[str, float] | None]]) -> None:
    """Give the job's runs (in index order) a status, the step they reached and a summary."""
    with session_scope(api.settings.database_url) as session:
        lock_job(session, job_id)
        runs = session.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.index)).all()
        for run, (status, step, summary) in zip(runs, outcomes, strict=True):
            run.status, run.step, run.summary = status, step, summary
        session.flush()
        recompute_job(session, job_id)


def loss(value: float) -> dict[str, float]:
    return {"final_val_loss": value, "best_val_loss": value, "step_time_ms": 10.0, "optimizer_ms": 2.0}


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def cancelled_job(api: Any) -> dict[str, Any]:
    """adamw: seed 0 finished (12/12), seed 1 cancelled at 3/12; dykaf: seed 0 finished, seed 1
    cancelled before it started (0/12)."""
    job = api.post("/jobs", json=tiny_job(seeds=(0, 1))).json()
    assert [(r["label"], r["seed"]) for r in job["runs"]] == [
        ("adamw", 0),
        ("adamw", 1),
        ("dykaf", 0),
        ("dykaf", 1),
    ]
    set_runs(
        api,
        job["id"],
        [
            ("succeeded", 12, loss(3.0)),
            ("cancelled", 3, loss(5.5)),
            ("succeeded", 12, loss(2.5)),
            ("cancelled", 0, None),
        ],
    )
    return job


def test_progress_counts_steps_trained_not_ended_runs(api: Any) -> None:
    job = cancelled_job(api)
    for body in (api.get(f"/jobs/{job['id']}").json(), api.get("/jobs").json()["items"][0]):
        assert body["status"] == "cancelled"
        progress = body["progress"]
        assert (progress["steps_done"], progress["steps_total"]) == (12 + 3 + 12 + 0, 48)
        assert progress["fraction"] == pytest.approx(27 / 48)


def test_summary_keeps_partial_runs_out_of_the_means(api: Any) -> None:
    job = cancelled_job(api)
    summary = api.get(f"/jobs/{job['id']}/summary").json()
    rows = {row["label"]: row for row in summary["rows"]}
    adamw = rows["adamw"]
    assert (adamw["seeds"], adamw["succeeded"], adamw["partial"], adamw["cancelled"]) == (2, 1, 1, 1)
    assert adamw["final_val_loss_mean"] == 3.0 and adamw["final_val_loss_n"] == 1  # not (3.0 + 5.5) / 2
    assert adamw["optimizer_share_mean"] == pytest.approx(0.2) and adamw["complete"] is False
    assert rows["dykaf"]["final_val_loss_mean"] == 2.5 and rows["dykaf"]["partial"] == 1
    assert summary["runs"] == {"total": 4, "succeeded": 2, "partial": 2, "pending": 0}
    assert summary["winner"] is None  # a comparison missing runs has no winner
    assert summary["fisher"] is None

    per_optimizer = csv_rows(api.get(f"/jobs/{job['id']}/summary.csv").text)
    assert [(r["label"], r["succeeded"], r["partial"]) for r in per_optimizer] == [
        ("adamw", "1", "1"),
        ("dykaf", "1", "1"),
    ]
    assert per_optimizer[0]["final_val_loss_mean"] == "3.0"
    assert per_optimizer[0]["final_val_loss_std"] == "0.0" and per_optimizer[0]["fwd_bwd_ms_mean"] == ""
    runs = csv_rows(api.get(f"/jobs/{job['id']}/runs.csv").text)
    assert tuple(runs[0])[: len(RUNS_FIXED)] == RUNS_FIXED
    assert [(r["status"], r["partial"], r["step"]) for r in runs] == [
        ("succeeded", "false", "12"),
        ("cancelled", "true", "3"),
        ("succeeded", "false", "12"),
        ("cancelled", "true", "0"),
    ]
    assert runs[3]["final_val_loss"] == ""  # no value: an empty field, never "nan"
    links = api.get(f"/jobs/{job['id']}").json()["links"]
    assert links["summary_csv"].endswith("/summary.csv") and links["runs_csv"].endswith("/runs.csv")


def test_winner_and_fisher_verdict_of_a_finished_job(api: Any) -> None:
    job = api.post("/jobs", json=tiny_job(seeds=(0, 1))).json()
    set_runs(
        api,
        job["id"],
        [("succeeded", 12, loss(v)) for v in (3.0, 3.2, 2.5, 2.7)],
    )
    dykaf_runs = [r["id"] for r in job["runs"] if r["label"] == "dykaf"]
    rows = []
    for run_id in dykaf_runs:
        for step in (4, 8):
            for method, value in (("optimal", 0.5), ("dykaf", 0.6), ("soap_shampoo", 0.9)):
                rows.append((run_id, step, "blocks.0.mlp", method, "kron_rel_err", value))
    with get_engine(api.settings.database_url).begin() as conn:
        insert_fisher(conn, rows)
    summary = api.get(f"/jobs/{job['id']}/summary").json()
    winner = summary["winner"]
    assert (winner["label"], winner["runner_up"]) == ("dykaf", "adamw")
    assert winner["mean"] == pytest.approx(2.6) and winner["margin"] == pytest.approx(0.5)
    assert summary["winner_text"].startswith("dykaf: final val loss 2.6000 ± 0.1414 (2 seeds)")
    fisher = summary["fisher"]
    assert fisher["label"] == "dykaf"
    assert fisher["verdict"] == (
        "On dykaf's gradients (1 layer × 2 reports), mean kron_rel_err above the floor: "
        "DyKAF 0.1000 · SOAP/Shampoo 0.4000. DyKAF's factors close 75% of SOAP/Shampoo's gap."
    )
    assert [g["method"] for g in fisher["by_label"]["dykaf"]["gaps"]] == ["dykaf", "soap_shampoo"]
    listed = api.get("/jobs").json()["items"][0]
    assert listed["id"] == job["id"] and listed["winner"]["label"] == "dykaf"
    assert api.get(f"/jobs/{job['id']}").json()["winner"]["label"] == "dykaf"


def test_jobs_list_has_no_winner_while_running(api: Any) -> None:
    job = api.post("/jobs", json=tiny_job()).json()
    set_runs(api, job["id"], [("succeeded", 12, loss(3.0)), ("running", 5, None)])
    assert api.get("/jobs").json()["items"][0]["winner"] is None
    summary = api.get(f"/jobs/{job['id']}/summary").json()
    assert summary["winner"] is None and summary["runs"]["pending"] == 1


def test_cancel_of_a_finished_job_writes_nothing(api: Any) -> None:
    job = cancelled_job(api)
    with session_scope(api.settings.database_url) as session:
        session.get(Job, job["id"]).cancel_requested = False  # ended on its own, never asked to stop
    for final in ("cancelled", "succeeded"):
        if final == "succeeded":
            set_runs(api, job["id"], [("succeeded", 12, loss(3.0))] * 4)
        with session_scope(api.settings.database_url) as session:
            before = session.execute(
                select(Job.updated_at, Job.cancel_requested).where(Job.id == job["id"])
            ).one()
            runs_before = session.execute(
                select(Run.cancel_requested, Run.status).where(Run.job_id == job["id"])
            ).all()
        r = api.post(f"/jobs/{job['id']}/cancel")
        assert r.status_code == 409, r.text
        assert (
            r.json()["detail"][0]["msg"]
            == f"job {job['id']} already ended ({final}); there is nothing to cancel"
        )
        with session_scope(api.settings.database_url) as session:
            after = session.execute(
                select(Job.updated_at, Job.cancel_requested).where(Job.id == job["id"])
            ).one()
            runs_after = session.execute(
                select(Run.cancel_requested, Run.status).where(Run.job_id == job["id"])
            ).all()
        assert tuple(after) == tuple(before) and after.cancel_requested is False
        assert runs_after == runs_before
    assert api.post("/jobs/987654/cancel").status_code == 404
