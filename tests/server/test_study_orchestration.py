"""A study on real databases, runs finished by hand with chosen losses: one job per scale, the
baseline's budget runs added once with the confirmation stage, winners equal to an exhaustive
offline argmin over the stored runs, edge flags, and speed-ups equal to a hand computation."""

from __future__ import annotations

import math
from typing import Any

import pytest
from sqlalchemy import select

from server.db import migrate
from server.db.models import Job, Run, Study
from server.db.session import session_scope
from server.studies import orchestrate
from server.studies.report import csv_rows
from server.studies.spec import parse_study
from tests.support.studies import LRS, finish_all, study_body


@pytest.fixture
def db(any_settings: Any) -> Any:
    migrate.upgrade(any_settings.database_url)
    return any_settings


def sweep_loss(group: str, lr: float, scale: int) -> float:
    """Stage-one losses: adamw best at the middle lr, muon best at the largest (an edge)."""
    if group == "adamw":
        return {0.001: 3.0, 0.003: 2.9, 0.01: 3.05}[lr] - 0.1 * scale
    return {0.001: 3.1, 0.003: 2.95, 0.01: 2.85}[lr] - 0.1 * scale


# Baseline curve at the winner: 2.9 (1x), 2.8 (2x), 2.7 (4x) at scale 0, every seed the same.
BUDGET_LOSS = {"adamw": 0.0, "adamw@2x": -0.1, "adamw@4x": -0.2}


def test_study_expands_confirms_and_reports(db: Any) -> None:
    spec = parse_study(study_body())
    with session_scope(db.database_url) as session:
        study = orchestrate.create_study(session, spec, auto_queue="cpu")
        study_id, job_ids = study.id, [j.id for j in study.jobs]
        stage_one = [len(j.runs) for j in study.jobs]
    assert stage_one == [6, 6]  # 2 optimizers x 3 lrs on the first seed
    for scale, job_id in enumerate(job_ids):

        def stage_one_loss(run_spec: dict[str, Any], scale: int = scale) -> float:
            return sweep_loss(run_spec["group"], run_spec["sweep_point"]["lr"], scale)

        created = finish_all(db.database_url, job_id, stage_one_loss)
        # confirmation: each winner on seed 1, plus the baseline winner at 2x and 4x on both seeds
        assert len(created) == 2 + 2 * 2
        assert finish_all(db.database_url, job_id, stage_one_loss) == []  # idempotent: nothing added twice
    with session_scope(db.database_url) as session:
        runs = session.scalars(select(Run).where(Run.job_id == job_ids[0]).order_by(Run.index)).all()
        budget = [(r.label, r.seed, r.total_steps) for r in runs if "@" in r.label]
        assert budget == [
            ("adamw[lr=0.003]@2x", 0, 20),
            ("adamw[lr=0.003]@2x", 1, 20),
            ("adamw[lr=0.003]@4x", 0, 40),
            ("adamw[lr=0.003]@4x", 1, 40),
        ]
        # exhaustive offline: the argmin of every stored first-seed sweep run per optimizer
        offline = {}
        for group in ("adamw", "muon"):
            sweep = [r for r in runs if r.spec["group"] == group and r.seed == 0]
            offline[group] = min(sweep, key=lambda r: r.summary["final_val_loss"]).spec["sweep_point"]
        confirmed = {
            r.spec["group"]: r.spec["sweep_point"] for r in runs if r.seed == 1 and "@" not in r.label
        }
        assert confirmed == offline == {"adamw": {"lr": 0.003}, "muon": {"lr": 0.01}}
        report = orchestrate.report_of(session.get(Study, study_id))
        jobs = session.scalars(select(Job).where(Job.study_id == study_id)).all()
        assert sorted(j.id for j in jobs) == job_ids
    scale0 = report["scales"][0]
    rows = {row["optimizer"]: row for row in scale0["optimizers"]}
    assert rows["adamw"]["winner"] == offline["adamw"] and rows["muon"]["winner"] == offline["muon"]
    assert rows["adamw"]["edges"] == []
    assert rows["muon"]["edges"] == ["muon: lr 0.01 is the largest tried: extend the grid"]
    assert "d16: muon: lr 0.01 is the largest tried: extend the grid" in report["warnings"]


def test_speedups_match_a_hand_computation(db: Any) -> None:
    spec = parse_study(study_body(scales=[{"name": "d16", "task": {"d_model": 16}}]))
    with session_scope(db.database_url) as session:
        job_id = orchestrate.create_study(session, spec, auto_queue="cpu").jobs[0].id

    def loss_of(run_spec: dict[str, Any]) -> float:
        group, lr = run_spec["group"], run_spec["sweep_point"]["lr"]
        if "@" in group:
            return 2.9 + BUDGET_LOSS[group]
        if run_spec["seed"] == 0:
            return sweep_loss(group, lr, 0)
        return {"adamw": 2.9, "muon": 2.75}[group]  # muon seeds: 2.85, 2.75

    finish_all(db.database_url, job_id, loss_of)
    finish_all(db.database_url, job_id, loss_of)
    with session_scope(db.database_url) as session:
        study = session.scalars(select(Study)).one()
        report = orchestrate.report_of(study)
    scale = report["scales"][0]
    assert [p["loss_mean"] for p in scale["baseline_curve"]] == [
        pytest.approx(2.9),
        pytest.approx(2.8),
        pytest.approx(2.7),
    ]
    muon = next(row for row in scale["optimizers"] if row["optimizer"] == "muon")
    # mean loss 2.8 = the baseline at 2x exactly: a 2x token speed-up
    assert muon["loss_mean"] == pytest.approx(2.8)
    assert muon["token_speedup"]["value"] == pytest.approx(2.0)
    # seeds: 2.85 -> halfway between 1x and 2x in log-tokens (sqrt 2); 2.75 -> sqrt(8)
    per_seed = [s["value"] for s in muon["token_speedup"]["per_seed"]]
    assert per_seed == [pytest.approx(math.sqrt(2)), pytest.approx(math.sqrt(8))]
    # train time is proportional to steps here, so the time speed-up equals the token speed-up
    assert muon["time_speedup"]["value"] == pytest.approx(2.0)
    adamw = next(row for row in scale["optimizers"] if row["optimizer"] == "adamw")
    assert adamw["token_speedup"]["value"] == pytest.approx(1.0)
    csv = {row[2]: row for row in csv_rows(report)}
    assert csv["muon"][3] == "lr=0.01" and csv["muon"][9] == "2"


def test_bad_studies_are_refused_with_the_field_named() -> None:
    from pydantic import ValidationError

    from server.studies.spec import format_study_error

    cases = {
        "muon: no sweep": {"optimizers": [{"name": "adamw", "sweep": {"lr": LRS}}, {"name": "muon"}]},
        "different tuning budgets": {
            "optimizers": [
                {"name": "adamw", "sweep": {"lr": LRS}},
                {"name": "muon", "sweep": {"lr": LRS[:2]}},
            ]
        },
        "baseline: 'sgd' is not among": {"baseline": "sgd"},
        "strictly increasing": {"budgets": [4, 2]},
        "greater than 1": {"budgets": [1, 2]},
        "scales.1.task.n_head": {"scales": [{"name": "a"}, {"name": "b", "task": {"n_head": 0}}]},
        "scale names must be unique": {"scales": [{"name": "a"}, {"name": "a"}]},
        "seeds": {"seeds": [0]},
        "scales.0.task.bogus": {"scales": [{"name": "a", "task": {"bogus": 1}}]},
    }
    for expected, override in cases.items():
        with pytest.raises(ValidationError) as info:
            parse_study(study_body(**override))
        assert expected in format_study_error(info.value), (expected, format_study_error(info.value))
    allowed = parse_study(
        study_body(
            optimizers=[{"name": "adamw", "sweep": {"lr": LRS}}, {"name": "muon"}], allow_unequal_budgets=True
        )
    )
    assert not allowed.equal_budgets()


def test_a_deleted_scale_job_leaves_the_other_scales_reported(db: Any) -> None:
    from server.crud import jobs as jobs_crud

    spec = parse_study(study_body())
    with session_scope(db.database_url) as session:
        study = orchestrate.create_study(session, spec, auto_queue="cpu")
        study_id, job_ids = study.id, [j.id for j in study.jobs]
    for job_id in job_ids:
        finish_all(db.database_url, job_id, lambda s: 3.0 - 0.1 * s["sweep_point"]["lr"] * 10)
        finish_all(db.database_url, job_id, lambda s: 3.0)
    with session_scope(db.database_url) as session:
        jobs_crud.delete_job(session, job_ids[0])
    with session_scope(db.database_url) as session:
        report = orchestrate.report_of(session.get(Study, study_id))
    first, second = report["scales"]
    assert (first["name"], first["status"], first["job_id"]) == ("d16", "deleted", None)
    assert all(row["winner"] is None for row in first["optimizers"])
    assert (second["name"], second["status"], second["job_id"]) == ("d32", "succeeded", job_ids[1])
    assert {row["optimizer"]: row["winner"] for row in second["optimizers"]} == {
        "adamw": {"lr": 0.01},
        "muon": {"lr": 0.01},
    }
