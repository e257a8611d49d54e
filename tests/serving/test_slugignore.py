"""The deployment files, checked for real, without a Docker engine (shared helpers:
`tests/serving/deploy_files.py`): .slugignore: what `git push heroku`
leaves out of the slug, and what the Procfile's processes still need.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from mnist_api import create_app
from mnist_api.config import Settings
from mnist_api.inference.registry import ModelRegistry
from tests.serving.deploy_files import PROCFILE, ROOT, assert_ok, run
from tests.serving.test_dockerfile import root_modules_imported_by_the_service

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
    # The first-start stable version chosen on evidence (issue 25), read by every process.
    needed.add("models/default_deployment.json")
    for entry in ("api", "make_celery", "gunicorn.conf", "mnist_api.serving.release_check"):
        assert entry in PROCFILE.read_text(), f"the Procfile no longer runs {entry}"
    missing = sorted(path for path in needed if slug.get(path, "?") != "")
    assert not missing, f"the slug would lack {missing}"
