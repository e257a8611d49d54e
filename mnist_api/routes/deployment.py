"""The deployment routes: read it with an API key, change it with an admin key."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint
from flask import request

from mnist_api.errors import InvalidDeployment
from mnist_api.extensions import get_deployments, get_router
from mnist_api.http import schemas
from mnist_api.http.auth import admin_caller, api_key_auth

bp = APIBlueprint("deployment", __name__, tag="Deployments")

HISTORY_DEFAULT = 20
HISTORY_MAX = 100


def _answer(deployment: Any) -> dict[str, Any]:
    """Serve the change in this worker now (others pick it up within a refresh)."""
    get_router().use(deployment)
    return get_deployments().describe(deployment)


@bp.get("/deployment")
@bp.auth_required(api_key_auth)
@bp.output(schemas.DeploymentState)
@bp.doc(
    summary="The deployment in force",
    description="Which version is stable, the candidate, the strategy and the guard settings.",
    responses=[401, 503],
)
def get_deployment() -> dict[str, Any]:
    """What this worker serves (re-read from the store every DEPLOYMENT_REFRESH_SECONDS)."""
    return get_deployments().describe(get_router().deployment)


@bp.put("/deployment")
@bp.auth_required(api_key_auth)
@bp.output(schemas.DeploymentState)
@bp.doc(
    summary="Change the deployment (admin key)",
    description=(
        "A JSON object with the fields to set. Every change gets a new id and an entry in the "
        "history (`reason: manual`). An invalid change is `400 invalid_deployment` and "
        "changes nothing; with Redis down it is `503 deployment_unavailable`."
    ),
    responses=[400, 401, 403, 503],
)
@schemas.documents_json_body(schemas.DeploymentChange)
def put_deployment() -> dict[str, Any]:
    """Validate and apply a change atomically; answer the new deployment."""
    by = admin_caller()
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise InvalidDeployment("Send a JSON object with the fields to change.")
    return _answer(get_deployments().apply(body, by=by, reason="manual"))


@bp.post("/deployment/promote")
@bp.auth_required(api_key_auth)
@bp.output(schemas.DeploymentState)
@bp.doc(
    summary="Promote the candidate to stable (admin key)",
    description="The candidate becomes stable, strategy `single`; the old stable is kept "
    "for a rollback.",
    responses=[400, 401, 403, 503],
)
def promote() -> dict[str, Any]:
    """The candidate becomes stable."""
    return _answer(get_deployments().promote(by=admin_caller()))


@bp.post("/deployment/rollback")
@bp.auth_required(api_key_auth)
@bp.output(schemas.DeploymentState)
@bp.doc(
    summary="Bring the previous stable back (admin key)",
    description=(
        "The stable version before the last promotion comes back, strategy `single`. Without "
        "an earlier stable, a running experiment ends (`single` on the current stable)."
    ),
    responses=[400, 401, 403, 503],
)
def rollback() -> dict[str, Any]:
    """The previous stable comes back."""
    return _answer(get_deployments().rollback(by=admin_caller()))


@bp.get("/deployment/history")
@bp.auth_required(api_key_auth)
@bp.input(schemas.HistoryQuery, location="query", arg_name="query")
@bp.output(schemas.DeploymentHistory)
@bp.doc(
    summary="The last changes of the deployment, newest first",
    description="Who (the admin's name from ADMIN_API_KEYS, or a fingerprint keyed with "
    "SECRET_KEY; `cli`, `guard`, `release`, `retrain`), when, why (manual, promote, "
    "rollback, guard, auto_promote, with a detail sentence) and the deployment that resulted.",
    responses=[401, 503],
)
def history(query: dict[str, Any]) -> dict[str, Any]:
    """Up to `limit` entries."""
    raw = str(query.get("limit", ""))
    limit = int(raw) if raw.isdigit() else HISTORY_DEFAULT
    return {"history": get_deployments().history(max(1, min(limit, HISTORY_MAX)))}
