"""The deployment files, checked for real, without a Docker engine (shared helpers:
`tests/serving/deploy_files.py`): the GitHub workflows (actionlint and
the vendored schemas) and what CI runs.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.serving.deploy_files import (
    CI_RUN,
    PYTHON_VERSION,
    ROOT,
    WORKFLOW,
    assert_ok,
    load_yaml,
    run,
    tool,
)

# --- .github/workflows/ci.yml ---


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    document = load_yaml(WORKFLOW)
    assert isinstance(document, dict)
    return document


def test_actionlint_passes() -> None:
    assert_ok(run(tool("actionlint"), "-no-color", "-oneline", WORKFLOW))


RETRAIN_WORKFLOW = ROOT / ".github" / "workflows" / "retrain.yml"


def test_retrain_workflow_passes_actionlint_and_the_schemas() -> None:
    assert_ok(run(tool("actionlint"), "-no-color", "-oneline", RETRAIN_WORKFLOW))
    for schema in ("vendor.github-workflows", "custom.github-workflows-require-timeout"):
        assert_ok(run(tool("check-jsonschema"), "--builtin-schema", schema, RETRAIN_WORKFLOW))


def test_retrain_workflow_runs_the_pipeline_on_the_secret_database() -> None:
    workflow = load_yaml(RETRAIN_WORKFLOW)
    triggers = workflow.get("on", workflow.get(True))
    assert {"schedule", "workflow_dispatch"} <= set(triggers)
    runs = " ".join(str(s.get("run", "")) for s in steps(workflow))
    assert "python -m training.retrain" in runs
    assert "secrets.DATABASE_URL" in RETRAIN_WORKFLOW.read_text()
    uses = [str(s.get("uses", "")) for s in steps(workflow)]
    assert any(u.startswith("peter-evans/create-pull-request@") for u in uses)


@pytest.mark.parametrize(
    "schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"]
)
def test_workflow_matches_the_vendored_schemas(schema: str) -> None:
    assert_ok(run(tool("check-jsonschema"), "--builtin-schema", schema, WORKFLOW))


def steps(workflow: dict[Any, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def test_workflow_triggers_permissions_and_limits(workflow: dict[Any, Any]) -> None:
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    assert workflow["permissions"] == {"contents": "read"}
    assert workflow["concurrency"]["group"]
    for job in workflow["jobs"].values():
        assert job["runs-on"] == "ubuntu-latest"
        assert 0 < job["timeout-minutes"] <= 90


def test_workflow_has_a_redis_service(workflow: dict[Any, Any]) -> None:
    services = [job.get("services", {}) for job in workflow["jobs"].values()]
    images = [s["redis"]["image"] for s in services if "redis" in s]
    assert images and images[0].startswith("redis:")


def test_workflow_uses_the_project_python_with_a_pip_cache(workflow: dict[Any, Any]) -> None:
    setups = [
        s for s in steps(workflow) if str(s.get("uses", "")).startswith("actions/setup-python@")
    ]
    assert len(setups) == 1
    assert str(setups[0]["with"]["python-version"]) == PYTHON_VERSION
    assert setups[0]["with"]["cache"] == "pip"


def test_workflow_runs_what_ci_runs(workflow: dict[Any, Any]) -> None:
    """`make test`, via .ci/run or by running each of its commands (apt under sudo)."""
    runs = [str(s["run"]) for s in steps(workflow) if "run" in s]
    commands = [re.sub(r"^sudo (-E )?", "", line.strip()) for r in runs for line in r.splitlines()]
    if any(".ci/run" in command for command in commands):
        return
    ci_lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    ci_commands = [line for line in ci_lines if line and not line.startswith(("#", "set ", "cd "))]
    assert "make test" in ci_commands
    missing = [command for command in ci_commands if command not in commands]
    assert not missing, f"the workflow does not run {missing} as .ci/run does"
    apt = next(r for r in runs if "install-system-deps.sh" in r)
    assert apt.strip().startswith("sudo "), "apt-get needs root on the runner"
