"""Heroku as it would run us: every Procfile line through honcho, the release check, the slug."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
import requests

from mnist_api.config import PROJECT_ROOT
from tests.samples import as_paper, encode, sample
from tools.redis_server import RedisServer
from tools.services import API_KEYS, free_port, venv_env, wait_ready

HONCHO = Path(sys.executable).parent / "honcho"
SLUG_LIMIT_MB = 500


def procfile_processes() -> list[str]:
    return [
        line.split(":", 1)[0]
        for line in (PROJECT_ROOT / "Procfile").read_text().splitlines()
        if line.strip()
    ]


def test_procfile_has_release_web_and_worker() -> None:
    assert procfile_processes() == ["release", "web", "worker"]
    text = (PROJECT_ROOT / "Procfile").read_text()
    assert "--concurrency" in text  # a dyno would otherwise start one process per host CPU


def release(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # The release phase migrates the database: a file of the test's own, not the repository's.
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'feedback.db'}", **env}
    return subprocess.run(
        [str(HONCHO), "start", "-f", "Procfile", "-e", os.devnull, "--no-colour", "release"],
        cwd=PROJECT_ROOT,
        env=venv_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_release_phase_passes_with_the_committed_model(tmp_path: Path) -> None:
    done = release(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "release check passed: mnist-cnn-int8-" in done.stdout


@pytest.mark.parametrize(
    "damage",
    [
        "flipped_byte",
        "missing_model",
        "missing_card",
        "bad_card",
        "misnamed_folder",
        "unknown_default",
    ],
)
def test_release_phase_refuses_a_broken_model(tmp_path: Path, damage: str) -> None:
    """Every installed version is checked: one broken version fails the release."""
    models = tmp_path / "models"
    shutil.copytree(PROJECT_ROOT / "models", models)
    broken = models / sorted(p.name for p in models.iterdir() if p.is_dir())[0]
    model = broken / "mnist_cnn_int8.tflite"
    card = broken / "model_card.json"
    env = {"MODELS_DIR": str(models)}
    if damage == "flipped_byte":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "missing_model":
        model.unlink()
    elif damage == "missing_card":
        card.unlink()
    elif damage == "bad_card":
        card.write_text("{not json")
    elif damage == "misnamed_folder":
        broken.rename(models / "latest")
    else:
        env["DEFAULT_MODEL_VERSION"] = "0123456789ab"
    done = release(tmp_path, **env)
    assert done.returncode != 0
    assert "release check failed" in done.stdout + done.stderr


def test_web_and_worker_as_heroku_runs_them(redis_server: RedisServer, tmp_path: Path) -> None:
    """honcho starts the Procfile's web and worker lines; the web answers and the worker works."""
    port = free_port()
    env = venv_env(
        REDIS_URL=redis_server.url,
        API_KEY=API_KEYS[0],
        SECRET_KEY="heroku-test-secret",
        WEB_CONCURRENCY="2",
        CELERY_CONCURRENCY="1",
        RATE_LIMIT="off",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    log = (tmp_path / "honcho.log").open("wb")
    honcho = subprocess.Popen(
        [
            str(HONCHO),
            "start",
            "-f",
            "Procfile",
            "-e",
            os.devnull,
            "--no-colour",
            "-p",
            str(port),
            "web",
            "worker",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, honcho, timeout=60)
        headers = {"x-api-key": API_KEYS[0], "Content-Type": "image/png"}
        data = encode(as_paper(sample(2)))
        assert requests.post(f"{url}/predict", data=data, headers=headers, timeout=10).ok
        accepted = requests.post(
            f"{url}/predict_async", data=data + b"\0", headers=headers, timeout=10
        )
        assert accepted.status_code == 202
        status_url = f"{url}{accepted.json()['status_url']}"
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline and state != "SUCCESS":
            state = requests.get(status_url, headers=headers, timeout=10).json()["state"]
            time.sleep(0.2)
        assert state == "SUCCESS"  # the worker dyno consumed the task
        assert requests.get(f"{url}/readyz", timeout=5).json()["broker"] == "ok"
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)  # honcho and the processes it started
        try:
            honcho.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_deployed_requirements_fit_a_heroku_slug(tmp_path: Path) -> None:
    """A fresh venv with requirements.txt only: no TensorFlow, well under the slug limit."""
    target = tmp_path / "slug-venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "-r",
            str(PROJECT_ROOT / "requirements.txt"),
        ],
        check=True,
        timeout=600,
    )
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('tensorflow'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "None"
    # the service itself imports and serves from that venv alone
    subprocess.run(
        [str(python), "-c", "import api"],
        cwd=PROJECT_ROOT,
        check=True,
        env={**venv_env(API_KEY="k", SECRET_KEY="s"), "PATH": f"{target / 'bin'}:/usr/bin:/bin"},
        timeout=60,
    )
    size_mb = int(
        subprocess.run(
            ["du", "-sm", str(target)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    print(f"deployed venv: {size_mb} MB (Heroku slug limit {SLUG_LIMIT_MB} MB)")
    assert size_mb < SLUG_LIMIT_MB * 0.6
