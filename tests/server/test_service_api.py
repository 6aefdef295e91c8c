"""REST API against real databases (SQLite and PostgreSQL): auth, validation, job lifecycle
endpoints, downsampled/aggregated metric reads, CSV streams, health and Prometheus.

No worker runs here: metric rows are written through the same batched insert path the worker
uses, so reads can be checked against exact expectations.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text, update

from server.crud.metrics import insert_fisher, insert_metrics
from server.crud.rollups import build_rollups
from server.db.models import ApiKey, FisherValue, Job, MetricPoint, Run
from server.db.session import get_engine, session_scope
from server.db.types import utcnow
from server.downsample import bucket_width, downsample_minmax
from server.jobs.spec import MAX_STEPS
from tests.support.services import tiny_job


def db_counts(settings: Any) -> dict[str, int]:
    with session_scope(settings.database_url) as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model))
            for model in (Job, Run, MetricPoint, FisherValue)
        }


@pytest.fixture
def api(any_settings: Any, api_factory: Any) -> Any:
    return api_factory(any_settings)


# --- auth ----------------------------------------------------------------------------------------
def test_writes_need_a_valid_key(api: Any) -> None:
    body = tiny_job()
    before = db_counts(api.settings)
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
        {"Authorization": f"Bearer {api.token}x"},
    ):
        r = api.client.post("/api/v1/jobs", json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"][0]["loc"] == ["header", "Authorization"]
    job = api.post("/jobs", json=body).json()
    for path in (f"/jobs/{job['id']}/cancel", f"/jobs/{job['id']}/rerun"):
        assert api.client.post(f"/api/v1{path}").status_code == 401
    assert api.client.delete(f"/api/v1/jobs/{job['id']}").status_code == 401
    after = db_counts(api.settings)
    assert after["jobs"] == before["jobs"] + 1  # only the keyed submission was written


def test_revoked_key_is_refused_and_reads_are_open_by_default(api: Any) -> None:
    from server.crud.api_keys import revoke_key

    assert api.get("/jobs").status_code == 200  # no key needed for reads
    with session_scope(api.settings.database_url) as session:
        assert revoke_key(session, api.token[:12]) == 1
    r = api.post("/jobs", json=tiny_job())
    assert r.status_code == 401
    assert "revoked" in r.json()["detail"][0]["msg"]


def test_reads_can_require_a_key(sqlite_settings: Any, api_factory: Any) -> None:
    api = api_factory(sqlite_settings.with_(reads_require_key=True))
    assert api.get("/jobs").status_code == 401
    assert api.get("/optimizers").status_code == 401
    assert api.get("/jobs", headers=api.auth).status_code == 200
    assert api.client.get("/healthz").status_code == 200  # probes stay open


def test_keys_are_stored_hashed(api: Any) -> None:
    with session_scope(api.settings.database_url) as session:
        rows = session.scalars(select(ApiKey)).all()
    assert len(rows) == 1
    assert rows[0].key_hash != api.token and len(rows[0].key_hash) == 64
    assert api.token not in json.dumps([r.prefix for r in rows]) and api.token.startswith(rows[0].prefix)


# --- validation: every bad input is a 4xx naming the field, and writes nothing ----------------------
def _bad_cases(settings: Any) -> list[tuple[str, Any, int, list[str]]]:
    def job(**changes: Any) -> dict[str, Any]:
        body = tiny_job()
        for dotted, value in changes.items():
            target = body
            *parents, leaf = dotted.split("__")
            for part in parents:
                target = target[int(part)] if part.isdigit() else target[part]
            target[leaf] = value
        return body

    huge = tiny_job()
    huge["name"] = "x"
    huge["padding"] = "a" * (settings.max_body_bytes + 10)
    return [
        ("unknown top-level field", job(colour="red"), 422, ["body", "colour"]),
        ("unknown task field", job(task__layers=3), 422, ["body", "task", "layers"]),
        ("zero steps", job(task__steps=0), 422, ["body", "task", "steps"]),
        ("negative steps", job(task__steps=-5), 422, ["body", "task", "steps"]),
        (
            "steps over server cap",
            job(task__steps=MAX_STEPS + 1, task__warmup_steps=1),
            422,
            ["body", "task", "steps"],
        ),
        ("string steps", job(task__steps="many"), 422, ["body", "task", "steps"]),
        (
            "NaN hyperparameter",
            job(optimizers__0__hyperparameters={"lr": float("nan")}),
            422,
            ["body", "optimizers", 0, "hyperparameters", "lr"],
        ),
        (
            "infinite hyperparameter",
            job(optimizers__0__hyperparameters={"lr": float("inf")}),
            422,
            ["body", "optimizers", 0, "hyperparameters", "lr"],
        ),
        ("unknown optimizer", job(optimizers__0__name="sgd-ultra"), 422, ["body", "optimizers", 0, "name"]),
        (
            "out-of-range hyperparameter",
            job(optimizers__0__hyperparameters={"lr": -1.0}),
            422,
            ["body", "optimizers", 0],
        ),
        (
            "too many runs",
            job(
                seeds=list(range(32)),
                optimizers__0__sweep={"lr": [1e-3 * k for k in range(1, 17)]},  # 32 x 17 runs
            ),
            422,
            ["body"],
        ),
        ("no optimizers", job(optimizers=[]), 422, ["body", "optimizers"]),
        ("not an object", [1, 2, 3], 422, ["body"]),
        ("body too large", huge, 413, ["body"]),
    ]


def test_bad_inputs_are_rejected_and_write_nothing(api: Any) -> None:
    before = db_counts(api.settings)
    for what, body, code, loc_prefix in _bad_cases(api.settings):
        payload = json.dumps(body, allow_nan=True)
        r = api.post("/jobs", content=payload, headers={"Content-Type": "application/json"})
        assert r.status_code == code, (what, r.status_code, r.text[:500])
        detail = r.json()["detail"]
        assert isinstance(detail, list) and detail, what
        assert all({"loc", "msg", "type"} <= set(item) for item in detail), (what, detail)
        assert any(item["loc"][: len(loc_prefix)] == loc_prefix for item in detail), (what, detail)
    assert db_counts(api.settings) == before


def test_malformed_json_and_chunked_oversize_are_4xx(api: Any) -> None:
    before = db_counts(api.settings)
    r = api.post("/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][0] == "body"

    def chunks() -> Any:
        for _ in range(api.settings.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    r = api.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert db_counts(api.settings) == before


def test_server_run_cap_names_the_field(sqlite_settings: Any, api_factory: Any) -> None:
    api = api_factory(sqlite_settings.with_(max_runs_per_job=3))
    r = api.post("/jobs", json=tiny_job(seeds=(0, 1)))  # 2 optimizers x 2 seeds = 4 runs
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "optimizers"]
    assert "4 runs" in r.json()["detail"][0]["msg"]
    assert db_counts(api.settings)["jobs"] == 0


# --- job lifecycle endpoints -----------------------------------------------------------------------
def test_submit_get_list_paginate(api: Any) -> None:
    created = []
    for i in range(5):
        r = api.post("/jobs", json=tiny_job(name=f"job{i}", seeds=(0, 1)))
        assert r.status_code == 201, r.text
        assert r.headers["location"] == f"/api/v1/jobs/{r.json()['id']}"
        created.append(r.json())
    job = created[0]
    assert job["status"] == "queued" and len(job["runs"]) == 4
    assert [(run["label"], run["seed"]) for run in job["runs"]] == [
        ("adamw", 0),
        ("adamw", 1),
        ("dykaf", 0),
        ("dykaf", 1),
    ]
    assert all(run["total_steps"] == 12 and run["status"] == "queued" for run in job["runs"])
    assert job["progress"] == {"fraction": 0.0, "steps_done": 0, "steps_total": 48, "runs": {"queued": 4}}
    with session_scope(api.settings.database_url) as session:  # every run got a broker message
        assert session.scalar(select(func.count()).where(Run.task_id.is_(None))) == 0

    got = api.get(f"/jobs/{job['id']}").json()
    assert got["spec"]["task"]["steps"] == 12 and got["runs"][0]["hyperparameters"]["lr"] == 0.003

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/jobs", params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted((j["id"] for j in created), reverse=True)
    assert [j["name"] for j in api.get("/jobs", params={"name": "job3"}).json()["items"]] == ["job3"]
    assert api.get("/jobs", params={"status": "running"}).json()["items"] == []
    assert len(api.get("/jobs", params={"status": "queued"}).json()["items"]) == 5
    assert api.get("/jobs", params={"status": "bogus"}).status_code == 422
    assert api.get("/jobs", params={"cursor": "!!"}).status_code == 422
    assert api.get("/jobs/999999").status_code == 404
    assert api.get("/jobs/999999").json()["detail"][0]["loc"] == ["path", "job_id"]


def test_list_filters_names_by_substring_in_any_case(api: Any) -> None:
    for name in ("Baseline AdamW", "adamw sweep", "DyKAF 100", "dykaf_x", "dykafXx"):
        assert api.post("/jobs", json=tiny_job(name=name)).status_code == 201

    def names(part: str) -> list[str]:
        return sorted(j["name"] for j in api.get("/jobs", params={"name": part}).json()["items"])

    assert names("ADAMW") == ["Baseline AdamW", "adamw sweep"]
    assert names("kaf") == ["DyKAF 100", "dykafXx", "dykaf_x"]
    assert names("f_x") == ["dykaf_x"]  # LIKE wildcards typed by the user match only themselves
    assert names("%") == [] and names("1%0") == []
    assert names("nothing like it") == []


def test_cancel_queued_job_then_rerun_and_delete(api: Any) -> None:
    job = api.post("/jobs", json=tiny_job()).json()
    r = api.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "cancelled" and body["reason"]
    assert {run["status"] for run in body["runs"]} == {"cancelled"}
    assert all(run["reason"] == "cancelled before it started" for run in body["runs"])

    rerun = api.post(f"/jobs/{job['id']}/rerun")
    assert rerun.status_code == 201
    assert rerun.json()["rerun_of"] == job["id"] and rerun.json()["status"] == "queued"
    assert rerun.json()["spec"] == body["spec"]

    # a stored spec over a limit lowered since (here: runs per job) is a 422, not a 500
    api.app.state.settings = api.settings.with_(max_runs_per_job=1)
    r = api.post(f"/jobs/{job['id']}/rerun")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "optimizers"]
    api.app.state.settings = api.settings
    with session_scope(api.settings.database_url) as session:  # a stored spec that no longer parses
        stored = session.get(Job, job["id"])
        stored.spec = {**stored.spec, "task": {**stored.spec["task"], "steps": 0}}
    r = api.post(f"/jobs/{job['id']}/rerun")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["spec", "task", "steps"]
    with session_scope(api.settings.database_url) as session:
        stored = session.get(Job, job["id"])
        stored.spec = body["spec"]

    # a job with queued runs cannot be deleted; a finished one can, with everything it owns
    assert api.delete(f"/jobs/{rerun.json()['id']}").status_code == 409
    run_id = body["runs"][0]["id"]
    with get_engine(api.settings.database_url).begin() as conn:
        insert_metrics(conn, [(run_id, "train_loss", 1, 1.0, 0.1)])
        insert_fisher(conn, [(run_id, 1, "layer", "m", "x", 0.5)])
    assert api.delete(f"/jobs/{job['id']}").status_code == 204
    assert api.get(f"/jobs/{job['id']}").status_code == 404
    counts = db_counts(api.settings)
    assert counts["metrics"] == 0 and counts["fisher"] == 0 and counts["jobs"] == 1 and counts["runs"] == 2


# --- metrics: downsampling, aggregation, CSV ----------------------------------------------------------
def _seed_metrics(settings: Any, job_id: int, steps: int) -> dict[tuple[int, str], list[tuple[int, float]]]:
    """Deterministic synthetic curves with one spike, written through the batched insert path."""
    rng = random.Random(0)
    with session_scope(settings.database_url) as session:
        runs = session.execute(select(Run.id, Run.label, Run.seed).where(Run.job_id == job_id)).all()
    data: dict[tuple[int, str], list[tuple[int, float]]] = {}
    rows = []
    for run_id, _label, seed in runs:
        for name in ("train_loss", "lr"):
            series = []
            for step in range(1, steps + 1):
                value = 5.0 / math.sqrt(step) + 0.01 * seed + rng.random() * 1e-3
                if name == "lr":
                    value = 1e-3 * step / steps
                if name == "train_loss" and step == 777:
                    value = 50.0  # the spike a chart must still show
                series.append((step, value))
                rows.append((run_id, name, step, value, step * 0.01))
            data[(run_id, name)] = series
    with get_engine(settings.database_url).begin() as conn:
        insert_metrics(conn, rows)
        insert_metrics(conn, rows[:100])  # a replay is a no-op, not a duplicate
    return data


def test_downsampled_series_match_the_oracle_and_keep_spikes(api: Any) -> None:
    job = api.post("/jobs", json=tiny_job(seeds=(0, 1))).json()
    data = _seed_metrics(api.settings, job["id"], 3000)
    assert db_counts(api.settings)["metrics"] == 4 * 2 * 3000

    r = api.get(
        f"/jobs/{job['id']}/metrics", params={"max_points": 200, "name": "train_loss", "view": "runs"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # 3000 steps in <= 200 buckets aligned at step 0: width 16 gives 188 (15 would give 201)
    assert body["bucket_width"] == bucket_width(1, 3000, 200) == 16 and body["names"] == ["train_loss"]
    assert body["source"] == "raw" and len(body["series"]) == 4 and body["aggregates"] == []
    for series in body["series"]:
        expected = downsample_minmax(data[(series["run_id"], "train_loss")], 16)
        assert len(series["step"]) == len(expected) <= 200
        assert series["step"] == [b.step for b in expected]
        assert series["count"] == [b.count for b in expected]
        assert series["min"] == pytest.approx([b.min for b in expected], rel=1e-12)
        assert series["max"] == pytest.approx([b.max for b in expected], rel=1e-12)
        assert series["value"] == pytest.approx([b.mean for b in expected], rel=1e-9)
        assert max(series["max"]) == 50.0  # the one-step spike survives 16x downsampling

    # run and step-range filters; an unbucketed window returns the points themselves
    rid = job["runs"][0]["id"]
    r = api.get(
        f"/jobs/{job['id']}/metrics",
        params={"run_id": rid, "name": "lr", "step_min": 100, "step_max": 150, "view": "runs"},
    ).json()
    (series,) = r["series"]
    assert series["step"] == list(range(100, 151)) and r["bucket_width"] == 1
    assert series["value"] == pytest.approx([v for s, v in data[(rid, "lr")] if 100 <= s <= 150])
    assert api.get(f"/jobs/{job['id']}/metrics", params={"step_min": 5, "step_max": 1}).status_code == 422
    assert api.get(f"/jobs/{job['id']}/metrics", params={"max_points": 10**7}).status_code == 422


def test_aggregates_across_seeds(api: Any) -> None:
    job = api.post("/jobs", json=tiny_job(seeds=(0, 1))).json()
    data = _seed_metrics(api.settings, job["id"], 50)
    body = api.get(f"/jobs/{job['id']}/metrics", params={"name": "train_loss", "view": "aggregate"}).json()
    assert body["series"] == [] and [a["label"] for a in body["aggregates"]] == ["adamw", "dykaf"]
    runs_by_label: dict[str, list[int]] = {}
    for run in job["runs"]:
        runs_by_label.setdefault(run["label"], []).append(run["id"])
    for agg in body["aggregates"]:
        ids = runs_by_label[agg["label"]]
        assert agg["step"] == list(range(1, 51)) and set(agg["n"]) == {2}
        for i, step in enumerate(agg["step"]):
            values = [dict(data[(rid, "train_loss")])[step] for rid in ids]
            mean = sum(values) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in values))  # sample std, n-1 = 1
            assert agg["mean"][i] == pytest.approx(mean, rel=1e-12)
            assert agg["min"][i] == min(values) and agg["max"][i] == max(values)
            assert agg["std"][i] == pytest.approx(std, rel=1e-6, abs=1e-9)


def _finish_and_roll_up(settings: Any, job: dict[str, Any]) -> None:
    with session_scope(settings.database_url) as session:
        session.execute(update(Run).where(Run.job_id == job["id"]).values(status="succeeded"))
    with get_engine(settings.database_url).begin() as conn:
        for run in job["runs"]:
            assert build_rollups(conn, run["id"])


def test_rollup_reads_equal_raw_reads(api: Any) -> None:
    """Ended runs are read from rollups: same buckets as from the raw points, any width."""
    job = api.post("/jobs", json=tiny_job(seeds=(0, 1))).json()
    data = _seed_metrics(api.settings, job["id"], 3000)
    url = f"/jobs/{job['id']}/metrics"
    params = {"max_points": 200, "name": ["train_loss", "lr"], "view": "both"}
    raw = api.get(url, params=params).json()
    with get_engine(api.settings.database_url).begin() as conn:
        assert not build_rollups(conn, job["runs"][0]["id"])  # still queued: no rollups yet
    _finish_and_roll_up(api.settings, job)
    rolled = api.get(url, params=params).json()
    assert raw["source"] == "raw" and rolled["source"] == "rollup/16"
    assert rolled["bucket_width"] == raw["bucket_width"] == 16
    for a, b in zip(raw["series"] + raw["aggregates"], rolled["series"] + rolled["aggregates"], strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, list) and value and isinstance(value[0], float):
                assert b[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            else:
                assert b[key] == value, key

    # a width that is not a rollup width: the next multiple of the rollup level, checked vs the oracle
    body = api.get(url, params={"max_points": 150, "name": "train_loss", "view": "runs"}).json()
    assert body["source"] == "rollup/16" and body["bucket_width"] == 32
    for series in body["series"]:
        expected = downsample_minmax(data[(series["run_id"], "train_loss")], 32)
        assert series["step"] == [b.step for b in expected] and series["count"] == [b.count for b in expected]
        assert series["value"] == pytest.approx([b.mean for b in expected], rel=1e-9)
        assert series["max"] == [b.max for b in expected] and max(series["max"]) == 50.0

    # a step window or a run without rollups falls back to the raw points
    windowed = api.get(
        url, params={"max_points": 100, "step_min": 10, "step_max": 2000, "view": "runs"}
    ).json()
    assert windowed["source"] == "raw" and min(min(s["step"]) for s in windowed["series"]) == 10
    with session_scope(api.settings.database_url) as session:
        session.execute(update(Run).where(Run.id == job["runs"][0]["id"]).values(rollup_built=False))
    assert api.get(url, params={"max_points": 100, "view": "runs"}).json()["source"] == "raw"


def test_csv_exports_are_full_fidelity(api: Any) -> None:
    job = api.post("/jobs", json=tiny_job(seeds=(0, 1))).json()
    data = _seed_metrics(api.settings, job["id"], 700)
    rid = job["runs"][1]["id"]
    with get_engine(api.settings.database_url).begin() as conn:
        insert_fisher(conn, [(rid, s, "blocks.0.mlp", "dykaf", "cosine", 0.5 + s / 1000) for s in (4, 8)])
        insert_metrics(conn, [(rid, "val_loss", 1, float("nan"), 1.0)])
    r = api.get(f"/jobs/{job['id']}/metrics.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 4 * 2 * 700 + 1
    exact = {(int(x["run_id"]), x["name"], int(x["step"])): x["value"] for x in rows}
    assert len(exact) == len(rows)  # no duplicates
    for (run_id, name), series in data.items():
        for step, value in series[::97]:
            assert float(exact[(run_id, name, step)]) == value  # repr round-trips exactly
    assert exact[(rid, "val_loss", 1)] == ""  # NaN is an empty field, as in `dykaf-lab run`'s files
    assert {x["label"] for x in rows} == {"adamw", "dykaf"}

    fisher = list(csv.DictReader(io.StringIO(api.get(f"/jobs/{job['id']}/fisher.csv").text)))
    assert [(int(f["step"]), float(f["value"])) for f in fisher] == [(4, 0.504), (8, 0.508)]
    fjson = api.get(f"/jobs/{job['id']}/fisher").json()["series"]
    assert fjson == [
        {
            "run_id": rid,
            "label": job["runs"][1]["label"],
            "seed": 1,
            "layer": "blocks.0.mlp",
            "method": "dykaf",
            "metric": "cosine",
            "step": [4, 8],
            "value": [0.504, 0.508],
        }
    ]

    runs = list(csv.DictReader(io.StringIO(api.get(f"/jobs/{job['id']}/runs.csv").text)))
    assert [int(s["run_id"]) for s in runs] == [run["id"] for run in job["runs"]]
    assert {s["status"] for s in runs} == {"queued"} and {s["partial"] for s in runs} == {"false"}
    summary = list(csv.DictReader(io.StringIO(api.get(f"/jobs/{job['id']}/summary.csv").text)))
    assert [(s["label"], s["seeds"], s["pending"]) for s in summary] == [
        ("adamw", "2", "2"),
        ("dykaf", "2", "2"),
    ]
    assert api.get("/jobs/424242/metrics.csv").status_code == 404


def test_runs_csv_writes_counts_as_integers_and_missing_as_empty(api: Any) -> None:
    """A stored summary holds floats (JSON): counts are written ``60``, not ``60.0``, and the
    ``-1`` an older failed run kept for "no best step" as an empty cell."""
    job = api.post("/jobs", json=tiny_job(seeds=(0, 1))).json()
    first, second = (run["id"] for run in job["runs"][:2])
    with session_scope(api.settings.database_url) as session:
        session.execute(
            update(Run)
            .where(Run.id == first)
            .values(summary={"final_step": 60.0, "best_val_step": 50.0, "parameters": 12345.0, "x": 0.5})
        )
        session.execute(
            update(Run).where(Run.id == second).values(summary={"final_step": 0.0, "best_val_step": -1.0})
        )
    rows = {
        int(r["run_id"]): r for r in csv.DictReader(io.StringIO(api.get(f"/jobs/{job['id']}/runs.csv").text))
    }
    assert (rows[first]["final_step"], rows[first]["best_val_step"], rows[first]["parameters"]) == (
        "60",
        "50",
        "12345",
    )
    assert rows[first]["x"] == "0.5"
    assert (rows[second]["final_step"], rows[second]["best_val_step"]) == ("0", "")


# --- registry, health, metrics -----------------------------------------------------------------------
def test_registry_endpoints(api: Any) -> None:
    optimizers = api.get("/optimizers").json()
    names = {o["name"] for o in optimizers}
    assert {"dykaf", "adamw", "soap", "muon", "shampoo"} <= names
    dykaf = next(o for o in optimizers if o["name"] == "dykaf")
    assert "lr" in dykaf["hyperparameters"] and "default" in dykaf["hyperparameters"]["lr"]
    tasks = api.get("/tasks").json()
    assert tasks["task"]["properties"]["steps"]["default"] == 500
    assert "optimizers" in tasks["job"]["properties"]


def test_health_ready_and_prometheus(api: Any, tmp_path: Any) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["database"] == "ok"
    api.post("/jobs", json=tiny_job())
    text = api.client.get("/metrics").text
    assert 'dykaf_runs{status="queued"} 2.0' in text
    assert "dykaf_jobs_submitted_total" in text
    assert 'dykaf_http_requests_total{method="POST",route="/api/v1/jobs",status="201"}' in text
    assert api.client.get("/docs").status_code == 200
    assert "/api/v1/jobs/{job_id}/metrics.csv" in api.client.get("/openapi.json").json()["paths"]


def test_readyz_reports_unreachable_services(sqlite_settings: Any, api_factory: Any) -> None:
    api = api_factory(sqlite_settings)
    broken = sqlite_settings.with_(broker_url="redis://127.0.0.1:1/0")
    api.app.state.settings = broken
    r = api.client.get("/readyz")
    assert r.status_code == 503
    assert [item["loc"] for item in r.json()["detail"]] == [["broker"]]
    api.app.state.settings = broken.with_(database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    r = api.client.get("/readyz")
    assert r.status_code == 503
    assert [item["loc"] for item in r.json()["detail"]] == [["database"], ["broker"]]


def test_submit_survives_a_broker_outage(sqlite_settings: Any, api_factory: Any) -> None:
    """Runs of a job submitted while the broker is down are published by the reconciler later."""
    from server.jobs.reconcile import reconcile_once

    api = api_factory(sqlite_settings.with_(broker_url="redis://127.0.0.1:1/0"))
    r = api.post("/jobs", json=tiny_job())
    assert r.status_code == 201 and r.json()["warnings"]
    with session_scope(api.settings.database_url) as session:
        assert session.scalar(select(func.count()).where(Run.task_id.is_(None))) == 2
        session.execute(update(Run).values(queued_at=utcnow() - timedelta(seconds=60)))
    report = reconcile_once(sqlite_settings)  # the real (embedded) broker is reachable again
    assert sorted(report.enqueued) == [run["id"] for run in r.json()["runs"]]
    with session_scope(api.settings.database_url) as session:
        assert session.scalar(select(func.count()).where(Run.task_id.is_(None))) == 0
    broker = create_engine(sqlite_settings.broker_url.removeprefix("sqla+"))
    with broker.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM kombu_message WHERE visible")).scalar() == 2
    broker.dispose()
    assert reconcile_once(sqlite_settings).enqueued == []  # published once, not on every pass


def test_plain_postgresql_urls_use_psycopg3() -> None:
    from server.core.config import Settings

    assert Settings(database_url="postgresql://u@h/db").database_url == "postgresql+psycopg://u@h/db"
    assert Settings(database_url="postgres://u@h/db").database_url == "postgresql+psycopg://u@h/db"
    kept = "postgresql+psycopg://u@h/db"
    assert Settings(database_url=kept).database_url == kept
    assert Settings(database_url="sqlite:///x.db").database_url == "sqlite:///x.db"
