"""The deployment files, checked for real, without a Docker engine (shared helpers:
`tests/serving/deploy_files.py`): the Dockerfile (hadolint, what the image copies and
runs) and .dockerignore (Docker's own matching, from the `docker` package).
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import shlex
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from docker.utils.build import exclude_paths

from mnist_api.config import Settings
from tests.serving.deploy_files import (
    DOCKERFILE,
    DOCKERIGNORE,
    HADOLINT_CONFIG,
    PYTHON_VERSION,
    ROOT,
    RUNTIME_SOURCES,
    assert_ok,
    procfile,
    run,
    tool,
)

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


def dockerignored(paths: list[str], patterns: list[str], root: Path) -> set[str]:
    """Which of `paths` Docker leaves out of the build context, by Docker's own rules: the
    `docker` package's `exclude_paths` (what `docker build` from Python sends) walks a tree of
    empty files at those paths under `root`."""
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).touch()
    kept = exclude_paths(str(root), list(patterns))
    return {path for path in paths if path not in kept}


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
        "models/0123456789ab/training_report.png",
        "requirements-train.txt",
        "training/data.py",
    ],
)
def test_dockerignore_keeps_out(path: str, tmp_path: Path) -> None:
    assert dockerignored([path], dockerignore_patterns(), tmp_path) == {path}


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
        "models/default_deployment.json",
    ],
)
def test_dockerignore_keeps_what_the_image_copies(path: str, tmp_path: Path) -> None:
    assert not dockerignored([path], dockerignore_patterns(), tmp_path)


def test_dockerignore_matcher_follows_docker_rules(tmp_path: Path) -> None:
    """The matcher on Docker's documented examples, so the two tests above mean something."""
    assert dockerignored(["a/b/__pycache__/x.pyc"], ["**/__pycache__"], tmp_path / "1")
    assert dockerignored(["x.md"], ["*.md"], tmp_path / "2")
    assert not dockerignored(["docs/x.md"], ["*.md"], tmp_path / "3")
    assert not dockerignored(["README.md"], ["*.md", "!README.md"], tmp_path / "4")
    assert not dockerignored(["models/a.tflite"], ["models/*.keras"], tmp_path / "5")
