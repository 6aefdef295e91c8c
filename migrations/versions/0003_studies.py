"""Studies (several scales, equal-budget tuning, speed-up over a baseline) and jobs.study_id.

Revision ID: 0003_studies
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003_studies"
down_revision = "0002"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", JSONType, nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name="fk_studies_api_key_id_api_keys", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
    )
    op.create_index("ix_studies_name", "studies", ["name"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("study_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_jobs_study_id_studies", "studies", ["study_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index("ix_jobs_study_id", ["study_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_study_id")
        batch.drop_constraint("fk_jobs_study_id_studies", type_="foreignkey")
        batch.drop_column("study_id")
    op.drop_index("ix_studies_name", table_name="studies")
    op.drop_table("studies")
