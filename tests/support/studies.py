"""Helpers for study tests: a tiny two-scale study, and finishing its queued runs by hand with
chosen losses (claim → finish → the job's next stage, exactly as a worker does)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from server.crud import runs as runs_crud
from server.db.models import Run
from server.db.session import session_scope

LRS = [0.001, 0.003, 0.01]


def study_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "two scales",
        "device": "cpu",
        "task": {
            "n_layer": 1,
            "n_head": 2,
            "context": 16,
            "batch_size": 4,
            "steps": 10,
            "warmup_steps": 2,
            "eval_every": 5,
            "eval_batches": 1,
            "fisher_every": 0,
            "corpus": {"name": "pydoc", "max_chars": 20000},
        },
        "scales": [{"name": "d16", "task": {"d_model": 16}}, {"name": "d32", "task": {"d_model": 32}}],
        "optimizers": [{"name": "adamw", "sweep": {"lr": LRS}}, {"name": "muon", "sweep": {"lr": LRS}}],
        "seeds": [0, 1],
        "budgets": [2, 4],
    }
    body.update(overrides)
    return body


def finish_all(
    database_url: str, job_id: int, loss_of: Callable[[dict[str, Any]], float], parameters: float = 1e4
) -> list[tuple[int, str]]:
    """Finish every queued run of the job with ``loss_of(run spec)``; train time ∝ steps.
    Returns the runs the job's next stage added (call again to finish those)."""
    created: list[tuple[int, str]] = []
    with session_scope(database_url) as session:
        pending = session.scalars(select(Run).where(Run.job_id == job_id, Run.status == "queued")).all()
        pending = [(r.id, r.spec) for r in pending]
    for run_id, spec in pending:
        with session_scope(database_url) as session:
            claim = runs_crud.claim_run(session, run_id, worker="w", device="cpu", stale_after_s=30)
        assert claim is not None
        steps = spec["task"]["steps"]
        summary = {"final_val_loss": loss_of(spec), "train_time_s": steps / 10, "parameters": parameters}
        with session_scope(database_url) as session:
            runs_crud.finish_run(
                session, claim, status="succeeded", reason=None, final_step=steps, summary=summary
            )
            created += runs_crud.expand_next_stage(session, job_id)
    return created
