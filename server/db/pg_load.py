"""PostgreSQL bulk loads: the per-connection temporary tables metric writes ``COPY`` into.

Kept apart from ``server.crud.metrics`` (which runs the loads) because the engine's ``connect``
hook in ``server.db.session`` creates the tables, and the session module must not import crud.
"""

from __future__ import annotations

from typing import Any

# PostgreSQL: COPY (binary) into a per-connection temporary table, then one merge statement in
# primary-key order. COPY is the fastest way in; the merge gives ON CONFLICT semantics (COPY has
# none) and the ordering turns index maintenance into mostly-sequential B-tree appends.
PG_LOADS = {
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


LOAD_TABLES_READY = "dykaf_load_tables"


def prepare_pg_connection(dbapi_conn: Any, record: Any) -> None:
    """Pool ``connect`` hook: create the session's load tables once per connection (committed),
    instead of a ``CREATE TEMP TABLE IF NOT EXISTS`` round trip in every flush."""
    with dbapi_conn.cursor() as cur:
        for create, *_ in PG_LOADS.values():
            cur.execute(create)
    dbapi_conn.commit()
    record.info[LOAD_TABLES_READY] = True
