"""Build the metric rollups of an ended run (see ``server.downsample`` for how reads use them).

The narrowest level is aggregated from the raw points, each wider level from the previous one
(4x fewer rows each time), so building all levels costs about one scan of the run's points. Runs
are rolled up by their worker right after they end; the reconciler backfills any run that ended
without them (worker died in between). Until then reads of that run use the raw points.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import Connection, select, text, update
from sqlalchemy.orm import Session

from server.db.models import Job, Run
from server.db.session import get_engine
from server.db.types import utcnow
from server.downsample import ROLLUP_WIDTHS
from server.jobs.status import TERMINAL

log = logging.getLogger(__name__)

_FROM_RAW = text(
    "INSERT INTO metric_rollups (run_id, name, width, bucket, step_first, step_last, n, n_value, "
    "sum_value, min_value, max_value) "
    "SELECT run_id, name, :width, step / :width, min(step), max(step), count(*), count(value), "
    "sum(value), min(value), max(value) FROM metrics WHERE run_id = :run_id "
    "GROUP BY run_id, name, step / :width"
)
_FROM_LEVEL = text(
    "INSERT INTO metric_rollups (run_id, name, width, bucket, step_first, step_last, n, n_value, "
    "sum_value, min_value, max_value) "
    "SELECT run_id, name, :width, bucket / :ratio, min(step_first), max(step_last), sum(n), "
    "sum(n_value), sum(sum_value), min(min_value), max(max_value) FROM metric_rollups "
    "WHERE run_id = :run_id AND width = :prev GROUP BY run_id, name, bucket / :ratio"
)


def build_rollups(conn: Connection, run_id: int) -> bool:
    """(Re)build every rollup level of an ended run in the caller's transaction.

    Returns False (and writes nothing) when the run is missing or still active, since its series
    could still grow.
    """
    status = conn.execute(select(Run.status).where(Run.id == run_id)).scalar()
    if status not in TERMINAL:
        return False
    conn.execute(text("DELETE FROM metric_rollups WHERE run_id = :run_id"), {"run_id": run_id})
    prev = None
    for width in ROLLUP_WIDTHS:
        if prev is None:
            conn.execute(_FROM_RAW, {"run_id": run_id, "width": width})
        else:
            conn.execute(
                _FROM_LEVEL, {"run_id": run_id, "width": width, "prev": prev, "ratio": width // prev}
            )
        prev = width
    conn.execute(update(Run).where(Run.id == run_id).values(rollup_built=True))
    # A new updated_at invalidates the API's cached reads of the job (they now come from rollups).
    job_id = conn.execute(select(Run.job_id).where(Run.id == run_id)).scalar()
    conn.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
    return True


def build_rollups_safely(database_url: str, run_id: int) -> bool:
    """Build in its own transaction; a failure only means reads of this run stay on raw points."""
    try:
        with get_engine(database_url).begin() as conn:
            return build_rollups(conn, run_id)
    except Exception:
        log.exception("building metric rollups for run %s failed", run_id)
        return False


def runs_missing_rollups(session: Session, finished_before: datetime, limit: int) -> list[int]:
    """Ids of ended runs (before ``finished_before``) whose rollups were never built, oldest first."""
    return list(
        session.scalars(
            select(Run.id)
            .where(
                Run.status.in_(sorted(TERMINAL)),
                Run.rollup_built.is_(False),
                Run.finished_at < finished_before,
            )
            .order_by(Run.id)
            .limit(limit)
        )
    )
