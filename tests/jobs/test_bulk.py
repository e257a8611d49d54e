"""Bulk scoring of a folder or a zip, locally and through a real Celery worker."""

from __future__ import annotations

import csv
import hashlib
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
from tests.http.test_errors import pdf_file, truncated_png
from tests.samples import as_paper, encode, sample
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
            "mnist_api.jobs.bulk",
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
    assert all(key.startswith(b"pred:") for key in left), left
    deadline = time.monotonic() + 30
    while set(redis_server.client().keys("*")) != baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(redis_server.client().keys("*")) == baseline  # ... until CACHE_TTL_SECONDS


def zip_of(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return path


def patch_entry(archive: Path, name: str, *, flags: int = 0, size: int | None = None) -> None:
    """Rewrite a member's headers in place: set flag bits, or claim another uncompressed size.

    The local header (PK\\3\\4) holds flags at offset 6 and the size at 22; the central
    directory entry (PK\\1\\2) holds them at 8 and 24. zipfile trusts the central directory.
    """
    data = bytearray(archive.read_bytes())
    encoded = name.encode()
    for signature, flag_at, size_at, name_at in ((b"PK\3\4", 6, 22, 30), (b"PK\1\2", 8, 24, 46)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_at : start + name_at + len(encoded)] == encoded:
                flag = int.from_bytes(data[start + flag_at : start + flag_at + 2], "little")
                data[start + flag_at : start + flag_at + 2] = (flag | flags).to_bytes(2, "little")
                if size is not None:
                    data[start + size_at : start + size_at + 4] = size.to_bytes(4, "little")
            start += 4
    archive.write_bytes(bytes(data))


def test_broken_archives_never_crash_the_run(tmp_path: Path) -> None:
    good = encode(as_paper(sample(3)))
    truncated = zip_of(tmp_path / "truncated.zip", {"a.png": good, "b.png": good + b"b"})
    truncated.write_bytes(truncated.read_bytes()[:-30])  # the central directory is cut off
    garbage = tmp_path / "garbage.zip"
    # an end record that announces one entry in a central directory of garbage
    garbage.write_bytes(
        b"\xff" * 46
        + b"PK\5\6"
        + bytes(4)
        + (1).to_bytes(2, "little") * 2
        + (46).to_bytes(4, "little")
        + bytes(4)
        + bytes(2)
    )
    for archive in (truncated, garbage):
        out = tmp_path / f"{archive.stem}.csv"
        done = run_bulk(archive, out, REDIS_URL="")
        assert done.returncode == 0, done.stderr
        assert read_rows(out) == {
            archive.name: {
                "file": archive.name,
                "prediction": "",
                "probability": "",
                "error_code": "invalid_archive",
            }
        }


def test_hostile_zip_members_get_their_own_codes(tmp_path: Path) -> None:
    good = encode(as_paper(sample(3)))
    huge = b"\0" * (2 * 1024 * 1024)  # deflates to about 2 KB
    archive = zip_of(
        tmp_path / "hostile.zip",
        {
            "fine.png": good,
            "locked.png": good + b"l",
            "says-small.bin": huge,  # its header will claim 1,000 bytes
            "says-big.png": good + b"s",  # its header will claim more than it holds
            "corrupt.png": encode(as_paper(sample(5))),
        },
    )
    patch_entry(archive, "locked.png", flags=0x1)  # "encrypted"
    patch_entry(archive, "says-small.bin", size=1000)
    patch_entry(archive, "says-big.png", size=len(good) + 500)
    data = bytearray(archive.read_bytes())
    at = data.find(b"corrupt.png") + len("corrupt.png") + 20  # inside its deflated data
    data[at : at + 8] = bytes(8)
    archive.write_bytes(bytes(data))

    out = tmp_path / "hostile.csv"
    done = run_bulk(archive, out, REDIS_URL="", MAX_CONTENT_LENGTH=str(1024 * 1024))
    assert done.returncode == 0, done.stderr
    codes = {name: row["error_code"] for name, row in read_rows(out).items()}
    assert codes == {
        "fine.png": "",
        "locked.png": "encrypted_member",
        "says-small.bin": "unreadable_member",  # read stops at its claimed size: bad CRC
        "says-big.png": "unreadable_member",
        "corrupt.png": "unreadable_member",
    }


def test_file_names_cannot_become_spreadsheet_formulas(tmp_path: Path) -> None:
    source = tmp_path / "formulas"
    source.mkdir()
    names = ["=HYPERLINK(1).png", "+1.png", "-1.png", "@SUM(1).png", "\tx.png", "\ry.png"]
    for n, name in enumerate(names):
        (source / name).write_bytes(encode(as_paper(sample(n))))
    (source / "plain.png").write_bytes(encode(as_paper(sample(7))))
    out = tmp_path / "formulas.csv"
    done = run_bulk(source, out, REDIS_URL="")
    assert done.returncode == 0, done.stderr
    rows = read_rows(out)
    assert set(rows) == {f"'{name}" for name in names} | {"plain.png"}
    assert all(row["error_code"] == "" for row in rows.values())


def test_failed_and_late_tasks_become_error_codes(
    tmp_path: Path, redis_server: RedisServer, start_worker: Callable[..., Worker]
) -> None:
    """A chunk whose task failed, timed out or was dead-lettered: rows with codes, no crash."""
    source = tmp_path / "chunks"
    source.mkdir()
    for n in range(4):  # two chunks of two
        (source / f"{n}.png").write_bytes(encode(as_paper(sample(n))) + b"chunks")
    poison = (source / "0.png").read_bytes()
    env = {"REDIS_URL": redis_server.url, "API_KEYS": API_KEYS[0], "SECRET_KEY": "s"}
    options = ("--chunk-size", "2")

    # The first chunk kills its worker process each time: dead-lettered; the other scores.
    start_worker(TASK_CRASH_ON_SHA256=hashlib.sha256(poison).hexdigest())
    out = tmp_path / "poison.csv"
    done = run_bulk(source, out, *options, **env)
    assert done.returncode == 0, done.stderr
    codes = {name: row["error_code"] for name, row in read_rows(out).items()}
    assert codes == {"0.png": "dead_lettered", "1.png": "dead_lettered", "2.png": "", "3.png": ""}


def test_tasks_that_raise_or_time_out_become_error_codes(
    tmp_path: Path, redis_server: RedisServer, start_worker: Callable[..., Worker]
) -> None:
    source = tmp_path / "slow"
    source.mkdir()
    for n in range(3):
        (source / f"{n}.png").write_bytes(encode(as_paper(sample(n))) + b"slow")
    env = {"REDIS_URL": redis_server.url, "API_KEYS": API_KEYS[0], "SECRET_KEY": "s"}
    # Every task sleeps 3 s but may run 1 s: SoftTimeLimitExceeded, the task fails.
    start_worker(TASK_DELAY_SECONDS="3", TASK_SOFT_TIME_LIMIT="1", TASK_TIME_LIMIT="30")
    failed_out, late_out = tmp_path / "failed.csv", tmp_path / "late.csv"
    failed = run_bulk(source, failed_out, "--chunk-size", "2", **env)
    assert failed.returncode == 0, failed.stderr
    assert {row["error_code"] for row in read_rows(failed_out).values()} == {"task_failed"}
    # Waiting 0.2 s per chunk is not enough for any: every row says so.
    late = run_bulk(source, late_out, "--chunk-size", "2", "--timeout", "0.2", **env)
    assert late.returncode == 0, late.stderr
    assert {row["error_code"] for row in read_rows(late_out).values()} == {"task_timeout"}
    assert not redis_server.client().keys("upload*")  # given-up chunks are not left behind
