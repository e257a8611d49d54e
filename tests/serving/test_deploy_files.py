"""The deployment files, checked for real, without a Docker engine.

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
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from mnist_api import create_app
from mnist_api.config import PROJECT_ROOT, ConfigError, Settings
from mnist_api.inference.registry import ModelRegistry

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


@pytest.fixture(scope="module")
def read_variables() -> set[str]:
    names = config_variables() | set(procfile_defaults())
    # The parser must see the settings it is there for, or every check below is vacuous.
    assert {"API_KEY", "API_KEYS", "PORT", "WEB_CONCURRENCY", "REDIS_URL", "RATE_LIMIT"} <= names
    return names


# --- Dockerfile ---


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            _, found, text = text.partition(" CMD ")
            if not found:
                return None
        text = text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        return [str(item) for item in value]


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    buffer = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1].strip() + " "
            continue
        keyword, _, args = (buffer + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    return instructions


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.args):
                name, _, value = item.partition("=")
                values[name] = value
    return values


def copy_sources(instructions: list[Instruction]) -> list[str]:
    sources: list[str] = []
    for instruction in instructions:
        if instruction.keyword in ("COPY", "ADD"):
            words = [word for word in shlex.split(instruction.args) if not word.startswith("--")]
            sources += [word.rstrip("/") for word in words[:-1]]
    return sources


def test_hadolint_passes() -> None:
    args: list[str | Path] = [tool("hadolint")]
    if HADOLINT_CONFIG.exists():
        args += ["--config", HADOLINT_CONFIG]
    assert_ok(run(*args, "--no-color", DOCKERFILE))


def test_image_is_python_of_the_project_slim_and_single_stage() -> None:
    froms = [i.args for i in dockerfile() if i.keyword == "FROM"]
    assert froms == [f"python:{PYTHON_VERSION}-slim"]
    # The Heroku slug gets the same Python.
    assert (ROOT / "runtime.txt").read_text().strip() == f"python-{PYTHON_VERSION}"


def test_image_installs_only_the_deployed_requirements_before_the_code() -> None:
    instructions = dockerfile()
    text = "\n".join(f"{i.keyword} {i.args}" for i in instructions).lower()
    for forbidden in ("requirements-train", "requirements-dev", "tensorflow", "keras"):
        assert forbidden not in text, f"the image must not install {forbidden}"

    pip_runs = [n for n, i in enumerate(instructions) if "pip install" in i.args]
    assert len(pip_runs) == 1, "one pip install, of requirements.txt"
    command = instructions[pip_runs[0]].args.split("&&")
    pip = shlex.split(next(part for part in command if "pip install" in part))
    options = pip[pip.index("install") + 1 :]
    assert "--no-cache-dir" in options
    options.remove("--no-cache-dir")
    assert options == ["-r", "requirements.txt"], f"pip installs {options}, not only the file"

    def first_copy_of(source: str) -> int:
        return next(
            n
            for n, i in enumerate(instructions)
            if i.keyword == "COPY" and source in copy_sources([i])
        )

    # Layer order for the cache: the requirements layer comes before any code.
    code = min(first_copy_of(source) for source in RUNTIME_SOURCES)
    assert first_copy_of("requirements.txt") < pip_runs[0] < code


def root_modules_imported_by_the_service() -> set[str]:
    """Modules of the repository root that the service's code imports (it must ship them)."""
    files = [ROOT / "api.py", ROOT / "make_celery.py", ROOT / "gunicorn.conf.py"]
    files += sorted((ROOT / "mnist_api").rglob("*.py"))
    modules: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if (ROOT / f"{m}.py").is_file() or (ROOT / m).is_dir()}


def test_image_copies_what_the_service_needs_and_nothing_else() -> None:
    sources = copy_sources(dockerfile())
    code = set(sources) - {"requirements.txt"}
    assert code == RUNTIME_SOURCES, f"COPY {sorted(code)}; the service runs from exactly these"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    needed = {
        f"{m}.py" if (ROOT / f"{m}.py").is_file() else m
        for m in root_modules_imported_by_the_service()
    }
    assert needed <= code, f"the service imports {sorted(needed - code)}, which the image lacks"


def test_image_runs_as_a_user_that_is_not_root() -> None:
    instructions = dockerfile()
    users = [i.args for i in instructions if i.keyword == "USER"]
    assert users, "no USER: the service would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # The last USER comes after every RUN: nothing at run time is done as root.
    last_user = max(n for n, i in enumerate(instructions) if i.keyword == "USER")
    assert all(i.keyword != "RUN" for i in instructions[last_user:])
    if user.isdigit():  # a numeric USER must be the uid of the user the image creates
        created = " ".join(i.args for i in instructions if "useradd" in i.args)
        assert re.search(rf"(--uid|-u)[ =]{user}\b", created), f"no user with uid {user}"


def test_image_port_matches_the_service_default() -> None:
    instructions = dockerfile()
    port = env_values(instructions).get("PORT")
    assert port == str(Settings().port), "ENV PORT must be the port gunicorn.conf.py binds to"
    exposed = [word for i in instructions if i.keyword == "EXPOSE" for word in i.args.split()]
    assert exposed == [port]


def test_image_default_command_is_the_procfile_web_line() -> None:
    cmd = [i for i in dockerfile() if i.keyword == "CMD"]
    assert len(cmd) == 1
    assert cmd[0].exec_form() == shlex.split(procfile()["web"])
    assert not [i for i in dockerfile() if i.keyword == "ENTRYPOINT"]


def test_image_build_runs_the_procfile_release_check() -> None:
    release = procfile().get("release")
    if release is None:
        pytest.skip("the Procfile has no release phase")
    runs = " && ".join(i.args for i in dockerfile() if i.keyword == "RUN")
    # The model check; the release's database steps (migrate, propose) need the runtime's
    # DATABASE_URL, so they cannot run at build time.
    check = release.split(" && ")[0]
    assert check in runs, f"the image build should run `{check}` as Heroku's release does"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_healthcheck_asks_healthz_on_port(health_server: http.server.HTTPServer) -> None:
    """The HEALTHCHECK command itself, run here: 0 on a 200 from /healthz, else non-zero."""
    checks = [i for i in dockerfile() if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    command = checks[0].exec_form()
    assert command is not None, "HEALTHCHECK CMD in exec form"
    assert command[0] == "python", "slim has no curl: the check uses the image's Python"
    command[0] = sys.executable
    port = str(health_server.server_address[1])
    environment = {**os.environ, "PORT": port}

    _Health.status = 200
    assert_ok(run(*command, env=environment))
    _Health.status = 503
    assert run(*command, env=environment).returncode != 0
    health_server.shutdown()
    health_server.server_close()
    assert run(*command, env=environment).returncode != 0, "nothing listening must fail"


# --- .dockerignore ---


def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match, plus `**`) as a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context (the last match wins)."""
    parts = PurePosixPath(path).parts
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = _pattern_regex(pattern.strip().strip("/"))
        # A pattern that matches a folder leaves out everything under it.
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/http/test_api.py",
        "mnist_api/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "models/fe5e4f4d480b/mnist_cnn.keras",
        "requirements-train.txt",
        "training/data.py",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert dockerignored(path, dockerignore_patterns())


@pytest.mark.parametrize(
    "path",
    [
        "requirements.txt",
        "api.py",
        "gunicorn.conf.py",
        "make_celery.py",
        "mnist_api/app.py",
        "static/app.js",
        "templates/index.html",
        "models/fe5e4f4d480b/mnist_cnn_int8.tflite",
        "models/fe5e4f4d480b/model_card.json",
    ],
)
def test_dockerignore_keeps_what_the_image_copies(path: str) -> None:
    assert not dockerignored(path, dockerignore_patterns())


def test_dockerignore_matcher_follows_docker_rules() -> None:
    """The matcher above, on Docker's documented examples, so the two tests mean something."""
    assert dockerignored("a/b/__pycache__/x.pyc", ["**/__pycache__"])
    assert dockerignored("x.md", ["*.md"])
    assert not dockerignored("docs/x.md", ["*.md"])
    assert not dockerignored("README.md", ["*.md", "!README.md"])
    assert not dockerignored("models/a.tflite", ["models/*.keras"])


# --- docker-compose.yml ---


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = load_yaml(COMPOSE)
    assert isinstance(document, dict)
    return document


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


# --- app.json (Heroku) ---

APP_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Heroku app.json (the documented keys)",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "description", "repository", "buildpacks", "env", "formation"],
    "properties": {
        "name": {"type": "string", "minLength": 3, "maxLength": 30},
        "description": {"type": "string", "minLength": 1},
        "keywords": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "website": {"type": "string", "format": "uri"},
        "repository": {"type": "string", "format": "uri"},
        "logo": {"type": "string", "format": "uri"},
        "success_url": {"type": "string"},
        "stack": {"type": "string"},
        "image": {"type": "string"},
        "scripts": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"postdeploy": {"type": "string"}, "pr-predestroy": {"type": "string"}},
        },
        "buildpacks": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["url"],
                "properties": {"url": {"type": "string", "minLength": 1}},
            },
        },
        "env": {
            "type": "object",
            "propertyNames": {"pattern": "^[A-Z][A-Z0-9_]*$"},
            "additionalProperties": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["description"],
                        "properties": {
                            "description": {"type": "string", "minLength": 1},
                            "value": {"type": "string"},
                            "required": {"type": "boolean"},
                            "generator": {"enum": ["secret"]},
                        },
                    },
                ]
            },
        },
        "formation": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["quantity"],
                "properties": {
                    "quantity": {"type": "integer", "minimum": 0},
                    "size": {
                        "enum": [
                            "eco",
                            "basic",
                            "standard-1x",
                            "standard-2x",
                            "performance-m",
                            "performance-l",
                            "performance-l-ram",
                            "performance-xl",
                            "performance-2xl",
                        ]
                    },
                },
            },
        },
        "addons": {
            "type": "array",
            "items": {
                "oneOf": [
                    {"type": "string", "pattern": "^[a-z0-9-]+(:[a-z0-9-]+)?$"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["plan"],
                        "properties": {
                            "plan": {"type": "string", "pattern": "^[a-z0-9-]+(:[a-z0-9-]+)?$"},
                            "as": {"type": "string"},
                            "options": {"type": "object"},
                        },
                    },
                ]
            },
        },
        "environments": {"type": "object"},
    },
}


@pytest.fixture(scope="module")
def app_json() -> dict[str, Any]:
    document = json.loads(APP_JSON.read_text())
    assert isinstance(document, dict)
    return document


def test_app_json_matches_its_schema(tmp_path: Path) -> None:
    schema = tmp_path / "app.schema.json"
    schema.write_text(json.dumps(APP_JSON_SCHEMA))
    checker = tool("check-jsonschema")
    assert_ok(run(checker, "--check-metaschema", schema))
    assert_ok(run(checker, "--schemafile", schema, APP_JSON))


def test_app_json_has_redis_python_and_the_procfile_processes(app_json: dict[str, Any]) -> None:
    plans = [a if isinstance(a, str) else a["plan"] for a in app_json["addons"]]
    assert any(plan.startswith("heroku-redis:") for plan in plans), "REDIS_URL comes from it"
    assert {"url": "heroku/python"} in app_json["buildpacks"]
    # One formation entry per long-running process type (release is a phase, not a dyno).
    assert set(app_json["formation"]) == set(procfile()) - {"release"}
    assert {"web", "worker"} <= set(app_json["formation"])
    assert all(entry["quantity"] >= 1 for entry in app_json["formation"].values())


def test_app_json_generates_the_api_key(app_json: dict[str, Any]) -> None:
    for name in ("API_KEY", "SECRET_KEY"):
        api_key = app_json["env"][name]
        assert api_key["generator"] == "secret", name
        assert api_key.get("required", True) is True, name
        assert "value" not in api_key, name
    assert app_json["env"]["METRICS_TOKEN"].get("required") is False


def test_app_json_sets_only_variables_the_service_reads(
    app_json: dict[str, Any], read_variables: set[str]
) -> None:
    named = set(app_json["env"])
    unknown = named - read_variables
    assert not unknown, (
        f"app.json sets {sorted(unknown)}, which neither config.py nor the Procfile reads"
    )
    assert not named & {"PORT", "REDIS_URL"}, "Heroku and the add-on set these"


def test_app_json_documents_every_setting() -> None:
    """A new variable in config.py is either offered in app.json or listed here with a reason."""
    named = set(json.loads(APP_JSON.read_text())["env"])
    missing = config_variables() - named - set(NOT_IN_APP_JSON)
    assert not missing, f"add {sorted(missing)} to app.json's env (or to NOT_IN_APP_JSON)"


def test_app_json_values_are_the_service_defaults(app_json: dict[str, Any]) -> None:
    """Each suggested value parses, and is what the service would do without it."""
    defaults = Settings.from_env({})
    shell_defaults = procfile_defaults()
    for name, entry in app_json["env"].items():
        value = entry if isinstance(entry, str) else entry.get("value")
        if value is None:
            continue
        if name in shell_defaults:
            assert value == shell_defaults[name], f"{name}: the Procfile's default is another"
            continue
        if name in HEROKU_OVERRIDES:
            assert value == HEROKU_OVERRIDES[name][0], f"{name}: not the Heroku value"
            Settings.from_env({name: value})  # still parses
            continue
        try:
            settings = Settings.from_env({name: value})
        except ConfigError as exc:
            pytest.fail(f"app.json's {name}={value!r} is refused: {exc}")
        assert settings == defaults, f"app.json's {name}={value!r} is not the default"


def test_forwarded_for_is_trusted_only_behind_the_heroku_router(
    app_json: dict[str, Any], compose: dict[str, Any]
) -> None:
    """Per-IP limits: only Heroku (app.json) trusts one X-Forwarded-For hop; nothing else."""
    assert Settings.from_env({}).proxy_fix_x_for == 0
    assert app_json["env"]["PROXY_FIX_X_FOR"]["value"] == "1"
    assert env_values(dockerfile())["PROXY_FIX_X_FOR"] == "0"
    for name in ("web", "worker"):
        assert str(service(compose, name)["environment"]["PROXY_FIX_X_FOR"]) == "0"


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


# --- .slugignore (what `git push heroku` leaves out of the slug) ---

SLUGIGNORE = ROOT / ".slugignore"
# Left out of the slug: tests, docs, the training side, Keras files, tools, monitoring, CI.
NOT_IN_SLUG = ("tests/", "docs/", "training/", "tools/", "monitoring/", ".github/", ".ci/")
NOT_IN_SLUG_FILES = ("train_model.py", "quantize_model.py", "requirements-train.txt")
# What Heroku's Python buildpack and the Procfile's processes read besides the code.
SLUG_NEEDS = (
    "Procfile",
    "requirements.txt",
    "runtime.txt",
    ".python-version",
    "api.py",
    "make_celery.py",
    "gunicorn.conf.py",
    "app.json",
)


def slug_matches() -> dict[str, str]:
    """Every file `git push` sends -> the .slugignore pattern that removes it ("" if none).

    git's own .gitignore matcher decides, in an empty repository so that nothing but
    .slugignore applies: Heroku documents .slugignore as .gitignore's syntax without "!".
    """
    tracked = run("git", "ls-files", "-z")
    assert_ok(tracked)
    paths = [path for path in tracked.stdout.split("\0") if path]
    with tempfile.TemporaryDirectory() as scratch:
        assert_ok(run("git", "init", "-q", scratch))
        matcher = ["git", "-c", f"core.excludesFile={SLUGIGNORE}", "check-ignore", "--no-index"]
        check = subprocess.run(
            [*matcher, "--stdin", "-z", "-v", "-n"],
            cwd=scratch,
            input="\0".join(paths) + "\0",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert check.returncode in (0, 1), check.stderr  # 1: nothing matched
    fields = check.stdout.split("\0")
    # -z -v -n: source, line number, pattern, path; for each path, in order.
    matches = {fields[i + 3]: fields[i + 2] for i in range(0, len(fields) - 3, 4)}
    assert set(matches) == set(paths)
    return matches


@pytest.fixture(scope="module")
def slug() -> dict[str, str]:
    return slug_matches()


def test_slugignore_uses_only_what_heroku_supports() -> None:
    lines = [line.strip() for line in SLUGIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns
    assert not [p for p in patterns if p.startswith("!")], "Heroku ignores negated patterns"


def test_slug_leaves_out_tests_docs_training_keras_tools_monitoring(
    slug: dict[str, str],
) -> None:
    for path, pattern in slug.items():
        if path.startswith(NOT_IN_SLUG) or path in NOT_IN_SLUG_FILES or path.endswith(".keras"):
            assert pattern, f"{path} would ship in the slug"
    assert any(path.endswith(".keras") for path in slug), "the check needs a Keras file"


def test_slug_keeps_what_the_procfile_processes_need(slug: dict[str, str]) -> None:
    settings = Settings(api_keys=("k",), secret_key="s", log_format="text", log_level="WARNING")
    app = create_app(settings, load_model=False)
    needed = set(SLUG_NEEDS)
    needed |= {path for path in slug if path.startswith("mnist_api/")}
    for module in root_modules_imported_by_the_service():
        needed |= {path for path in slug if path == f"{module}.py" or path.startswith(f"{module}/")}
    # The files the processes read at run time: the model and its card, the page's template
    # and static folders wherever the app says they are.
    folders = [Path(app.root_path) / (app.template_folder or ""), Path(app.static_folder or "")]
    for folder in folders:
        inside = folder.resolve().relative_to(ROOT).as_posix()
        files = {path for path in slug if path.startswith(f"{inside}/")}
        assert files, f"no tracked file in {inside}"
        needed |= files
    for model in ModelRegistry.discover(settings.models_dir):  # every installed version
        # ... with its browser variant, which the page downloads for on-device prediction.
        browser = model.model_path.parent / "mnist_cnn_browser.tflite"
        for path in (model.model_path, model.card_path, browser):
            assert path is not None
            needed.add(path.resolve().relative_to(ROOT).as_posix())
    for entry in ("api", "make_celery", "gunicorn.conf", "mnist_api.serving.release_check"):
        assert entry in PROCFILE.read_text(), f"the Procfile no longer runs {entry}"
    missing = sorted(path for path in needed if slug.get(path, "?") != "")
    assert not missing, f"the slug would lack {missing}"
