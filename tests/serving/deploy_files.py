"""Shared helpers of the deployment-file tests (tests/serving/test_dockerfile.py,
test_compose.py, test_app_json.py, test_workflows.py, test_slugignore.py): the deployment
files, checked for real, without a Docker engine.

Linters first: hadolint on the Dockerfile, actionlint on the GitHub workflow, check-jsonschema
with its vendored schemas (the Compose Specification, GitHub workflows) and with a schema of
Heroku's app.json written here, and Debian's docker-compose (v1) `config`, which resolves the
compose file (interpolation, the API_KEY guard) without talking to an engine.

Then what no schema knows: the files agree with each other and with the code. The compose
services and the image run the Procfile's commands, the image holds every module the service
imports and nothing of the training side, every variable app.json or compose sets is one that
mnist_api/config.py (or the Procfile) reads, Prometheus scrapes the compose service that
serves /metrics, and Grafana's provisioning finds Prometheus and the dashboard.

There is no Docker engine here: the image is never built and the stack never started.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mnist_api.config import PROJECT_ROOT, Settings

ROOT = PROJECT_ROOT
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
COMPOSE = ROOT / "docker-compose.yml"
APP_JSON = ROOT / "app.json"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
PROCFILE = ROOT / "Procfile"
CONFIG_PY = ROOT / "mnist_api" / "config.py"
CI_RUN = ROOT / ".ci" / "run"
PROMETHEUS_YML = ROOT / "monitoring" / "prometheus.yml"
DASHBOARD_JSON = ROOT / "monitoring" / "grafana-dashboard.json"
GRAFANA_PROVISIONING = ROOT / "monitoring" / "grafana" / "provisioning"
GRAFANA_DATASOURCE = GRAFANA_PROVISIONING / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = GRAFANA_PROVISIONING / "dashboards" / "mnist.yml"

PYTHON_VERSION = (ROOT / ".python-version").read_text().strip()

# What the image must hold to serve and to work: the entry points and the package, the model.
RUNTIME_SOURCES = {
    "api.py",
    "gunicorn.conf.py",
    "make_celery.py",
    "mnist_api",
    "models",
    "templates",
    "static",
}
# Variables of mnist_api/config.py that a Heroku user does not set in app.json, and why.
NOT_IN_APP_JSON = {
    "PORT": "Heroku sets it for each web dyno",
    "REDIS_URL": "the heroku-redis add-on sets it",
    "DATABASE_URL": "the heroku-postgresql add-on sets it",
    "MODELS_DIR": "the models ship in the slug at the default path",
    "PROMETHEUS_MULTIPROC_DIR": "gunicorn.conf.py sets it for its workers",
    "LOCAL_JOBS_DIR": "only without Redis; gunicorn.conf.py sets it (Heroku has Redis)",
}
COMPOSE_SERVICES = {"release", "web", "worker", "redis", "db", "prometheus", "grafana"}
# Settings app.json gives another value than the service's default, and why.
HEROKU_OVERRIDES = {
    "PROXY_FIX_X_FOR": ("1", "Heroku's router is one proxy hop that appends X-Forwarded-For"),
    "GUNICORN_KEEPALIVE": ("100", "longer than the router's 90 s idle timeout: it closes first"),
}


# --- helpers ---


def tool(name: str) -> str:
    """A command-line tool from the venv (requirements-dev.txt) or the system."""
    search = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    path = shutil.which(name, path=search)
    if path is None:
        pytest.fail(f"{name} is not installed: `make test` installs it (requirements-dev.txt)")
    return path


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def procfile() -> dict[str, str]:
    """Process type -> command, as Heroku reads the Procfile."""
    processes = {}
    for line in PROCFILE.read_text().splitlines():
        name, colon, command = line.partition(":")
        if colon and not line.lstrip().startswith("#"):
            processes[name.strip()] = command.strip()
    return processes


def procfile_defaults() -> dict[str, str]:
    """Variables the Procfile's shell reads, with their `${NAME:-default}` defaults."""
    text = PROCFILE.read_text()
    return dict(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-([^}]*)\}", text))


def config_variables() -> set[str]:
    """Every environment variable `Settings.from_env` reads: each field's declared variable,
    plus any other read in config.py's source (a call whose arguments start with
    `env, "NAME"`, or `env.get("NAME")`, e.g. API_KEY, read when API_KEYS is unset).
    """
    names: set[str] = {item.metadata["env"] for item in dataclasses.fields(Settings)}
    for node in ast.walk(ast.parse(CONFIG_PY.read_text())):
        if not isinstance(node, ast.Call):
            continue
        args = node.args
        if (
            len(args) >= 2
            and isinstance(args[0], ast.Name)
            and args[0].id == "env"
            and isinstance(args[1], ast.Constant)
            and isinstance(args[1].value, str)
        ):
            names.add(args[1].value)
        elif (
            isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "env"
            and args
            and isinstance(args[0], ast.Constant)
            and isinstance(args[0].value, str)
        ):
            names.add(args[0].value)
    return names
