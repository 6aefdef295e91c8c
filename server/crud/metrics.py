"""Metric and Fisher rows: batched idempotent writes, downsampled and aggregated reads, streams.

Writes go through one transaction per flush: on PostgreSQL ``COPY`` (binary) into a temporary
table and one ``INSERT … SELECT … ON CONFLICT DO NOTHING`` merge (measured ~1.6× the rate of a
single ``INSERT … SELECT unnest(arrays)`` and ~15× one INSERT per point; see bench/service.py), on
SQLite ``executemany`` of ``INSERT … ON CONFLICT DO NOTHING``. The composite primary key turns a
replayed point (redelivered task, resume from a checkpoint) into a no-op instead of a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Select, and_, func, literal_column, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from server.db.models import FisherValue, MetricPoint, Run
from server.downsample import bucket_width, finite_or_none

MetricRow = tuple[int, str, int, float | None, float]  # run_id, name, step, value, wall_time
FisherRowT = tuple[int, int, str, str, str, float | None]  # run_id, step, layer, method, metric, value

# PostgreSQL: COPY (binary) into a per-connection temporary table, then one merge statement in
# primary-key order. COPY is the fastest way in; the merge gives ON CONFLICT semantics (COPY has
# none) and the ordering turns index maintenance into mostly-sequential B-tree appends.
_PG_LOADS = {
    "metrics": (
        "CREATE TEMP TABLE IF NOT EXISTS metrics_load (run_id integer, name varchar(100), step integer, "
        "value double precision, wall_time double precision) ON COMMIT DELETE ROWS",
        "COPY metrics_load (run_id, name, step, value, wall_time) FROM STDIN (FORMAT BINARY)",
        ("int4", "varchar", "int4", "float8", "float8"),
        "INSERT INTO metrics (run_id, name, step, value, wall_time) SELECT run_id, name, step, value, "
        "wall_time FROM metrics_load ORDER BY run_id, name, step ON CONFLICT DO NOTHING",
    ),
    "fisher": (
        "CREATE TEMP TABLE IF NOT EXISTS fisher_load (run_id integer, step integer, layer varchar(200), "
        "method varchar(64), metric varchar(64), value double precision) ON COMMIT DELETE ROWS",
        "COPY fisher_load (run_id, step, layer, method, metric, value) FROM STDIN (FORMAT BINARY)",
        ("int4", "int4", "varchar", "varchar", "varchar", "float8"),
        "INSERT INTO fisher (run_id, step, layer, method, metric, value) SELECT run_id, step, layer, "
        "method, metric, value FROM fisher_load ORDER BY run_id, step, layer, method, metric "
        "ON CONFLICT DO NOTHING",
    ),
}
_SQLITE_METRICS = (
    "INSERT INTO metrics (run_id, name, step, value, wall_time) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_SQLITE_FISHER = (
    "INSERT INTO fisher (run_id, step, layer, method, metric, value) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)


def _pg_copy_merge(conn: Connection, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    create, copy_sql, types, merge = _PG_LOADS[table]
    dbapi = conn.dialect.loaded_dbapi
    try:
        with conn.connection.driver_connection.cursor() as cur:  # the same transaction as ``conn``
            cur.execute(create)
            with cur.copy(copy_sql) as copy:
                copy.set_types(list(types))
                for row in rows:
                    copy.write_row(row)
            cur.execute(merge)  # the load table empties itself at commit (ON COMMIT DELETE ROWS)
    except dbapi.Error as exc:
        # Raised as SQLAlchemy's wrappers (OperationalError, …) like any statement run through
        # ``conn.execute``, so callers classify transient errors one way.
        raise DBAPIError.instance(merge, None, exc, dbapi.Error) from exc


def insert_metrics(conn: Connection, rows: Sequence[MetricRow]) -> None:
    """Write a batch of metric points; existing ``(run_id, name, step)`` keys are left as they are."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        _pg_copy_merge(conn, "metrics", rows)
    else:
        conn.exec_driver_sql(_SQLITE_METRICS, list(rows))


def insert_fisher(conn: Connection, rows: Sequence[FisherRowT]) -> None:
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        _pg_copy_merge(conn, "fisher", rows)
    else:
        conn.exec_driver_sql(_SQLITE_FISHER, list(rows))


@dataclass
class MetricFilter:
    job_id: int
    run_ids: Sequence[int] = ()
    names: Sequence[str] = ()
    step_min: int | None = None
    step_max: int | None = None

    def apply(self, query: Select[Any]) -> Select[Any]:
        query = query.join(Run, Run.id == MetricPoint.run_id).where(Run.job_id == self.job_id)
        if self.run_ids:
            query = query.where(MetricPoint.run_id.in_(list(self.run_ids)))
        if self.names:
            query = query.where(MetricPoint.name.in_(list(self.names)))
        if self.step_min is not None:
            query = query.where(MetricPoint.step >= self.step_min)
        if self.step_max is not None:
            query = query.where(MetricPoint.step <= self.step_max)
        return query


@dataclass
class Series:
    key: tuple[Any, ...]
    step: list[int] = field(default_factory=list)
    value: list[float | None] = field(default_factory=list)
    min: list[float | None] = field(default_factory=list)
    max: list[float | None] = field(default_factory=list)
    count: list[int] = field(default_factory=list)
    std: list[float | None] = field(default_factory=list)


def step_range(session: Session, flt: MetricFilter) -> tuple[int, int] | None:
    lo, hi = session.execute(flt.apply(select(func.min(MetricPoint.step), func.max(MetricPoint.step)))).one()
    return None if lo is None else (int(lo), int(hi))


def downsampled_series(session: Session, flt: MetricFilter, max_points: int) -> tuple[list[Series], int]:
    """Per (run, metric) series bucketed to at most ``max_points`` buckets; returns the width."""
    rng = step_range(session, flt)
    if rng is None:
        return [], 1
    lo, hi = rng
    width = bucket_width(lo, hi, max_points)
    bucket = (
        ((MetricPoint.step - lo) // width).label("bucket") if width > 1 else MetricPoint.step.label("bucket")
    )
    query = flt.apply(
        select(
            MetricPoint.run_id,
            MetricPoint.name,
            bucket,
            func.min(MetricPoint.step),
            func.avg(MetricPoint.value),
            func.min(MetricPoint.value),
            func.max(MetricPoint.value),
            func.count(),
        )
    ).group_by(MetricPoint.run_id, MetricPoint.name, literal_column("bucket"))
    query = query.order_by(MetricPoint.run_id, MetricPoint.name, literal_column("bucket"))
    out: list[Series] = []
    current: Series | None = None
    for run_id, name, _b, step, mean, vmin, vmax, count in session.execute(query):
        if current is None or current.key != (run_id, name):
            current = Series(key=(run_id, name))
            out.append(current)
        current.step.append(int(step))
        current.value.append(finite_or_none(mean))
        current.min.append(finite_or_none(vmin))
        current.max.append(finite_or_none(vmax))
        current.count.append(int(count))
    return out, width


def aggregated_series(session: Session, flt: MetricFilter, max_points: int) -> tuple[list[Series], int]:
    """Across seeds, per (run label, metric): mean/min/max/sample-std per step, then bucketed.

    The per-step statistics are computed first (inner query) so a bucket's ``std`` is the average
    seed-to-seed spread, not the spread over time within the bucket. SQLite lacks ``stddev``, so
    variance is ``n/(n-1)·(E[v²] − E[v]²)`` on both backends and the square root is taken here.
    """
    rng = step_range(session, flt)
    if rng is None:
        return [], 1
    lo, hi = rng
    width = bucket_width(lo, hi, max_points)
    v = MetricPoint.value
    n = func.count(v)
    var = (func.avg(v * v) - func.avg(v) * func.avg(v)) * n * 1.0 / func.nullif(n - 1, 0)
    per_step = (
        flt.apply(
            select(
                Run.label.label("label"),
                MetricPoint.name.label("name"),
                MetricPoint.step.label("step"),
                func.avg(v).label("mean"),
                func.min(v).label("vmin"),
                func.max(v).label("vmax"),
                var.label("var"),
                n.label("n"),
            )
        )
        .group_by(Run.label, MetricPoint.name, MetricPoint.step)
        .subquery()
    )
    bucket = ((per_step.c.step - lo) // width) if width > 1 else per_step.c.step
    query = (
        select(
            per_step.c.label,
            per_step.c.name,
            bucket.label("bucket"),
            func.min(per_step.c.step),
            func.avg(per_step.c.mean),
            func.min(per_step.c.vmin),
            func.max(per_step.c.vmax),
            func.avg(per_step.c.var),
            func.max(per_step.c.n),
        )
        .group_by(per_step.c.label, per_step.c.name, literal_column("bucket"))
        .order_by(per_step.c.label, per_step.c.name, literal_column("bucket"))
    )
    out: list[Series] = []
    current: Series | None = None
    for label, name, _b, step, mean, vmin, vmax, var, count in session.execute(query):
        if current is None or current.key != (label, name):
            current = Series(key=(label, name))
            out.append(current)
        current.step.append(int(step))
        current.value.append(finite_or_none(mean))
        current.min.append(finite_or_none(vmin))
        current.max.append(finite_or_none(vmax))
        var_f = finite_or_none(var)
        current.std.append(None if var_f is None else max(var_f, 0.0) ** 0.5)
        current.count.append(int(count or 0))
    return out, width


def metric_names(session: Session, job_id: int) -> list[str]:
    return list(
        session.scalars(
            select(MetricPoint.name)
            .join(Run, Run.id == MetricPoint.run_id)
            .where(Run.job_id == job_id)
            .distinct()
            .order_by(MetricPoint.name)
        ).all()
    )


@dataclass
class FisherFilter:
    job_id: int
    run_ids: Sequence[int] = ()
    layers: Sequence[str] = ()
    methods: Sequence[str] = ()
    metrics: Sequence[str] = ()

    def apply(self, query: Select[Any]) -> Select[Any]:
        query = query.join(Run, Run.id == FisherValue.run_id).where(Run.job_id == self.job_id)
        for column, values in (
            (FisherValue.run_id, self.run_ids),
            (FisherValue.layer, self.layers),
            (FisherValue.method, self.methods),
            (FisherValue.metric, self.metrics),
        ):
            if values:
                query = query.where(column.in_(list(values)))
        return query


def fisher_series(session: Session, flt: FisherFilter) -> list[Series]:
    query = flt.apply(
        select(
            FisherValue.run_id,
            FisherValue.layer,
            FisherValue.method,
            FisherValue.metric,
            FisherValue.step,
            FisherValue.value,
        )
    ).order_by(
        FisherValue.run_id, FisherValue.layer, FisherValue.method, FisherValue.metric, FisherValue.step
    )
    out: list[Series] = []
    current: Series | None = None
    for run_id, layer, method, metric, step, value in session.execute(query):
        key = (run_id, layer, method, metric)
        if current is None or current.key != key:
            current = Series(key=key)
            out.append(current)
        current.step.append(int(step))
        current.value.append(finite_or_none(value))
    return out


def iter_metric_rows(session: Session, job_id: int, batch: int = 5000) -> Iterator[Sequence[Any]]:
    """All points of a job in (run, name, step) order, streamed with a server-side cursor."""
    query = (
        select(
            MetricPoint.run_id, MetricPoint.name, MetricPoint.step, MetricPoint.value, MetricPoint.wall_time
        )
        .join(Run, and_(Run.id == MetricPoint.run_id, Run.job_id == job_id))
        .order_by(MetricPoint.run_id, MetricPoint.name, MetricPoint.step)
        .execution_options(yield_per=batch)
    )
    result = session.execute(query)
    yield from result.partitions()


def iter_fisher_rows(session: Session, job_id: int, batch: int = 5000) -> Iterator[Sequence[Any]]:
    query = (
        select(
            FisherValue.run_id,
            FisherValue.step,
            FisherValue.layer,
            FisherValue.method,
            FisherValue.metric,
            FisherValue.value,
        )
        .join(Run, and_(Run.id == FisherValue.run_id, Run.job_id == job_id))
        .order_by(
            FisherValue.run_id, FisherValue.step, FisherValue.layer, FisherValue.method, FisherValue.metric
        )
        .execution_options(yield_per=batch)
    )
    yield from session.execute(query).partitions()


def count_metrics(session: Session, job_id: int) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(MetricPoint)
            .join(Run, Run.id == MetricPoint.run_id)
            .where(Run.job_id == job_id)
        )
        or 0
    )
