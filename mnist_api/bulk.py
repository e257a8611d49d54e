"""Score a folder or a zip of images into a CSV: `python -m mnist_api.bulk INPUT --out FILE`.

With `REDIS_URL` set, chunks of images are fanned out to the Celery workers (so adding
worker machines makes it faster); without it, or with `--local`, they are scored here. Every
file gets one row; a file that is not a usable image gets its error code, never a crash.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery
from tqdm import tqdm

from mnist_api.cache import build_cache
from mnist_api.config import MIB, Settings
from mnist_api.decode_budget import DecodeBudget
from mnist_api.errors import PayloadTooLarge, ServiceError
from mnist_api.job_store import build_job_store
from mnist_api.logs import configure_logging
from mnist_api.model import DigitModel
from mnist_api.preprocessing import Limits
from mnist_api.service import PredictionService
from mnist_api.tasks import PREDICT_UPLOADS, celery_config

COLUMNS = ("file", "prediction", "probability", "error_code")


@dataclass(frozen=True)
class Item:
    """One input file: its name in the folder or zip, and its bytes (None if refused)."""

    name: str
    data: bytes | None
    error: ServiceError | None = None


def read_items(source: Path, max_bytes: int) -> Iterator[Item]:
    """Files of a folder (recursively, sorted) or members of a zip, skipping hidden ones."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if info.is_dir() or _hidden(info.filename):
                    continue
                # The header's size is checked before reading: a zip bomb is refused unread.
                if info.file_size > max_bytes:
                    yield Item(info.filename, None, PayloadTooLarge())
                    continue
                yield Item(info.filename, archive.read(info))
        return
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        name = path.relative_to(source).as_posix()
        if _hidden(name):
            continue
        if path.stat().st_size > max_bytes:
            yield Item(name, None, PayloadTooLarge())
            continue
        yield Item(name, path.read_bytes())


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def row(name: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """A CSV row from a task outcome ({"result": ...} or {"error", "code"})."""
    if "result" in outcome:
        result = outcome["result"]
        return {
            "file": name,
            "prediction": result["prediccion"],
            "probability": result["probabilidad"],
            "error_code": "",
        }
    return {"file": name, "prediction": "", "probability": "", "error_code": outcome["code"]}


def outcome_of(answer: dict[str, Any] | ServiceError) -> dict[str, Any]:
    """The service's answer (or error) in the shape the worker tasks return."""
    return answer.to_dict() if isinstance(answer, ServiceError) else {"result": answer}


def chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive lists of at most `size` items."""
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_locally(
    settings: Settings, items: Iterator[Item], size: int, progress: tqdm[Any]
) -> Iterator[dict[str, Any]]:
    """Score in this process: one model call per chunk, through the same cache."""
    model = DigitModel(settings.model_path, settings.model_card_path)
    model.load()
    service = PredictionService(
        model,
        Limits(
            settings.max_image_pixels,
            DecodeBudget(settings.decode_memory_budget_mb * MIB, settings.decode_wait_seconds),
        ),
        build_cache(settings),
        settings.low_confidence_threshold,
    )
    for chunk in chunks(items, size):
        readable = [item.data for item in chunk if item.data is not None]
        answers = iter(service.predict_many(readable))
        for item in chunk:
            outcome = item.error.to_dict() if item.error else outcome_of(next(answers))
            progress.update(1)
            yield row(item.name, outcome)


def score_on_workers(
    settings: Settings, items: Iterator[Item], size: int, timeout: float, progress: tqdm[Any]
) -> Iterator[dict[str, Any]]:
    """Fan chunks out to the Celery workers, then gather their answers in order."""
    celery_app: Celery[Any] = Celery("mnist_api")
    celery_app.config_from_object(celery_config(settings))
    store = build_job_store(settings.redis_url, settings.result_expires_seconds)
    submitted = []
    for chunk in chunks(items, size):
        hashes = []
        for data in (item.data for item in chunk if item.data is not None):
            sha256 = hashlib.sha256(data).hexdigest()
            store.put_upload(sha256, data)
            hashes.append(sha256)
        pending = celery_app.send_task(PREDICT_UPLOADS, args=(hashes,)) if hashes else None
        submitted.append((chunk, pending))
    for chunk, pending in submitted:
        outcomes = iter(pending.get(timeout=timeout) if pending is not None else [])
        for item in chunk:
            outcome = item.error.to_dict() if item.error else next(outcomes)
            progress.update(1)
            yield row(item.name, outcome)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m mnist_api.bulk", description=__doc__)
    parser.add_argument("input", type=Path, help="a folder of images or a .zip")
    parser.add_argument("--out", type=Path, required=True, help="the CSV file to write")
    parser.add_argument("--chunk-size", type=int, default=32, help="images per model call/task")
    parser.add_argument("--local", action="store_true", help="score here even with a broker")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait per chunk")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    if not args.input.exists():
        parser.error(f"{args.input} does not exist")
    items = read_items(args.input, settings.max_content_length)
    use_workers = bool(settings.redis_url) and not args.local
    counts = {"predicted": 0, "errors": 0}
    # A progress bar for a person at a terminal; none in CI logs or when piped.
    with (
        tqdm(unit="img", disable=not sys.stderr.isatty()) as progress,
        args.out.open("w", newline="") as handle,
    ):
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        rows = (
            score_on_workers(settings, items, args.chunk_size, args.timeout, progress)
            if use_workers
            else score_locally(settings, items, args.chunk_size, progress)
        )
        for entry in rows:
            writer.writerow(entry)
            counts["errors" if entry["error_code"] else "predicted"] += 1
    where = "on the Celery workers" if use_workers else "locally"
    sys.stdout.write(
        f"{sum(counts.values())} files scored {where}: {counts['predicted']} predicted, "
        f"{counts['errors']} with an error code -> {args.out}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
