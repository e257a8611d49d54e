"""Feedback: the label store, and the candidates the release phase proposed.

Revision ID: 0001_feedback
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_feedback"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create `feedback` and `candidate_proposals`."""
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key_fingerprint", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(12), nullable=False),
        sa.Column("label", sa.SmallInteger(), nullable=False),
        sa.Column("predicted", sa.SmallInteger(), nullable=False),
        sa.Column("correct", sa.Boolean(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("input", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint(
            "key_fingerprint", "sha256", "model_version", name="uq_feedback_key_image"
        ),
    )
    op.create_index("ix_feedback_updated_at", "feedback", ["updated_at"])
    op.create_table(
        "candidate_proposals",
        sa.Column("version", sa.String(12), primary_key=True),
        sa.Column("strategy", sa.String(16), nullable=False),
        sa.Column("candidate_share", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(200), nullable=False),
        sa.Column("proposed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Drop both tables."""
    op.drop_table("candidate_proposals")
    op.drop_index("ix_feedback_updated_at", table_name="feedback")
    op.drop_table("feedback")
