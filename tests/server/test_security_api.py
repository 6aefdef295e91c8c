"""Security properties of the REST API, in process (no worker): fuzzing against the OpenAPI schema,
resource-exhaustion inputs refused before anything is written, key handling, the per-key write rate
limit and data-root confinement of local paths.

Complements ``test_service_api.py`` (which covers the plain bad-input table, 401s and the simple
revocation/hash checks) with adversarial inputs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from server.db.models import ApiKey
from server.db.session import session_scope
from server.jobs.spec import MAX_STEPS
from tests.server.test_service_api import db_counts
from tests.support.services import tiny_job

FUZZ_BUDGET_S = 45.0


def _assert_4xx_with_message(r: Any, what: str) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, (what, r.text[:300])
    assert all(isinstance(item.get("msg"), str) and item["msg"] for item in detail), (what, detail)
    assert all(isinstance(item.get("loc"), list) for item in detail), (what, detail)


# --- (a) schema-driven fuzzing ---------------------------------------------------------------------
def test_openapi_fuzz_no_5xx_and_every_4xx_has_a_message(sqlite_settings: Any, api_factory: Any) -> None:
    """Every operation of the published schema, with generated (valid and invalid) inputs: never a
    5xx, and every 4xx is the documented ``{"detail": [{"loc", "msg", "type"}]}`` shape.

    Found: ids/run_ids/steps beyond 64 bits reached the database driver (OverflowError -> 500).
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from hypothesis import settings as hsettings

    api = api_factory(sqlite_settings.with_(write_rate_per_min=0))
    # A job to make the {job_id} paths reachable with a real id as well as random ones.
    job = api.post("/jobs", json=tiny_job()).json()
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    failures: list[tuple[str, str, int, str]] = []
    deadline = time.monotonic() + FUZZ_BUDGET_S
    exercised = 0

    def fuzz(op: Any) -> None:
        what = f"{op.method.upper()} {op.path}"

        @hsettings(
            max_examples=40,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        @given(case=op.as_strategy())
        def check(case: Any) -> None:
            nonlocal exercised
            if time.monotonic() > deadline:
                return
            exercised += 1
            if case.path_parameters and "job_id" in case.path_parameters and exercised % 3 == 0:
                case.path_parameters["job_id"] = job["id"]
            r = case.call(headers=api.auth)
            if r.status_code >= 500:
                failures.append((what, str(case.path_parameters), r.status_code, r.text[:200]))
            elif r.status_code >= 400:
                try:
                    _assert_4xx_with_message(r, what)
                except (AssertionError, ValueError, KeyError) as exc:
                    failures.append((what, str(case.path_parameters), r.status_code, str(exc)[:200]))

        check()

    for op in operations:
        if time.monotonic() > deadline:
            break
        fuzz(op)
    assert exercised >= 50
    assert not failures, failures[:10]


# --- (b) resource exhaustion refused before anything is written ------------------------------------
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_exhausting_inputs_are_refused_and_write_nothing(any_settings: Any, api_factory: Any) -> None:
    api = api_factory(any_settings.with_(write_rate_per_min=0))
    before = db_counts(api.settings)
    hdr = {"Content-Type": "application/json"}
    small = any_settings.max_body_bytes

    cases: list[tuple[str, str | bytes]] = []
    # Deeply nested JSON (well under the body limit): at top level, in a hyperparameter, as a name.
    cases.append(("nested top level", _nested(100_000)))
    body = json.dumps(tiny_job())
    cases.append(
        ("nested hyperparameter", body.replace('{"lr": 0.003}', '{"lr": ' + _nested(50_000) + "}", 1))
    )
    cases.append(("nested name", body.replace('"tiny"', _nested(50_000), 1)))
    deep_obj = '{"a":' * 30_000 + "1" + "}" * 30_000
    cases.append(("nested object as task", body.replace('"task": {', '"task": ' + deep_obj + ', "x": {', 1)))
    # Enormous step counts (beyond the cap, beyond int64, absurd floats).
    for steps in (MAX_STEPS + 1, 2**63, 10**400, 1e308):
        job = tiny_job()
        job["task"]["steps"] = steps
        cases.append((f"steps={str(steps)[:20]}", json.dumps(job)))
    # Combinatorial explosion: 11 hyperparameters x 16 values = 16**11 grid points for one optimizer
    # (built eagerly this took unbounded memory/CPU before being refused), and 64 optimizers x 16.
    vals = [round(0.5 + 0.02 * i, 4) for i in range(16)]
    lrs = [round(1e-4 * (i + 1), 6) for i in range(16)]
    bomb = tiny_job()
    bomb["optimizers"] = [
        {
            "name": "muon",
            "sweep": {
                "lr": lrs,
                "momentum": vals,
                "weight_decay": [0.001 * i for i in range(16)],
                "ns_steps": list(range(1, 17)),
                "adamw_lr": lrs,
                "adamw_beta1": vals,
                "adamw_beta2": vals,
                "adamw_weight_decay": [0.001 * i for i in range(16)],
                "adamw_eps": [1e-8 * (i + 1) for i in range(16)],
                "nesterov": [True, False],
                "adjust_lr_fn": ["original", "match_rms_adamw"],
            },
        }
    ]
    cases.append(("sweep bomb", json.dumps(bomb)))
    many = tiny_job(seeds=tuple(range(8)))
    many["optimizers"] = [{"name": "adamw", "label": f"a{i}", "sweep": {"lr": lrs}} for i in range(64)]
    cases.append(("64 optimizers x 16 x 8 seeds", json.dumps(many)))
    # Oversized in other shapes: a long string field, a huge number literal, many seeds.
    job = tiny_job()
    job["name"] = "n" * (small // 2)
    cases.append(("long name", json.dumps(job)))
    cases.append(("huge number literal", body.replace("0.003", "1" * 5000, 1)))
    job = tiny_job(seeds=tuple(range(100_000)))
    cases.append(("100k seeds", json.dumps(job)))

    for what, payload in cases:
        started = time.monotonic()
        r = api.post("/jobs", content=payload, headers=hdr)
        elapsed = time.monotonic() - started
        _assert_4xx_with_message(r, what)
        assert elapsed < 5.0, (what, elapsed)
    assert db_counts(api.settings) == before
    with session_scope(api.settings.database_url) as session:
        assert session.execute(text("SELECT count(*) FROM runs WHERE task_id IS NOT NULL")).scalar() == 0


# --- (c) keys --------------------------------------------------------------------------------------
def test_revocation_is_immediate_and_no_table_holds_a_plaintext_token(
    any_settings: Any, api_factory: Any
) -> None:
    from server.crud.api_keys import create_key, revoke_key

    api = api_factory(any_settings.with_(write_rate_per_min=0))
    with session_scope(api.settings.database_url) as session:
        _, other = create_key(session, "other")
    other_auth = {"Authorization": f"Bearer {other}"}
    # Warm every per-process path (connection pool, caches) with the key in use...
    job = api.post("/jobs", json=tiny_job()).json()
    assert api.post(f"/jobs/{job['id']}/cancel").status_code in (200, 202)
    assert api.post("/jobs", json=tiny_job(), headers=other_auth).status_code == 201
    # ...then revoke it from another process's point of view (a separate session) and use it at once.
    with session_scope(api.settings.database_url) as session:
        assert revoke_key(session, api.token) == 1
    for method, path in (
        ("post", "/jobs"),
        ("post", f"/jobs/{job['id']}/cancel"),
        ("post", f"/jobs/{job['id']}/rerun"),
        ("delete", f"/jobs/{job['id']}"),
    ):
        kwargs = {"json": tiny_job()} if path == "/jobs" else {}
        r = getattr(api, method)(path, **kwargs)
        assert r.status_code == 401, (path, r.text)
        assert "revoked" in r.json()["detail"][0]["msg"]
    # The other key is unaffected.
    assert api.post("/jobs", json=tiny_job(), headers=other_auth).status_code == 201

    # No column of any table holds either plaintext token (or its secret part).
    with session_scope(api.settings.database_url) as session:
        rows = session.scalars(select(ApiKey)).all()
        assert len(rows) == 2
        dump = []
        tables = ["api_keys", "jobs", "runs"]
        for table in tables:
            for row in session.execute(text(f"SELECT * FROM {table}")).all():
                dump.append(repr(tuple(row)))
    everything = "\n".join(dump)
    for token in (api.token, other):
        assert token not in everything
        assert token[12:] not in everything  # the secret part, beyond the displayed prefix


def test_last_used_is_recorded_at_most_once_a_minute(sqlite_settings: Any, api_factory: Any) -> None:
    from server.crud.api_keys import create_key

    api = api_factory(sqlite_settings.with_(write_rate_per_min=0))
    with session_scope(api.settings.database_url) as session:
        create_key(session, "idle")

    def last_used() -> dict[str, Any]:
        with session_scope(api.settings.database_url) as session:
            return {key.name: key.last_used_at for key in session.scalars(select(ApiKey))}

    assert last_used() == {"test": None, "idle": None}
    assert api.post("/jobs", json=tiny_job()).status_code == 201
    first = last_used()["test"]
    assert first is not None and last_used()["idle"] is None
    assert api.post("/jobs", json=tiny_job()).status_code == 201
    assert last_used()["test"] == first  # within the minute: no second write


# --- (d) per-key write rate limit --------------------------------------------------------------------
def test_write_rate_limit_is_per_key_and_answers_429(sqlite_settings: Any, api_factory: Any) -> None:
    from server.crud.api_keys import create_key

    api = api_factory(sqlite_settings.with_(write_rate_per_min=3))
    with session_scope(api.settings.database_url) as session:
        _, other = create_key(session, "other")
    codes = [api.post("/jobs", json=tiny_job()).status_code for _ in range(3)]
    assert codes == [201, 201, 201]
    before = db_counts(api.settings)
    r = api.post("/jobs", json=tiny_job())
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    _assert_4xx_with_message(r, "rate limited")
    assert r.json()["detail"][0]["type"] == "rate_limited"
    # Cancel/delete count as writes too; nothing was written by the refused requests.
    assert api.post("/jobs/1/cancel").status_code == 429
    assert db_counts(api.settings) == before
    # Another key has its own bucket; bad keys are 401 (authentication first), reads are not limited.
    assert api.post("/jobs", json=tiny_job(), headers={"Authorization": f"Bearer {other}"}).status_code == 201
    assert (
        api.client.post("/api/v1/jobs", json=tiny_job(), headers={"Authorization": "Bearer x"}).status_code
        == 401
    )
    assert all(api.get("/jobs").status_code == 200 for _ in range(10))


def test_rate_limit_message_says_the_retry_after_seconds(sqlite_settings: Any, api_factory: Any) -> None:
    """The message and ``Retry-After`` give one number, also when the wait is a fraction of a second
    (the message said "retry in 0.0 s" beside ``Retry-After: 1``)."""
    api = api_factory(sqlite_settings.with_(write_rate_per_min=3))
    for _ in range(3):
        assert api.post("/jobs", json=tiny_job()).status_code == 201
    r = api.post("/jobs", json=tiny_job())
    assert r.status_code == 429
    assert f"retry in {r.headers['retry-after']} s" in r.json()["detail"][0]["msg"]

    class AlmostReady:
        rate_per_min = 3.0

        def acquire(self, key: object) -> float:
            return 0.04

    api.app.state.write_limiter = AlmostReady()
    r = api.post("/jobs", json=tiny_job())
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "retry in 1 s" in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded"]
)
def test_a_body_that_is_not_json_is_415_and_writes_nothing(
    sqlite_settings: Any, api_factory: Any, content_type: str
) -> None:
    api = api_factory(sqlite_settings.with_(write_rate_per_min=0))
    before = db_counts(api.settings)
    r = api.post("/jobs", content=json.dumps(tiny_job()), headers={"Content-Type": content_type})
    assert r.status_code == 415, r.text
    (item,) = r.json()["detail"]
    assert item["loc"] == ["header", "Content-Type"] and "application/json" in item["msg"]
    assert db_counts(api.settings) == before
    ok = api.post(
        "/jobs", content=json.dumps(tiny_job()), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 201
    # A JSON body that is wrong is still a 422 naming the field.
    bad = api.post("/jobs", json={**tiny_job(), "seeds": "x"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:2] == ["body", "seeds"]


def test_write_rate_limit_holds_across_api_processes(pg_settings: Any, api_factory: Any) -> None:
    """Two API apps (as two replicas would) on one Redis share each key's bucket."""
    from server.ratelimit import RedisWriteRateLimiter

    first = api_factory(pg_settings.with_(write_rate_per_min=3))
    second = api_factory(pg_settings.with_(write_rate_per_min=3))
    assert isinstance(second.app.state.write_limiter, RedisWriteRateLimiter)
    auth = {"Authorization": f"Bearer {first.token}"}
    codes = [api.post("/jobs", json=tiny_job(), headers=auth).status_code for api in (first, second, first)]
    assert codes == [201, 201, 201]
    r = second.post("/jobs", json=tiny_job(), headers=auth)
    assert r.status_code == 429, r.text  # per replica it would have been this replica's 2nd write
    assert int(r.headers["retry-after"]) >= 1
    assert second.post("/jobs", json=tiny_job()).status_code == 201  # second's own key: own bucket


def test_shared_limiter_falls_back_to_the_process_when_redis_is_down() -> None:
    from server.ratelimit import RedisWriteRateLimiter

    limiter = RedisWriteRateLimiter(2, "redis://127.0.0.1:1/0")
    assert [limiter.acquire("k") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("k") > 0


def test_token_bucket_refills() -> None:
    from server.ratelimit import WriteRateLimiter

    limiter = WriteRateLimiter(60)  # one a second, bursts of 60
    assert all(limiter.acquire("k", now=0.0) == 0 for _ in range(60))
    wait = limiter.acquire("k", now=0.0)
    assert wait == pytest.approx(1.0)
    assert limiter.acquire("k", now=0.5) > 0
    assert limiter.acquire("k", now=1.6) == 0
    assert WriteRateLimiter(0).acquire("k") == 0  # disabled
    small = WriteRateLimiter(1, max_keys=2)
    for key in ("a", "b", "c"):
        assert small.acquire(key, now=0.0) == 0
    assert len(small._buckets) == 2


def test_write_rate_is_configured_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.core.config import Settings

    monkeypatch.setenv("DYKAF_WRITE_RATE_PER_MIN", "7")
    settings = Settings.from_env()
    assert settings.write_rate_per_min == 7
    assert settings.env()["DYKAF_WRITE_RATE_PER_MIN"] == "7.0"


# --- (e) local paths confined to the data roots ------------------------------------------------------
def test_paths_outside_data_roots_are_refused_naming_the_field(
    sqlite_settings: Any, api_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "corpora"
    root.mkdir()
    (root / "ok.txt").write_text("hello world " * 100)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "model.pt").write_bytes(b"x")
    (root / "link").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("DYKAF_DATA_ROOTS", str(root))
    monkeypatch.chdir(root)
    api = api_factory(sqlite_settings.with_(write_rate_per_min=0))
    before = db_counts(api.settings)

    def corpus(path: str) -> dict[str, Any]:
        job = tiny_job()
        job["task"]["corpus"] = {"name": "file", "path": path}
        return job

    def hf(name: str) -> dict[str, Any]:
        job = tiny_job()
        job["task"]["corpus"] = {"name": "hf", "hf_name": name}
        return job

    def model(path: str) -> dict[str, Any]:
        job = tiny_job()
        job["task"]["kind"] = "finetune"
        job["task"]["finetune"] = {"model": path}
        return job

    cases = [
        (corpus("/etc/passwd"), ["body", "task", "corpus", "path"]),
        (corpus("../secret/model.pt"), ["body", "task", "corpus", "path"]),
        (corpus(str(root / ".." / "secret")), ["body", "task", "corpus", "path"]),
        (corpus("link/model.pt"), ["body", "task", "corpus", "path"]),  # symlink escaping the root
        (corpus("~/.ssh/id_rsa"), ["body", "task", "corpus", "path"]),
        (hf("/etc"), ["body", "task", "corpus", "hf_name"]),
        (hf("../secret"), ["body", "task", "corpus", "hf_name"]),
        (model(str(outside / "model.pt")), ["body", "task", "finetune", "model"]),
        (model("../secret"), ["body", "task", "finetune", "model"]),
        (model("/root"), ["body", "task", "finetune", "model"]),
    ]
    for body, loc in cases:
        r = api.post("/jobs", json=body)
        _assert_4xx_with_message(r, str(loc))
        assert r.status_code == 422
        locs = [item["loc"] for item in r.json()["detail"]]
        assert loc in locs, (body["task"], locs)
        msg = " ".join(item["msg"] for item in r.json()["detail"])
        assert "outside the allowed data roots" in msg or "neither" in msg, msg
        # Only the path as the client wrote it: no resolved location, root or symlink target.
        written = json.dumps(body["task"]).replace('"', " ")
        told = [part for part in msg.split("'")[1::2] if part not in written]
        assert not told and str(tmp_path) not in msg.replace(str(outside), "").replace(str(root), ""), msg
    assert db_counts(api.settings) == before
    # Inside the root it is accepted.
    assert api.post("/jobs", json=corpus(str(root / "ok.txt"))).status_code == 201


def test_the_lab_state_is_never_a_corpus_or_model_whatever_the_roots(
    sqlite_settings: Any, api_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found: the default roots included the checkout, whose ``.lab/`` holds the database and the API
    key; a job with ``corpus: {name: file, path: .lab/lab.db}`` was accepted and trained on it."""
    checkout = tmp_path / "checkout"
    lab = checkout / ".lab"  # the default state directory, as `./lab up` makes it
    (lab / "logs").mkdir(parents=True)
    for name in ("lab.db", "lab.db-wal", "api_key", "logs/api.log"):
        (lab / name).write_text("state")
    elsewhere = tmp_path / "db"  # a SQLite database configured outside the state directory
    elsewhere.mkdir()
    (elsewhere / "other.db").write_text("state")
    (elsewhere / "notes.txt").write_text("hello world " * 100)
    cache = tmp_path / "cache"
    (cache / "tokenizers").mkdir(parents=True)
    (checkout / "data").mkdir()
    (checkout / "data" / "ok.txt").write_text("hello world " * 100)
    (checkout / "data" / "to-state").symlink_to(lab, target_is_directory=True)
    monkeypatch.chdir(checkout)
    monkeypatch.delenv("DYKAF_DATA_DIR", raising=False)
    monkeypatch.setenv("DYKAF_CACHE_DIR", str(cache))
    monkeypatch.setenv("DYKAF_DATABASE_URL", f"sqlite:///{elsewhere / 'other.db'}")
    monkeypatch.setenv("DYKAF_DATA_ROOTS", os.pathsep.join(["/", str(tmp_path)]))  # everything
    api = api_factory(sqlite_settings.with_(write_rate_per_min=0))
    before = db_counts(api.settings)

    def corpus(path: str) -> dict[str, Any]:
        job = tiny_job()
        job["task"]["corpus"] = {"name": "file", "path": path}
        return job

    def model(path: str) -> dict[str, Any]:
        job = tiny_job()
        job["task"]["kind"] = "finetune"
        job["task"]["finetune"] = {"model": path}
        return job

    refused = [
        corpus(".lab/lab.db"),
        corpus(".lab/api_key"),
        corpus(".lab"),
        corpus("./.lab/logs/api.log"),
        corpus(str(lab / "lab.db-wal")),
        corpus("data/to-state/api_key"),  # through a symlink inside a root
        corpus(str(elsewhere / "other.db")),
        corpus(str(cache / "tokenizers")),
        model(".lab"),
        model(str(lab)),
    ]
    for body in refused:
        r = api.post("/jobs", json=body)
        assert r.status_code == 422, (body["task"], r.text)
        msg = " ".join(item["msg"] for item in r.json()["detail"])
        assert "inside the lab state" in msg, msg
        assert str(tmp_path) not in msg.replace(str(lab), "").replace(str(elsewhere), "").replace(
            str(cache), ""
        )
        assert str(checkout) not in r.text.replace(str(lab), "")  # the server's own paths stay private
    assert db_counts(api.settings) == before
    # The state directory named by DYKAF_DATA_DIR (as `up` passes it) is protected the same way.
    monkeypatch.setenv("DYKAF_DATA_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "api_key").write_text("state")
    assert api.post("/jobs", json=corpus(str(tmp_path / "state" / "api_key"))).status_code == 422
    # Next to the state, ordinary files stay readable.
    assert api.post("/jobs", json=corpus("data/ok.txt")).status_code == 201
    assert api.post("/jobs", json=corpus(str(elsewhere / "notes.txt"))).status_code == 201


def test_default_data_root_is_a_dedicated_folder(
    sqlite_settings: Any, api_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without DYKAF_DATA_ROOTS only ``./data`` is readable: not the working directory (the checkout)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ok.txt").write_text("hello world " * 100)
    (tmp_path / "README.md").write_text("hello world " * 100)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DYKAF_DATA_ROOTS", raising=False)
    monkeypatch.setenv("DYKAF_CACHE_DIR", str(tmp_path / "cache"))
    api = api_factory(sqlite_settings.with_(write_rate_per_min=0))
    job = tiny_job()
    job["task"]["corpus"] = {"name": "file", "path": "README.md"}
    r = api.post("/jobs", json=job)
    assert r.status_code == 422 and "outside the allowed data roots" in r.text
    assert str(tmp_path) not in r.text and "./data" in r.text
    job["task"]["corpus"] = {"name": "file", "path": "data/ok.txt"}
    assert api.post("/jobs", json=job).status_code == 201
