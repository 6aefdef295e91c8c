"""Metric and Fisher rows: batched idempotent writes, downsampled and aggregated reads, streams.

Writes go through one transaction per flush: on PostgreSQL ``COPY`` (binary) into a temporary
table and one ``INSERT … SELECT … ON CONFLICT DO NOTHING`` merge (faster than a single
``INSERT … SELECT unnest(arrays)`` and far faster than one INSERT per point; BENCHMARKS.md), on
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

from server.db.models import FisherValue, MetricPoint, MetricRollup, Run
from server.db.pg_load import LOAD_TABLES_READY, PG_LOADS
from server.downsample import ROLLUP_WIDTHS, bucket_width, finite_or_none, rollup_plan

MetricRow = tuple[int, str, int, float | None, float]  # run_id, name, step, value, wall_time
FisherRowT = tuple[int, int, str, str, str, float | None]  # run_id, step, layer, method, metric, value

_SQLITE_METRICS = (
    "INSERT INTO metrics (run_id, name, step, value, wall_time) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_SQLITE_FISHER = (
    "INSERT INTO fisher (run_id, step, layer, method, metric, value) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)


def _pg_copy_merge(conn: Connection, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    create, copy_sql, types, merge = PG_LOADS[table]
    dbapi = conn.dialect.loaded_dbapi
    try:
        with conn.connection.driver_connection.cursor() as cur:  # the same transaction as ``conn``
            if not conn.connection.info.get(LOAD_TABLES_READY):  # an engine without the hook
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

    def run_condition(self, column: Any) -> Any:
        """``column`` (a run id column) restricted to this job's (selected) runs."""
        runs = select(Run.id).where(Run.job_id == self.job_id)
        if self.run_ids:
            runs = runs.where(Run.id.in_(list(self.run_ids)))
        return column.in_(runs.scalar_subquery())

    def apply(self, query: Select[Any]) -> Select[Any]:
        query = query.where(self.run_condition(MetricPoint.run_id))
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


@dataclass
class Plan:
    """How a downsampled read is computed: bucket width, and the rollup level used (None: raw)."""

    width: int
    rollup: int | None
    step_min: int
    step_max: int

    @property
    def source(self) -> str:
        return "raw" if self.rollup is None else f"rollup/{self.rollup}"


def _rollups_cover(session: Session, flt: MetricFilter) -> bool:
    """Rollups answer the read when it has no step window and every selected run has them."""
    if flt.step_min is not None or flt.step_max is not None:
        return False
    missing = session.scalar(
        select(func.count()).where(flt.run_condition(Run.id), Run.rollup_built.is_(False))
    )
    return not missing


def plan_read(session: Session, flt: MetricFilter, max_points: int) -> Plan | None:
    """Step range and bucket width of a read (None when nothing matches)."""
    use_rollups = _rollups_cover(session, flt)
    if use_rollups:
        query = select(func.min(MetricRollup.step_first), func.max(MetricRollup.step_last)).where(
            flt.run_condition(MetricRollup.run_id), MetricRollup.width == ROLLUP_WIDTHS[-1]
        )
        if flt.names:
            query = query.where(MetricRollup.name.in_(list(flt.names)))
    else:
        query = flt.apply(select(func.min(MetricPoint.step), func.max(MetricPoint.step)))
    lo, hi = session.execute(query).one()
    if lo is None:
        return None
    lo, hi = int(lo), int(hi)
    plan = rollup_plan(lo, hi, max_points) if use_rollups else None
    if plan is None:
        return Plan(width=bucket_width(lo, hi, max_points), rollup=None, step_min=lo, step_max=hi)
    level, width = plan
    return Plan(width=width, rollup=level, step_min=lo, step_max=hi)


def _run_buckets(flt: MetricFilter, plan: Plan) -> Any:
    """Subquery: one row per (run, metric, bucket) with first step, count, non-null count, sum, min,
    max — from the raw points or from the rollup level; identical results either way."""
    if plan.rollup is None:
        point = MetricPoint
        bucket = (point.step // plan.width) if plan.width > 1 else point.step
        query = flt.apply(
            select(
                point.run_id.label("run_id"),
                point.name.label("name"),
                bucket.label("bkt"),
                func.min(point.step).label("step"),
                func.count().label("n"),
                func.count(point.value).label("nv"),
                func.sum(point.value).label("total"),
                func.min(point.value).label("vmin"),
                func.max(point.value).label("vmax"),
            )
        ).group_by(point.run_id, point.name, literal_column("bkt"))
        return query.subquery("run_buckets")
    r = MetricRollup
    ratio = plan.width // plan.rollup
    query = select(
        r.run_id.label("run_id"),
        r.name.label("name"),
        (r.bucket // ratio).label("bkt") if ratio > 1 else r.bucket.label("bkt"),
        func.min(r.step_first).label("step"),
        func.sum(r.n).label("n"),
        func.sum(r.n_value).label("nv"),
        func.sum(r.sum_value).label("total"),
        func.min(r.min_value).label("vmin"),
        func.max(r.max_value).label("vmax"),
    ).where(flt.run_condition(r.run_id), r.width == plan.rollup)
    if flt.names:
        query = query.where(r.name.in_(list(flt.names)))
    query = query.group_by(r.run_id, r.name, literal_column("bkt"))
    return query.subquery("run_buckets")


def _mean(total: Any, nv: Any) -> float | None:
    if total is None or not nv:
        return None
    return finite_or_none(float(total) / int(nv))


def downsampled_series(
    session: Session, flt: MetricFilter, max_points: int
) -> tuple[list[Series], Plan | None]:
    """Per (run, metric) series in at most ``max_points`` step buckets."""
    plan = plan_read(session, flt, max_points)
    if plan is None:
        return [], None
    b = _run_buckets(flt, plan)
    query = select(b.c.run_id, b.c.name, b.c.step, b.c.n, b.c.nv, b.c.total, b.c.vmin, b.c.vmax).order_by(
        b.c.run_id, b.c.name, b.c.bkt
    )
    out: list[Series] = []
    current: Series | None = None
    for run_id, name, step, n, nv, total, vmin, vmax in session.execute(query):
        if current is None or current.key != (run_id, name):
            current = Series(key=(run_id, name))
            out.append(current)
        current.step.append(int(step))
        current.value.append(_mean(total, nv))
        current.min.append(finite_or_none(vmin))
        current.max.append(finite_or_none(vmax))
        current.count.append(int(n))
    return out, plan


def aggregated_series(
    session: Session, flt: MetricFilter, max_points: int
) -> tuple[list[Series], Plan | None]:
    """Across seeds, per (run label, metric, bucket): the mean of the seeds' bucket means, the min
    and max over all seeds' points, and the sample standard deviation of the seeds' bucket means
    (unbucketed, that is the per-step spread across seeds). ``count`` is the number of seeds.

    SQLite lacks ``stddev``, so the variance is ``n/(n-1)·(E[x²] − E[x]²)`` on both backends and
    the square root is taken here.
    """
    plan = plan_read(session, flt, max_points)
    if plan is None:
        return [], None
    b = _run_buckets(flt, plan)
    x = b.c.total * 1.0 / func.nullif(b.c.nv, 0)
    n = func.count(x)
    var = (func.avg(x * x) - func.avg(x) * func.avg(x)) * n * 1.0 / func.nullif(n - 1, 0)
    query = (
        select(
            Run.label,
            b.c.name,
            func.min(b.c.step),
            func.avg(x),
            func.min(b.c.vmin),
            func.max(b.c.vmax),
            var,
            n,
        )
        .join(Run, Run.id == b.c.run_id)
        .group_by(Run.label, b.c.name, b.c.bkt)
        .order_by(Run.label, b.c.name, b.c.bkt)
    )
    out: list[Series] = []
    current: Series | None = None
    for label, name, step, mean, vmin, vmax, variance, count in session.execute(query):
        if current is None or current.key != (label, name):
            current = Series(key=(label, name))
            out.append(current)
        current.step.append(int(step))
        current.value.append(finite_or_none(mean))
        current.min.append(finite_or_none(vmin))
        current.max.append(finite_or_none(vmax))
        var_f = finite_or_none(variance)
        current.std.append(None if var_f is None else max(var_f, 0.0) ** 0.5)
        current.count.append(int(count or 0))
    return out, plan


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


@dataclass(frozen=True)  # hashable: the API's read cache keys on it
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
