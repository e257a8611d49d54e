"""Public operational routes: liveness and readiness (no key, cheap, never cached)."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint

from mnist_api.errors import NotReady
from mnist_api.extensions import get_cache, get_feedback_store, get_jobs, get_model, get_router
from mnist_api.http import schemas

bp = APIBlueprint("ops", __name__, tag="Operations")


@bp.get("/healthz")
@bp.output(schemas.Health)
@bp.doc(summary="Liveness: the process serves")
def healthz() -> dict[str, str]:
    """Always ok while the process answers."""
    return {"status": "ok"}


@bp.get("/readyz")
@bp.output(schemas.Readiness)
@bp.doc(summary="Readiness: the model is loaded and warmed up", responses=[503])
def readyz() -> dict[str, Any]:
    """200 with the state of each part once the model can answer; 503 before."""
    model = get_model()
    if not model.ready:
        raise NotReady()
    return {
        "status": "ready",
        "model": model.full_version,
        "cache": get_cache().status(),
        "broker": get_jobs().broker_status(),
        # Reported, never failing readiness: only /feedback needs the database.
        "database": get_feedback_store().status(),
        # The deployment's store is the same database: when it is down, every worker goes on
        # serving the deployment it last read ("stale") and admin changes answer 503.
        "deployment": get_router().store_status(),
    }
