"""The SQL tables of the service (SQLAlchemy Core), created and changed only by Alembic.

`mnist_api/storage/migrations/versions/` holds the migrations that build exactly these tables; the
metadata here is what the code reads and writes, and what `alembic revision
--autogenerate` compares against.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

metadata = MetaData()

# One row per (key, image, version): the same key judging the same upload's answer by the
# same version again replaces its label. `input` is the normalised 28x28 image the model
# saw, as 784 little-endian float16 values (1,568 bytes); the raw upload is never kept.
feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_fingerprint", String(16), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("model_version", String(12), nullable=False),
    Column("label", SmallInteger, nullable=False),
    Column("predicted", SmallInteger, nullable=False),
    Column("correct", Boolean, nullable=False),
    Column("probability", Float, nullable=False),
    Column("input", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
    # The deployment chose the version that answered (False: the client pinned it). Only
    # routed answers' judgements may decide the retrain gate (migration 0003).
    Column("routed", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("key_fingerprint", "sha256", "model_version", name="uq_feedback_key_image"),
)

# Candidates proposed by the release phase (mnist_api/deployment/proposals.py): a version's card may
# ask to be put out as candidate; a row here means that was done (or tried) once, so the
# next release does not propose it again.
candidate_proposals = Table(
    "candidate_proposals",
    metadata,
    Column("version", String(12), primary_key=True),
    Column("strategy", String(16), nullable=False),
    Column("candidate_share", Float, nullable=False),
    Column("outcome", String(200), nullable=False),
    Column("proposed_at", DateTime(timezone=True), nullable=False),
)

# The deployment in force (issue 21): one row, `name` "current", holding the JSON document
# `Deployment.to_dict` writes. A change is an UPDATE ... WHERE deployment_id = <the id it
# was based on>, so of two admins changing it at once exactly one wins, whole.
deployment_state = Table(
    "deployment_state",
    metadata,
    Column("name", String(16), primary_key=True),
    Column("deployment_id", String(12), nullable=False),
    Column("document", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Every change of the deployment, in the same transaction as the change itself: who (an
# admin's name or keyed fingerprint, "cli", "guard", "release", ...), why, when, and the
# deployment that resulted (the JSON entry GET /deployment/history answers).
deployment_history = Table(
    "deployment_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("deployment_id", String(12), nullable=False),
    Column("reason", String(16), nullable=False),
    Column("updated_by", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("entry", Text, nullable=False),
)

# The evidence of each deployment, summed over every worker: requests, low_confidence,
# errors, feedback, correct per version (what the guard and the bandit read).
deployment_counts = Table(
    "deployment_counts",
    metadata,
    Column("deployment_id", String(12), primary_key=True),
    # `<version>/<key fingerprint>`: evidence is counted per version and key.
    Column("version", String(64), primary_key=True),
    Column("field", String(16), primary_key=True),
    Column("count", BigInteger, nullable=False),
)
