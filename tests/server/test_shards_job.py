"""A job on prepared token shards, submitted over REST, runs to success in a real worker process."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from tests.support.services import tiny_job
from worker.lm.prepare import Source, prepare_data


def test_rest_job_on_shards_succeeds(
    data_roots: Path, sqlite_settings: Any, api_factory: Any, worker_factory: Any
) -> None:
    docs = [
        f"shard document {i}: " + "pack my box with five dozen liquor jugs. " * (1 + i % 5)
        for i in range(150)
    ]
    source = data_roots / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    folder = data_roots / "shards"
    prepare_data(
        Source(str(source)), folder, val_fraction=0.1, shard_tokens=2000, processes=1, progress=False
    )
    api = api_factory(sqlite_settings)
    worker = worker_factory(sqlite_settings)
    job = tiny_job(
        name="on-shards",
        steps=6,
        arch="llama",
        fisher_every=0,
        corpus={"name": "shards", "path": str(folder)},
    )
    bad = api.post("/jobs", json={**job, "task": {**job["task"], "corpus": {"name": "shards"}}})
    assert bad.status_code == 422 and "corpus.path is required" in bad.text
    r = api.post("/jobs", json=job)
    assert r.status_code == 201, r.text
    done = api.wait_job(r.json()["id"], {"succeeded", "failed", "diverged", "cancelled"}, timeout=180)
    assert done["status"] == "succeeded", (done, worker.log()[-3000:])
    assert done["runs"]
    for run in done["runs"]:
        summary = run["summary"]
        assert summary["final_step"] == 6 and summary["final_val_loss"] > 0
        assert summary["flops_per_token"] > 0 and 0 < summary["optimizer_share"] < 1
    rows = list(csv.DictReader(io.StringIO(api.get(f"/jobs/{done['id']}/runs.csv").text)))
    shares = sorted(run["summary"]["optimizer_share"] for run in done["runs"])
    assert sorted(float(row["optimizer_share"]) for row in rows) == shares
