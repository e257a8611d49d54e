"""Feedback remembers whether the deployment routed the answer it judges.

The retrain gate's holdout counts only judgements of answers the deployment chose (issue 21:
a client that pins `?model_version=` or a V2 `versions/<v>` path decides which version
answers, so its feedback is not evidence about the deployment). Rows stored before this
revision cannot tell, and count as pinned: they still train, they never gate.

Revision ID: 0003_feedback_routed
Revises: 0002_deployments
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_feedback_routed"
down_revision = "0002_deployments"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add `feedback.routed` (false for the rows already there)."""
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(
            sa.Column("routed", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    """Drop `feedback.routed`."""
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("routed")
