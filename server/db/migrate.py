"""Apply Alembic migrations from code (``dykaf-lab migrate``, ``up``, tests).

The migration scripts live in the top-level ``migrations`` package; locating them through the
import system (not the current directory) is what makes this work from an installed wheel as well
as from a checkout.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from server.db.session import create_db_engine


def script_location() -> Path:
    spec = importlib.util.find_spec("migrations")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent
        if (path / "env.py").exists():
            return path
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    # ConfigParser interpolation: a literal '%' in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (creates the SQLite file if needed).

    Idempotent, and cheap when there is nothing to do: a database already at the head (every
    restart of ``dykaf-lab up``, every test database copied from a migrated template) is answered
    from its ``alembic_version`` row without running Alembic's environment.
    """
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            if revision == "head" and _at_head(conn, cfg):
                return
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def _at_head(conn: Connection, cfg: Config) -> bool:
    heads = ScriptDirectory.from_config(cfg).get_heads()
    return set(MigrationContext.configure(conn).get_current_heads()) == set(heads)


def downgrade(url: str, revision: str = "base") -> None:
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
