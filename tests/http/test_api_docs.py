"""docs/api.md, the project's API reference, names every route and every error code."""

from __future__ import annotations

import re

import pytest
from apiflask import APIFlask

from mnist_api import errors
from mnist_api.config import PROJECT_ROOT
from mnist_api.http.handlers import BadRequest

API_DOC = PROJECT_ROOT / "docs" / "api.md"
README = PROJECT_ROOT / "README.md"
# Codes a task's status can carry besides the upload errors (mnist_api/jobs/tasks.py).
TASK_ONLY_CODES = ("upload_expired",)


def service_errors() -> list[type[errors.ServiceError]]:
    """Every typed error the service can answer with."""
    found = [errors.ServiceError]
    pending = [errors.ServiceError]
    while pending:
        for subclass in pending.pop().__subclasses__():
            found.append(subclass)
            pending.append(subclass)
    assert BadRequest in found
    return found


@pytest.fixture(scope="module")
def doc() -> str:
    return API_DOC.read_text()


def test_every_route_is_documented(app: APIFlask, doc: str) -> None:
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"<\1>", rule.rule)
        methods = sorted(set(rule.methods or ()) - {"HEAD", "OPTIONS"})
        assert f"`{path}`" in doc or all(f"`{m} {path}`" in doc for m in methods), path


def test_every_error_code_is_in_the_table_with_its_status(doc: str) -> None:
    for error in service_errors():
        assert f"| {error.status} | `{error.code}` |" in doc, (error.__name__, error.code)
    for code in TASK_ONLY_CODES:
        assert f"`{code}`" in doc


def test_readme_links_the_reference_not_a_file_outside_the_repository() -> None:
    readme = README.read_text()
    assert "](docs/api.md)" in readme
    assert "CONTRACT.md" not in readme
