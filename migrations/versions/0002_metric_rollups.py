"""Metric rollups (pre-bucketed series of ended runs) and runs.rollup_built.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DOUBLE = sa.Float(precision=53)


def upgrade() -> None:
    op.create_table(
        "metric_rollups",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("step_first", sa.Integer(), nullable=False),
        sa.Column("step_last", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("n_value", sa.Integer(), nullable=False),
        sa.Column("sum_value", DOUBLE, nullable=True),
        sa.Column("min_value", DOUBLE, nullable=True),
        sa.Column("max_value", DOUBLE, nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_metric_rollups_run_id_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "name", "width", "bucket", name="pk_metric_rollups"),
    )
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("rollup_built", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("rollup_built")
    op.drop_table("metric_rollups")
