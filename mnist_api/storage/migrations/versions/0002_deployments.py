"""Deployments: the deployment in force, its history and its counters, in the database.

Until now they lived in Redis (or in each process without it): a flush or a restart of
Redis undid every promotion, and workers without Redis disagreed (issue 21).

Revision ID: 0002_deployments
Revises: 0001_feedback
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_deployments"
down_revision = "0001_feedback"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create `deployment_state`, `deployment_history` and `deployment_counts`."""
    op.create_table(
        "deployment_state",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("deployment_id", sa.String(12), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "deployment_history",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("deployment_id", sa.String(12), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
    )
    op.create_table(
        "deployment_counts",
        sa.Column("deployment_id", sa.String(12), primary_key=True),
        # `<version>/<key fingerprint>`: evidence is counted per version and key.
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("field", sa.String(16), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    """Drop the three tables."""
    op.drop_table("deployment_counts")
    op.drop_table("deployment_history")
    op.drop_table("deployment_state")
