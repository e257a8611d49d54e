"""The deployment files, checked for real, without a Docker engine (shared helpers:
`tests/serving/deploy_files.py`): docker-compose.yml (the Compose
Specification, docker-compose `config`), Prometheus and Grafana provisioning.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.serving.deploy_files import (
    COMPOSE,
    COMPOSE_SERVICES,
    DASHBOARD_JSON,
    GRAFANA_DASHBOARDS,
    GRAFANA_DATASOURCE,
    PROMETHEUS_YML,
    ROOT,
    assert_ok,
    load_yaml,
    procfile,
    run,
    tool,
)
from tests.serving.test_dockerfile import dockerfile, env_values

# --- docker-compose.yml ---


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    value = compose["services"][name]
    assert isinstance(value, dict)
    return value


def container_ports(spec: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in spec.get("ports", []):
        target = entry["target"] if isinstance(entry, dict) else str(entry).split(":")[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def bind_mounts(spec: dict[str, Any]) -> dict[str, str]:
    """Container path -> repository path, for the service's `./...` bind mounts."""
    mounts = {}
    for volume in spec.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if source.startswith("."):
            mounts[rest.split(":")[0]] = str(PurePosixPath(source))
    return mounts


def test_compose_matches_the_compose_spec() -> None:
    checker = tool("check-jsonschema")
    assert_ok(run(checker, "--builtin-schema", "vendor.compose-spec", COMPOSE))


def compose_command() -> list[str] | None:
    """Debian's docker-compose (v1), else the `docker compose` plugin; None if neither."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and run(docker, "compose", "version").returncode == 0:
        return [docker, "compose"]
    return None


def test_compose_config_resolves_and_requires_api_key() -> None:
    """`docker-compose config`: parses, interpolates, and refuses to run without API_KEY or
    SECRET_KEY."""
    command = compose_command()
    if command is None:
        pytest.fail(
            "docker-compose is not installed: run scripts/install-system-deps.sh "
            "(Debian package 'docker-compose'; no engine is needed for `config`)"
        )
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COMPOSE_", "API_KEY", "SECRET_KEY", "POSTGRES_"))
    }
    base.pop("CELERY_CONCURRENCY", None)
    args = [*command, "--project-directory", ROOT, "-f", COMPOSE, "config"]

    resolved = run(*args, env={**base, "API_KEY": "compose-test-key", "SECRET_KEY": "s"})
    assert_ok(resolved)
    services = yaml.safe_load(resolved.stdout)["services"]
    assert set(services) >= COMPOSE_SERVICES
    for name in ("web", "worker"):
        environment = services[name]["environment"]
        assert environment["API_KEY"] == "compose-test-key"
    worker = services["worker"]["command"]
    worker = worker if isinstance(worker, str) else shlex.join(worker)
    assert "--concurrency 2" in worker, "CELERY_CONCURRENCY defaults to 2, as in the Procfile"

    missing = run(*args, env={**base, "SECRET_KEY": "s"})
    assert missing.returncode != 0, "compose must refuse to start without API_KEY"
    assert "set API_KEY" in missing.stdout + missing.stderr
    no_secret = run(*args, env={**base, "API_KEY": "compose-test-key"})
    assert no_secret.returncode != 0, "compose must refuse to start without SECRET_KEY"
    assert "set SECRET_KEY" in no_secret.stdout + no_secret.stderr


def test_compose_keeps_the_data_on_postgres_in_a_named_volume(compose: dict[str, Any]) -> None:
    """Issue 22: feedback and the deployment outlive `docker compose up --force-recreate`:
    web, worker and the release phase use the `db` service, whose data is a named volume."""
    db = service(compose, "db")
    mounts = [str(volume).split(":") for volume in db["volumes"]]
    assert ["postgres-data", "/var/lib/postgresql/data"] in mounts
    assert "postgres-data" in compose["volumes"]
    for name in ("release", "web", "worker"):
        url = urlsplit(str(service(compose, name)["environment"]["DATABASE_URL"]))
        assert (url.scheme, url.hostname, url.port) == ("postgresql", "db", 5432), name
    for name in ("web", "worker"):
        waits = service(compose, name)["depends_on"]
        assert waits["release"] == {"condition": "service_completed_successfully"}
        assert waits["db"] == {"condition": "service_healthy"}
    release = service(compose, "release")["command"]
    assert release[:2] == ["sh", "-c"] and release[2] == procfile()["release"], (
        "the release service must run the Procfile's release line"
    )


def test_compose_has_the_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= COMPOSE_SERVICES


@pytest.mark.parametrize("name", ["web", "worker"])
def test_compose_app_services_run_the_procfile_from_this_image(
    compose: dict[str, Any], name: str, read_variables: set[str]
) -> None:
    spec = service(compose, name)
    build = spec["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert PurePosixPath(context) == PurePosixPath("."), "built from this repository's Dockerfile"
    assert spec["command"] == procfile()[name], f"{name}: not the Procfile's {name} line"

    environment = spec["environment"]
    assert isinstance(environment, dict)
    assert str(environment["API_KEY"]).startswith("${API_KEY:?"), "API_KEY must be required"
    unknown = set(environment) - read_variables
    assert not unknown, f"{name} sets {sorted(unknown)}, which the service never reads"

    redis = urlsplit(environment["REDIS_URL"])
    assert redis.hostname in compose["services"], "REDIS_URL must name the compose service"
    assert redis.port == 6379
    assert spec["depends_on"][redis.hostname]["condition"] == "service_healthy"
    assert service(compose, redis.hostname)["healthcheck"]["test"], "redis needs a healthcheck"


def test_compose_web_and_worker_share_one_image(compose: dict[str, Any]) -> None:
    assert service(compose, "web")["image"] == service(compose, "worker")["image"]
    # The image's HEALTHCHECK asks /healthz, which only web serves.
    assert service(compose, "worker")["healthcheck"] == {"disable": True}


def test_prometheus_scrapes_the_compose_web_service(compose: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS_YML)
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert targets
    for target in targets:
        host, _, port = target.rpartition(":")
        assert host in compose["services"], f"scrape target {target}: no such compose service"
        assert int(port) in container_ports(service(compose, host)), f"{host} serves no {port}"
    web_port = int(env_values(dockerfile())["PORT"])
    assert f"web:{web_port}" in targets


def test_prometheus_container_gets_its_config_and_rules(compose: dict[str, Any]) -> None:
    spec = service(compose, "prometheus")
    mounts = bind_mounts(spec)
    flags = [arg for arg in spec.get("command", []) if arg.startswith("--config.file=")]
    config_path = flags[0].partition("=")[2] if flags else "/etc/prometheus/prometheus.yml"
    assert mounts.get(config_path) == "monitoring/prometheus.yml"
    # rule_files are relative to the config file: each must be mounted beside it.
    for rule_file in load_yaml(PROMETHEUS_YML)["rule_files"]:
        inside = str(PurePosixPath(config_path).parent / rule_file)
        assert mounts.get(inside) == f"monitoring/{rule_file}", f"{rule_file} not at {inside}"


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name in compose["services"]:
        for source in bind_mounts(service(compose, name)).values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_grafana_provisioning_finds_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    spec = service(compose, "grafana")
    mounts = bind_mounts(spec)
    assert mounts.get("/etc/grafana/provisioning") == "monitoring/grafana/provisioning"

    datasources = load_yaml(GRAFANA_DATASOURCE)
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"], "a fixed uid, for anything that names the datasource"
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.hostname in compose["services"]
    assert url.port == 9090
    # The dashboard's datasource variable has no current value: Grafana takes the default.
    variables = json.loads(DASHBOARD_JSON.read_text())["templating"]["list"]
    selector = next(v for v in variables if v["type"] == "datasource")
    assert selector["query"] == source["type"]
    assert source["isDefault"] is True
    # $__rate_interval needs Grafana to know the scrape interval.
    scrape_interval = load_yaml(PROMETHEUS_YML)["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape_interval

    dashboards = load_yaml(GRAFANA_DASHBOARDS)
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    folder = PurePosixPath(provider["options"]["path"])
    mounted = [
        inside for inside, src in mounts.items() if src == "monitoring/grafana-dashboard.json"
    ]
    assert mounted, "the dashboard JSON is not mounted into grafana"
    assert all(PurePosixPath(inside).parent == folder for inside in mounted)
    home = spec.get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or home in mounted
