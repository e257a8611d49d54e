"""Bulk scoring of a folder or a zip, locally and through a real Celery worker."""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from mnist_api.config import PROJECT_ROOT
from tests.samples import as_paper, encode, sample
from tests.test_errors import pdf_file, truncated_png
from tests.worker_process import Worker
from tools.redis_server import RedisServer
from tools.services import API_KEYS, venv_env

GOOD = {f"digits/{d}.png": d for d in (0, 3, 7)} | {"photo_4.jpg": 4, "nested/deeper/9.png": 9}
BAD = {
    "notes.txt": "invalid_image",
    "broken.png": "invalid_image",
    "scan.pdf": "unsupported_media_type",
    "empty.png": "invalid_image",
    "blank.png": "blank_image",
}


def fill(folder: Path) -> None:
    """Write the good and bad files of the test set into `folder`."""
    for name, digit in GOOD.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if name.endswith(".jpg") else "PNG"
        path.write_bytes(encode(as_paper(sample(digit)), fmt))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(truncated_png())
    (folder / "scan.pdf").write_bytes(pdf_file())
    (folder / "empty.png").write_bytes(b"")
    (folder / "blank.png").write_bytes(encode(Image.new("L", (64, 64), 255)))
    (folder / ".DS_Store").write_bytes(b"\0\0")  # hidden files are skipped


def run_bulk(
    source: Path, out: Path, *options: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mnist_api.bulk",
            str(source),
            "--out",
            str(out),
            "--chunk-size",
            "4",
            *options,
        ],
        cwd=PROJECT_ROOT,
        env=venv_env(LOG_LEVEL="WARNING", **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "prediction", "probability", "error_code"]
    return {row["file"]: row for row in rows}


def check(rows: dict[str, dict[str, str]]) -> None:
    assert set(rows) == set(GOOD) | set(BAD)
    for name in GOOD:
        assert rows[name]["error_code"] == "", rows[name]
        assert rows[name]["prediction"] in {str(d) for d in range(10)}
        assert 0.0 < float(rows[name]["probability"]) <= 1.0
    for name, code in BAD.items():
        assert rows[name]["error_code"] == code, rows[name]
        assert rows[name]["prediction"] == ""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    source = tmp_path / "images"
    source.mkdir()
    fill(source)
    return source


def test_folder_locally(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.csv"
    done = run_bulk(folder, out, REDIS_URL="")
    assert done.returncode == 0, done.stderr
    check(read_rows(out))
    assert "10 files scored locally: 5 predicted, 5 with an error code" in done.stdout
    assert "img/s" not in done.stderr  # no progress bar when not on a terminal


def test_zip_locally_with_an_oversized_member(folder: Path, tmp_path: Path) -> None:
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(folder).as_posix())
        zipped.writestr("huge.bin", b"\0" * (2 * 1024 * 1024))  # compresses to almost nothing
    out = tmp_path / "results.csv"
    done = run_bulk(archive, out, REDIS_URL="", MAX_CONTENT_LENGTH=str(1024 * 1024))
    assert done.returncode == 0, done.stderr
    rows = read_rows(out)
    assert rows.pop("huge.bin")["error_code"] == "payload_too_large"
    check(rows)


def test_folder_through_a_worker(
    folder: Path, tmp_path: Path, redis_server: RedisServer, start_worker: Callable[..., Worker]
) -> None:
    worker = start_worker(CELERY_CONCURRENCY="2")
    local_out, worker_out = tmp_path / "local.csv", tmp_path / "worker.csv"
    done = run_bulk(folder, worker_out, REDIS_URL=redis_server.url, API_KEYS=API_KEYS[0])
    assert done.returncode == 0, done.stderr
    assert "on the Celery workers" in done.stdout
    assert "mnist_api.predict_uploads" in worker.log()  # the chunks really ran on the worker
    run_bulk(folder, local_out, REDIS_URL="")
    assert read_rows(worker_out) == read_rows(local_out)


def test_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    done = run_bulk(tmp_path / "nowhere", tmp_path / "out.csv", REDIS_URL="")
    assert done.returncode == 2
    assert "does not exist" in done.stderr


def test_bulk_keeps_few_chunks_in_redis_and_leaves_nothing(
    tmp_path: Path, redis_server: RedisServer, start_worker: Callable[..., Worker]
) -> None:
    """At most --max-in-flight chunks wait in Redis at once; afterwards Redis is as before."""
    source = tmp_path / "many"
    source.mkdir()
    for n in range(16):  # distinct bytes: 16 uploads, 8 chunks of 2
        (source / f"{n:02}.png").write_bytes(encode(as_paper(sample(n % 10))) + bytes([n]))
    # slow tasks, so a submit-everything run would show; cache entries that expire quickly
    start_worker(TASK_DELAY_SECONDS="0.3", CACHE_TTL_SECONDS="2")
    baseline = set(redis_server.client().keys("*"))  # only Celery's _kombu.binding* keys
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        watcher = redis_server.client()
        while not done.is_set():
            peak[0] = max(peak[0], len(watcher.keys("upload:*")))
            time.sleep(0.01)

    watching = threading.Thread(target=watch)
    watching.start()
    try:
        out = tmp_path / "many.csv"
        finished = run_bulk(
            source,
            out,
            "--chunk-size",
            "2",
            "--max-in-flight",
            "2",
            REDIS_URL=redis_server.url,
            API_KEYS=API_KEYS[0],
        )
    finally:
        done.set()
        watching.join()
    assert finished.returncode == 0, finished.stderr
    rows = read_rows(out)
    assert len(rows) == 16 and all(row["error_code"] == "" for row in rows.values())
    assert 1 <= peak[0] <= 4  # 2 chunks x 2 uploads, never the whole folder
    # uploads and results are gone at once; what is left is the prediction cache ...
    left = set(redis_server.client().keys("*")) - baseline
    assert left and all(key.startswith(b"pred:") for key in left), left
    deadline = time.monotonic() + 30
    while set(redis_server.client().keys("*")) != baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(redis_server.client().keys("*")) == baseline  # ... until CACHE_TTL_SECONDS
